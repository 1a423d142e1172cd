"""Checkpoint inspection, loading and hashing: round trips, family detection and every error path."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import CheckpointError
from core.models import checkpoint as ckpt
from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.detect import detect
from core.models.hashes import model_hash
from core.models.safetensors_header import read_header
from core.models.testing import write_random_checkpoint

U = "model.diffusion_model."
PREFIXES = {"unet": U, "text_encoder": "cond_stage_model.transformer.", "vae": "first_stage_model."}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(50)


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny random sd15 checkpoints, written once: fp16 (seed 0, 1), bf16 and fp32."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "fp16": write_random_checkpoint(root / "a16.safetensors", "sd15", "tiny", 0, torch.float16),
        "fp16_seed1": write_random_checkpoint(root / "b16.safetensors", "sd15", "tiny", 1, torch.float16),
        "bf16": write_random_checkpoint(root / "a_bf16.safetensors", "sd15", "tiny", 2, torch.bfloat16),
        "fp32": write_random_checkpoint(root / "a32.safetensors", "sd15", "tiny", 3, torch.float32),
    }


def _modules(loaded: ckpt.LoadedCheckpoint) -> dict[str, torch.nn.Module]:
    return {"unet": loaded.unet, "text_encoder": loaded.text_encoder, "vae": loaded.vae}


def _assert_matches_file(module: torch.nn.Module, written: dict[str, torch.Tensor], prefix: str) -> None:
    state = module.state_dict()
    expected = {k[len(prefix) :]: v for k, v in written.items() if k.startswith(prefix)}
    expected.pop("text_model.embeddings.position_ids", None)  # ignored on load (non-persistent buffer)
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k], v), k


def _error(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        fn(*args, **kw)
    message = str(err.value)
    assert message.startswith(str(args[0])), message  # names the file
    assert "\n" not in message
    return message


def _write_shapes(path: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.float16) -> Path:
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}, str(path))
    return path


def _without(src: Path, dst: Path, drop: set[str] = frozenset(), replace: dict | None = None) -> Path:
    tensors = load_file(str(src))
    for k in drop:
        del tensors[k]
    tensors.update(replace or {})
    save_file(tensors, str(dst))
    return dst


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_round_trip_every_tensor_and_dtype(files, name, dtype):
    loaded = load_checkpoint(files[name])
    written = load_file(str(files[name]))
    assert loaded.family == "sd15" and loaded.dtype == dtype and loaded.info.dtype == str(dtype)[6:]
    for component, module in _modules(loaded).items():
        _assert_matches_file(module, written, PREFIXES[component])
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training


def test_loaded_text_encoder_runs(files):
    """Buffers the network computes itself (CLIP position ids) are real after a meta-device build."""
    loaded = load_checkpoint(files["fp32"])
    hidden = loaded.text_encoder(torch.randint(0, 1000, (1, 77)))
    assert hidden.shape[:2] == (1, 77) and torch.isfinite(hidden).all()


def test_meta_build_skips_initialising_parameters_only():
    """Parameters built on meta are not initialised (meta normal_ once imported torch._dynamo: ~1.5 s holding
    the GIL); real tensors, such as computed buffers, still are."""
    calls = []
    with ckpt._parameters_on_meta():
        layer = torch.nn.Linear(4, 3)
        embedding = torch.nn.Embedding(10, 4)
        real = torch.zeros(3).fill_(2.0)  # a buffer a network computes for itself
        meta = torch.empty(2, device="meta")
        assert torch.nn.init.normal_(meta) is meta and meta.uniform_(0, 1) is meta
        calls.append(real.add_(1.0))
    assert layer.weight.is_meta and embedding.weight.is_meta
    assert torch.equal(real, torch.full((3,), 3.0)) and calls[0] is real
    assert torch.ones(2).normal_().std() > 0  # outside the build, init works as always


def test_dropped_networks_need_no_cycle_collection(files):
    """The app freezes loaded models out of the cycle collector's reach (no UI stalls walking them); that is
    only safe while dropping a model frees it by reference counting alone."""
    import gc
    import weakref

    from core.pipeline import load_model

    loaded = load_model(files["fp16"], device=torch.device("cpu"))
    refs = [weakref.ref(m) for m in _modules(loaded.checkpoint).values()] + [weakref.ref(loaded)]
    gc.collect()
    gc.disable()
    try:
        del loaded
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


def test_loading_does_not_import_torch_dynamo(files):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from core.models.checkpoint import load_checkpoint\n"
        f"load_checkpoint({str(files['fp16'])!r})\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False"]


def test_dtype_argument_converts_each_tensor(files):
    loaded = load_checkpoint(files["fp16"], dtype=torch.float32)
    written = load_file(str(files["fp16"]))
    assert loaded.dtype == torch.float32
    for component, module in _modules(loaded).items():
        for k, v in module.state_dict().items():
            assert v.dtype == torch.float32
            assert torch.equal(v, written[PREFIXES[component] + k].float())


def test_loads_only_component_tensors(files, tmp_path, monkeypatch):
    """Schedule buffers, position_ids and model_ema.* are never read; nor the built-in VAE when overridden."""
    import safetensors

    path = _without(
        files["fp16"], tmp_path / "ema.safetensors", replace={"model_ema.decay": torch.tensor(0.9999)}
    )
    read: list[tuple[str, str]] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, filename, *a, **kw):
            self.filename = filename
            self.inner = real_open(filename, *a, **kw)

        def get_tensor(self, key):
            read.append((self.filename, key))
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    load_checkpoint(path)
    header = read_header(path)
    needed = {
        k for k in header.tensors if k.startswith(tuple(PREFIXES.values())) and not k.endswith("position_ids")
    }
    assert sorted(k for _, k in read) == sorted(needed)  # each needed tensor once, nothing else

    read.clear()
    donor = files["fp16_seed1"]
    load_checkpoint(path, vae_path=donor)
    vae_keys = {k for k in header.tensors if k.startswith("first_stage_model.")}
    assert sorted(k for f, k in read if f == str(path)) == sorted(needed - vae_keys)
    assert sorted(k for f, k in read if f == str(donor)) == sorted(vae_keys)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_load_is_memory_mapped(files):
    """Every weight is a view of the mapped file, not a private copy (the load costs no RAM up front)."""
    loaded = load_checkpoint(files["fp16"])
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(files["fp16"]):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi))
    assert maps
    for module in _modules(loaded).values():
        for name, p in module.named_parameters():
            assert any(lo <= p.data_ptr() < hi for lo, hi in maps), name


# ------------------------------------------------------------------------------------------- VAE override


def _vae_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {
        k[len("first_stage_model.") :]: v
        for k, v in load_file(str(path)).items()
        if k.startswith("first_stage_model.")
    }


@pytest.mark.parametrize("layout", ["bare", "prefixed", "full_checkpoint"])
def test_vae_override(files, tmp_path, layout):
    donor = _vae_tensors(files["fp16_seed1"])
    if layout == "bare":
        vae = tmp_path / "vae.safetensors"
        save_file({**donor, "model_ema.decay": torch.tensor(1.0)}, str(vae))
    elif layout == "prefixed":
        vae = tmp_path / "vae.safetensors"
        save_file({"first_stage_model." + k: v for k, v in donor.items()}, str(vae))
    else:
        vae = files["fp16_seed1"]
    loaded = load_checkpoint(files["fp16"], vae_path=vae)
    assert loaded.vae_path == vae
    state = loaded.vae.state_dict()
    assert state.keys() == donor.keys()
    assert all(torch.equal(state[k], v) for k, v in donor.items())
    _assert_matches_file(loaded.unet, load_file(str(files["fp16"])), U)


def test_vae_override_rejects_diffusers_and_flux_vae(files, tmp_path):
    diffusers = _write_shapes(
        tmp_path / "diffusion_pytorch_model.safetensors",
        {
            "encoder.conv_in.weight": (2, 3, 3, 3),
            "decoder.conv_in.weight": (2, 4, 3, 3),
            "decoder.up_blocks.0.resnets.0.norm1.weight": (2,),
        },
    )
    msg = str(pytest.raises(CheckpointError, load_checkpoint, files["fp16"], vae_path=diffusers).value)
    assert msg.startswith(str(diffusers)) and "diffusers" in msg and "LDM" in msg

    flux_ae = _write_shapes(
        tmp_path / "ae.safetensors",
        {"encoder.conv_in.weight": (2, 3, 3, 3), "decoder.conv_in.weight": (2, 16, 3, 3)},
    )
    msg = str(pytest.raises(CheckpointError, load_checkpoint, files["fp16"], vae_path=flux_ae).value)
    assert "16 latent channels" in msg and "4-channel" in msg

    lora = _write_shapes(tmp_path / "l.safetensors", {"lora_unet_x.lora_up.weight": (2, 2)})
    msg = str(pytest.raises(CheckpointError, load_checkpoint, files["fp16"], vae_path=lora).value)
    assert "not a VAE" in msg


# ------------------------------------------------------------------------------------------- pickle files


def test_ckpt_with_plain_state_dict_loads(files, tmp_path):
    written = load_file(str(files["fp16"]))
    for legacy in (False, True):
        path = tmp_path / f"model{legacy}.ckpt"
        torch.save(
            {"state_dict": written, "global_step": 470000}, path, _use_new_zipfile_serialization=not legacy
        )
        loaded = load_checkpoint(path)
        assert loaded.info.format == "pickle"
        for component, module in _modules(loaded).items():
            _assert_matches_file(module, written, PREFIXES[component])


def test_renamed_files_are_opened_by_content(files, tmp_path):
    as_ckpt = tmp_path / "really_safetensors.ckpt"
    as_ckpt.write_bytes(files["fp16"].read_bytes())
    assert load_checkpoint(as_ckpt).info.format == "safetensors"
    as_st = tmp_path / "really_pickle.safetensors"
    torch.save(load_file(str(files["fp16"])), as_st)
    assert load_checkpoint(as_st).info.format == "pickle"


def test_old_clip_names_without_text_model_level(files, tmp_path):
    """Early SD1.x files saved the text encoder without the text_model. level."""
    prefix = "cond_stage_model.transformer."
    written = load_file(str(files["fp16"]))
    old = {k.replace(prefix + "text_model.", prefix): v for k, v in written.items()}
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    loaded = load_checkpoint(path)
    _assert_matches_file(loaded.text_encoder, written, prefix)


class Payload:
    """Unpickling this would call _side_effect; the weights-only loader must refuse before that."""

    def __reduce__(self):
        return (_side_effect, ())


def _side_effect():
    Path(_side_effect.flag).write_text("ran")  # type: ignore[attr-defined]


def test_ckpt_with_pickled_code_is_rejected(files, tmp_path):
    _side_effect.flag = tmp_path / "ran.txt"  # type: ignore[attr-defined]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(str(files["fp16"])), "extra": Payload()}, path)
    msg = _error(load_checkpoint, path)
    assert "pickled Python code" in msg and ".safetensors" in msg
    assert not (tmp_path / "ran.txt").exists()


def test_truncated_ckpt(files, tmp_path):
    full = tmp_path / "full.ckpt"
    torch.save(load_file(str(files["fp16"])), full)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert "not a readable PyTorch checkpoint" in _error(load_checkpoint, cut)


# ------------------------------------------------------------------------------------------- broken files


def test_truncated_safetensors(files, tmp_path):
    data = files["fp16"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    msg = _error(load_checkpoint, cut)
    (n,) = struct.unpack("<Q", data[:8])
    assert "truncated" in msg and "re-download" in msg
    total, present = len(data) - 8 - n, len(data) // 2 - 8 - n
    assert f"{total / 1e6:.2f} MB" in msg and f"{present / 1e6:.2f} MB" in msg


@pytest.mark.parametrize(
    "name,content,expect",
    [
        ("empty.safetensors", b"", "only 0 bytes"),
        ("short.safetensors", b"\x01\x02\x03", "only 3 bytes"),
        ("random.safetensors", bytes(range(7, 250)) * 40, "header length field says"),
        ("image.safetensors", PNG, "PNG image"),
        ("image.png", PNG, "PNG image"),
        ("image.ckpt", PNG, "PNG image"),
        ("notes.txt", b"hello, these are my prompt notes\n" * 4, "text file"),
        (
            "pointer.safetensors",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
            "Git LFS pointer",
        ),
    ],
)
def test_not_a_checkpoint(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    assert expect in _error(load_checkpoint, path)
    assert expect in _error(inspect_checkpoint, path)


@pytest.mark.parametrize(
    "header,expect",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{}", "contains no tensors"),
        (
            json.dumps({"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 2]}}).encode(),
            "unknown dtype 'F17'",
        ),
        (json.dumps({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}}).encode(), "needs 4"),
        (
            json.dumps({"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}).encode(),
            "invalid shape",
        ),
        (
            json.dumps({"a": {"dtype": "F16", "shape": [1], "data_offsets": [4, 2]}}).encode(),
            "invalid data_offsets",
        ),
    ],
)
def test_header_garbage(tmp_path, header, expect):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert expect in _error(load_checkpoint, path)


def test_missing_file_and_folder(tmp_path):
    assert "does not exist" in _error(load_checkpoint, tmp_path / "nope.safetensors")
    assert "folder" in _error(load_checkpoint, tmp_path)
    assert "does not exist" in _error(model_hash, tmp_path / "nope.safetensors")


def test_missing_key(files, tmp_path):
    key = "first_stage_model.decoder.mid.block_1.norm1.bias"
    path = _without(files["fp16"], tmp_path / "m.safetensors", drop={key})
    msg = _error(load_checkpoint, path)
    assert repr(key) in msg and "missing" in msg


def test_mis_shaped_key(files, tmp_path):
    key = U + "out.0.bias"
    written = load_file(str(files["fp16"]))
    n = written[key].shape[0]
    path = _without(
        files["fp16"], tmp_path / "s.safetensors", replace={key: torch.zeros(n + 1, dtype=torch.float16)}
    )
    msg = _error(load_checkpoint, path)
    assert repr(key) in msg and f"has shape [{n + 1}]" in msg and f"expects [{n}]" in msg


def test_unexpected_key_inside_component(files, tmp_path):
    key = U + "input_blocks.0.0.extra"
    path = _without(
        files["fp16"], tmp_path / "x.safetensors", replace={key: torch.zeros(2, dtype=torch.float16)}
    )
    assert repr(key) in _error(load_checkpoint, path)


def test_config_errors_are_wrapped_with_the_file_name(files, tmp_path):
    written = load_file(str(files["fp16"]))
    drop = {k for k in written if k.startswith(U + "out.2.")}  # from_state_dict reads out channels here
    path = _without(files["fp16"], tmp_path / "c.safetensors", drop=drop)
    msg = _error(load_checkpoint, path)
    assert "cannot read the SD1.x UNet configuration" in msg and "out.2.weight" in msg


def test_missing_vae_asks_for_one(files, tmp_path):
    written = load_file(str(files["fp16"]))
    path = _without(
        files["fp16"],
        tmp_path / "novae.safetensors",
        drop={k for k in written if k.startswith("first_stage_model.")},
    )
    assert "no VAE" in _error(load_checkpoint, path)
    loaded = load_checkpoint(path, vae_path=files["fp16_seed1"])
    assert loaded.vae is not None


# ------------------------------------------------------------------------------------------- families

SD15_UNET = {
    U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    U + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    U + "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    U + "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
    U + "output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
    U + "out.2.weight": (4, 320, 3, 3),
}
SD15 = {
    **SD15_UNET,
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}
SD2 = {
    **SD15_UNET,
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    U + "input_blocks.1.1.proj_in.weight": (320, 320),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
}
SDXL = {
    **SD15_UNET,
    U + "label_emb.0.0.weight": (1280, 2816),
    U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
}
SDXL_REFINER = {
    **SD15_UNET,
    U + "input_blocks.0.0.weight": (384, 4, 3, 3),
    U + "label_emb.0.0.weight": (1536, 2560),
    "conditioner.embedders.0.model.ln_final.weight": (1280,),
}
FLUX_BARE = {
    "img_in.weight": (3072, 64),
    "txt_in.weight": (3072, 4096),
    "time_in.in_layer.weight": (3072, 256),
    "vector_in.in_layer.weight": (3072, 768),
    "guidance_in.in_layer.weight": (3072, 256),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "final_layer.linear.weight": (64, 3072),
}
FLUX = {U + k: v for k, v in FLUX_BARE.items()} | {
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,),
    "vae.decoder.conv_in.weight": (512, 16, 3, 3),
}
SD3 = {U + "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)} | {
    U + f"joint_blocks.{i}.x_block.mlp.fc1.weight": (6144, 1536) for i in range(6)
}
VAE_LDM = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
}


def _with(shapes, key, shape):
    return {**shapes, key: shape}


def _without_keys(shapes, *drop):
    return {k: v for k, v in shapes.items() if k not in drop}


FAMILY_CASES = [
    ("sd15", SD15, "sd15", "base", "eps"),
    ("sd15-inpaint", _with(SD15, U + "input_blocks.0.0.weight", (320, 9, 3, 3)), "sd15", "inpaint", "eps"),
    ("sd15-pix2pix", _with(SD15, U + "input_blocks.0.0.weight", (320, 8, 3, 3)), "sd15", "pix2pix", "eps"),
    ("sd15-vpred-key", _with(SD15, "v_pred", ()), "sd15", "base", "v"),
    ("sd2", SD2, "sd2", "base", "v"),
    (
        "sd2-by-clip-only",
        _with(SD2, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
        "sd2",
        "base",
        "v",
    ),
    ("sdxl", SDXL, "sdxl", "base", "eps"),
    ("sdxl-inpaint", _with(SDXL, U + "input_blocks.0.0.weight", (320, 9, 3, 3)), "sdxl", "inpaint", "eps"),
    ("sdxl-vpred", _with(SDXL, "v_pred", ()), "sdxl", "base", "v"),
    ("playground", SDXL | {"edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)}, "sdxl", "base", "edm"),
    ("sdxl-refiner", SDXL_REFINER, "sdxl_refiner", "base", "eps"),
    ("flux-dev", FLUX, "flux", "dev", "flow"),
    ("flux-schnell", _without_keys(FLUX, U + "guidance_in.in_layer.weight"), "flux", "schnell", "flow"),
    ("flux-fill", _with(FLUX, U + "img_in.weight", (3072, 384)), "flux", "fill", "flow"),
    ("flux-bfl-dev", FLUX_BARE, "flux", "dev", "flow"),
    ("flux-bfl-schnell", _without_keys(FLUX_BARE, "guidance_in.in_layer.weight"), "flux", "schnell", "flow"),
    ("sd3", SD3, "sd3", "base", "flow"),
]


@pytest.mark.parametrize(
    "name,shapes,family,variant,prediction", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES]
)
def test_family_detection(name, shapes, family, variant, prediction):
    info = detect("x.safetensors", shapes, {k: "float16" for k in shapes})
    assert (info.family, info.variant, info.prediction) == (family, variant, prediction)
    assert info.dtype == "float16"


def test_sd15_component_keys_and_dtype():
    dtypes = {k: "bfloat16" for k in SD15} | {U + "out.2.weight": "float32"}
    info = detect("x.safetensors", SD15 | {"alphas_cumprod": (1000,), "model_ema.decay": ()}, dtypes)
    assert info.prefixes == {"unet": U, "text_encoder": "cond_stage_model.transformer."}
    assert set(info.component_keys["unet"]) == set(SD15_UNET)
    assert info.component_keys["text_encoder"] == (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    )
    assert info.dtype == "bfloat16"  # the dominant UNet dtype, not the one fp32 outlier
    assert info.label == "SD1.x"


@pytest.mark.parametrize("std,prediction", [(0.2, "v"), (0.02, "eps")])
def test_sd2_v_prediction_heuristic_reads_one_bias(std, prediction):
    key = U + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    read_keys = []

    def read(k):
        read_keys.append(k)
        return torch.randn(320, generator=torch.Generator().manual_seed(0)) * std

    info = detect("x.safetensors", SD2, {}, read=read)
    assert info.prediction == prediction and read_keys == [key]
    assert any("0.09" in n for n in info.notes)


OTHER_CASES = [
    (
        "lora-kohya",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
        },
        "lora",
        None,
    ),
    ("lora-peft", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (8, 320)}, "lora", None),
    ("lora-lycoris", {"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": (8, 8)}, "lora", None),
    (
        "diffusers-unet",
        {
            "conv_in.weight": (320, 4, 3, 3),
            "time_embedding.linear_1.weight": (1280, 320),
            "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
        },
        "diffusers",
        "unet",
    ),
    (
        "diffusers-flux",
        {
            "x_embedder.weight": (3072, 64),
            "context_embedder.weight": (3072, 4096),
            "transformer_blocks.0.attn.to_q.weight": (3072, 3072),
            "single_transformer_blocks.0.proj_out.weight": (3072, 15360),
        },
        "diffusers",
        "transformer",
    ),
    (
        "diffusers-vae",
        {
            "encoder.conv_in.weight": (128, 3, 3, 3),
            "decoder.conv_in.weight": (512, 4, 3, 3),
            "decoder.up_blocks.0.resnets.0.norm1.weight": (512,),
        },
        "diffusers",
        "vae",
    ),
    ("vae-sd", VAE_LDM, "vae", "sd"),
    ("vae-prefixed", {"first_stage_model." + k: v for k, v in VAE_LDM.items()}, "vae", "sd"),
    (
        "vae-flux",
        _with(_without_keys(VAE_LDM, "quant_conv.weight"), "decoder.conv_in.weight", (512, 16, 3, 3)),
        "vae",
        "flux",
    ),
    ("clip-l", {"text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}, "text_encoder", "base"),
    (
        "t5",
        {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096), "shared.weight": (32128, 4096)},
        "text_encoder",
        "base",
    ),
    ("unet-only", {"input_blocks.0.0.weight": (320, 4, 3, 3)}, "unet_only", "base"),
    ("unknown", {"foo.weight": (3, 3), "bar.bias": (3,)}, "unknown", "base"),
    (
        "unknown-unet",
        _with(SD15_UNET, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 4096)),
        "unknown",
        "base",
    ),
]


@pytest.mark.parametrize("name,shapes,family,variant", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_kinds_detection(name, shapes, family, variant):
    info = detect("x.safetensors", shapes, {})
    assert info.family == family
    if variant is not None:
        assert info.variant == variant


REJECTIONS = [
    # loadable now: a combined file that lacks a part names it
    ("flux", FLUX, "the checkpoint has no second text encoder (no text_encoders.t5xxl.transformer.* keys)"),
    ("flux-bfl", FLUX_BARE, "holds only the Flux.1 diffusion model; its text encoder must come from a separate file"),
    ("sd3", SD3, "is an SD3 checkpoint; SD3 support"),
    ("lora", OTHER_CASES[0][1], "is a LoRA, not a checkpoint; put it in the loras folder"),
    ("diffusers", OTHER_CASES[3][1], "diffusers-format unet file"),
    ("vae", VAE_LDM, "standalone VAE"),
    ("unknown", {"foo.weight": (3, 3)}, "does not look like a Stable Diffusion checkpoint"),
]


@pytest.mark.parametrize("name,shapes,expect", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_unsupported_files_are_rejected_with_their_kind(tmp_path, name, shapes, expect):
    # Same marker keys and ranks, first dimensions shrunk to 1 so the files stay tiny.
    small = {k: (1, *s[1:]) if s else s for k, s in shapes.items()}
    path = _write_shapes(tmp_path / f"{name}.safetensors", small)
    assert expect in _error(load_checkpoint, path)


def test_inspect_reads_header_only(files, monkeypatch):
    """Inspecting a safetensors file never opens the tensor data."""
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", None)
    info = inspect_checkpoint(files["fp16"])
    assert info.family == "sd15" and info.dtype == "float16" and info.format == "safetensors"


def test_header_inspection_needs_no_torch(files):
    """The UI thread may classify files: detect + header parsing import nothing heavy."""
    import subprocess
    import sys

    code = (
        "import sys; from core.models.detect import inspect_header; "
        f"i = inspect_header({str(files['fp16'])!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(i.family, i.variant, i.dtype)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sd15", "base", "float16"]


def test_concurrent_loads_restore_module_construction(files):
    """Two loads at once must not leave nn.Module building parameters on the meta device."""
    import threading

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(load_checkpoint(files["fp16"]))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
