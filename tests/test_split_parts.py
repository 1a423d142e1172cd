"""Models kept as separate files: part detection and quantisation labels, the auto-pick and its messages, the
``text_encoders`` field, loading a split set (= the combined file), fp8 and GGUF parts kept packed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import CheckpointError, ModelNotFoundError, RequestError
from core.metadata import format_infotext, infotext_to_request
from core.models import testing
from core.models.checkpoint import load_checkpoint, load_components, part_prefix
from core.models.families import FAMILIES
from core.models.quant import QuantizedEmbedding, QuantizedLinear, module_bytes
from core.models.registry import ModelRegistry
from core.models.safetensors_writer import save_tensors
from core.models.split import resolve_parts
from core.request import GenerationRequest
from tests.family_files import write_header_only

FLUX = FAMILIES["flux"]
NETWORKS = {  # the Flux networks our modules already have (the flux helper's branch names them in FLUX itself)
    "unet": ("core.models.flux:FluxConfig", "core.models.flux:Flux"),
    "text_encoder": ("core.models.clip:CLIPTextConfig", "core.models.clip:CLIPTextModel"),
    "text_encoder_2": ("core.models.t5:T5Config", "core.models.t5:T5EncoderModel"),
}


def hooked_flux() -> object:
    """FLUX with every component loadable, and a conditioner name so load_checkpoint takes it as runnable."""
    components = tuple(
        dataclasses.replace(c, config=NETWORKS[c.role][0], network=NETWORKS[c.role][1]) if c.role in NETWORKS else c
        for c in FLUX.components
    )
    return dataclasses.replace(FLUX, components=components, conditioner="tests:unused")


def gguf_name_map(hf_names) -> dict[str, str]:
    """HF T5 name -> llama.cpp's (the inverse of gguf_file.t5_name), checked by the round trip."""
    import gguf

    from core.models.gguf_file import t5_name

    names = {"token_embd.weight", "enc.output_norm.weight", "enc.blk.0.attn_rel_b.weight"}
    for template in (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5ENCODER]):
        if template.startswith("enc.blk."):
            names |= {template.format(bid=b) + ".weight" for b in range(4)}
    inverse = {t5_name(n): n for n in names}
    return {k: inverse[k] for k in hf_names}


def q8_types(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Q8_0 for every matrix whose rows are whole blocks, F32 for the rest (as GGUF converters keep norms)."""
    return {k: "Q8_0" for k, v in tensors.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("ComfyUI")
    files = testing.write_random_flux_split_set(root)
    # a GGUF diffusion model and a GGUF T5, an fp8 T5, a 4-channel SD VAE
    models = root / "models"
    flux = testing.random_flux_transformer_state_dict("schnell", seed=5, dtype=torch.float32)
    files["gguf_model"] = testing.write_random_gguf(models / "unet" / "flux1-schnell-Q8_0.gguf", flux, q8_types(flux))
    t5 = testing.random_t5_state_dict(seed=6, dtype=torch.float32)
    names = gguf_name_map(t5)
    gguf_t5 = {names[k]: v for k, v in t5.items()}
    files["gguf_t5"] = testing.write_random_gguf(models / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf", gguf_t5,
                                                 q8_types(gguf_t5), arch="t5encoder")
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v.half() for k, v in t5.items()}
    (root / "elsewhere").mkdir()
    files["fp8_t5"] = save_tensors(fp8, root / "elsewhere" / "t5xxl_fp8_e4m3fn.safetensors")
    files["sd_vae"] = save_tensors(testing.random_vae_state_dict("sd15"), models / "vae" / "sd-vae.safetensors")
    return root, files


# ---- registry: folders, detection by keys, quantisation labels --------------------------------------------


def test_registry_detects_each_part_and_its_quantisation(comfy):
    root, files = comfy
    registry = ModelRegistry([root])
    assert {m.name for m in registry.checkpoints()} == {"flux1-dev", "flux1-schnell-Q8_0"}
    infos = {m.name: registry.inspect(m) for m in (*registry.checkpoints(), *registry.text_encoders(), *registry.vaes())}
    seen = {name: (i.family, i.part, i.quant, i.split) for name, i in infos.items()}
    assert seen == {
        "flux1-dev": ("flux", None, "bf16", True),
        "flux1-schnell-Q8_0": ("flux", None, "Q8_0", True),
        "clip_l": ("text_encoder", "clip_l", "fp16", False),
        "t5xxl_fp16": ("text_encoder", "t5xxl", "fp16", False),
        "t5-v1_1-xxl-encoder-Q8_0": ("text_encoder", "t5xxl", "Q8_0", False),
        "ae": ("vae", "flux_vae", "fp32", False),
        "sd-vae": ("vae", "sd_vae", "fp32", False),
    }
    assert infos["flux1-schnell-Q8_0"].variant == "schnell"
    assert registry.inspect(files["fp8_t5"]).quant == "fp8"
    assert [m.name for m in registry.parts_of("t5xxl")] == ["t5-v1_1-xxl-encoder-Q8_0", "t5xxl_fp16"]


@pytest.mark.parametrize("layout", ["comfyui-legacy", "forge"])
def test_other_folder_layouts(tmp_path, layout):
    files = testing.write_random_flux_split_set(tmp_path, layout, parts=("clip_l", "t5xxl"))
    registry = ModelRegistry([tmp_path])
    assert registry.find_checkpoint("flux1-dev") == files["model"]
    assert registry.find_text_encoder("clip_l") == files["clip_l"]
    assert [m.path for m in registry.parts_of("t5xxl")] == [files["t5xxl"]]


def test_list_models_shows_quant_and_parts(comfy):
    import io

    from cli.list_models import list_models

    out = io.StringIO()
    assert list_models([comfy[0]], out, io.StringIO()) == 0
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines() if line.strip()}
    assert rows["flux1-schnell-Q8_0"][1:4] == ["Flux.1", "schnell", "Q8_0"]
    assert "diffusion model only" in " ".join(rows["flux1-dev"])
    assert rows["text_encoders/t5xxl_fp16"][1:6] == ["a", "T5-XXL", "text", "encoder", "fp16"]
    assert rows["vae/ae"][1:-2] == ["a", "16-channel", "Flux.1", "VAE", "fp32"]


# ---- auto-pick and its messages ----------------------------------------------------------------------------


def test_parts_picked_by_type_and_said(comfy):
    root, files = comfy
    registry = ModelRegistry([root])
    parts = resolve_parts(registry, files["model"], ["t5xxl_fp16"])
    assert parts.parts == {"text_encoder": files["clip_l"], "text_encoder_2": files["t5xxl"], "vae": files["vae"]}
    assert parts.picked == ("text_encoder", "vae")  # the job named the T5
    assert parts.picked_message() == ("using text encoder clip_l.safetensors and VAE ae.safetensors (picked from "
                                      "the models folders by type)")
    assert parts.infotext() == {"Text encoders": "clip_l.safetensors, t5xxl_fp16.safetensors", "VAE": "ae.safetensors"}
    other = resolve_parts(registry, files["model"], ["t5xxl_fp16"], vae="ae")
    assert other.key == parts.key and other.picked == ("text_encoder",)
    assert resolve_parts(registry, files["model"], ["t5-v1_1-xxl-encoder-Q8_0"]).key != parts.key
    # of two T5s, the one stored like the diffusion model: fp16 beside a bf16 model, GGUF beside a GGUF model
    assert resolve_parts(registry, files["model"]).parts["text_encoder_2"] == files["t5xxl"]
    assert resolve_parts(registry, files["gguf_model"]).parts["text_encoder_2"] == files["gguf_t5"]


def test_each_missing_part_is_one_message(tmp_path):
    files = testing.write_random_flux_split_set(tmp_path, parts=("clip_l",))
    (tmp_path / "models" / "vae").rmdir()
    registry = ModelRegistry([tmp_path])
    with pytest.raises(ModelNotFoundError) as e:
        resolve_parts(registry, files["model"])
    models = tmp_path / "models"
    assert str(e.value) == (
        f"Flux.1 needs a T5-XXL text encoder: none in {models / 'text_encoders'}; put t5xxl_fp16.safetensors or "
        f"t5xxl_fp8_e4m3fn.safetensors there (or name one in text_encoders); Flux.1 needs a 16-channel Flux.1 VAE: "
        f"none in {models / 'vae'}, {models / 'VAE'}; put ae.safetensors there (or name one in vae)"
    )


def test_a_named_file_of_the_wrong_kind(comfy):
    root, files = comfy
    registry = ModelRegistry([root])
    with pytest.raises(RequestError, match=r"text_encoders\[1\] = 'clip_l' is invalid: clip_l.safetensors is a "
                                           r"CLIP-L text encoder, and Flux.1 takes one, named before it"):
        resolve_parts(registry, files["model"], ["clip_l", "clip_l"])
    with pytest.raises(RequestError, match=r"text_encoders\[0\] = '.*sd-vae.safetensors' is invalid: sd-vae.safetensors "
                                           r"is a 4-channel SD VAE, not a text encoder Flux.1 takes \(CLIP-L text "
                                           r"encoder, T5-XXL text encoder\)"):
        resolve_parts(registry, files["model"], [str(files["sd_vae"])])


def test_combined_files_need_no_parts(tmp_path):
    path = write_header_only(tmp_path / "checkpoints" / "sd.safetensors", "sd15")
    parts = resolve_parts(ModelRegistry([tmp_path]), path)
    assert (parts.parts, parts.picked) == ({}, ())


# ---- the request field --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("t5xxl_fp16", "text_encoders = 't5xxl_fp16' is invalid: a list of text encoder file names or paths"),
    ([""], "text_encoders[0] = '' is invalid: the name or path of a text encoder file"),
    (["a", 3], "text_encoders[1] = 3 is invalid"),
    (["a", "a"], "text_encoders[1] = 'a' is invalid: a text encoder not already in the list"),
    (["a", "b", "c", "d", "e"], "at most 4 text encoders"),
])
def test_text_encoders_validation(value, message):
    with pytest.raises(RequestError) as e:
        GenerationRequest.from_dict({"model": "flux1-dev", "text_encoders": value})
    assert message in str(e.value)


def test_text_encoders_round_trip_request_and_infotext():
    request = GenerationRequest.from_dict({"model": "flux1-dev", "text_encoders": ["clip_l", "t5/t5xxl_fp16.safetensors"]})
    assert request.text_encoders == ("clip_l", "t5/t5xxl_fp16.safetensors")
    assert GenerationRequest.from_dict(request.to_dict()) == request
    text = format_infotext(request, 1)
    assert 'Text encoders: "clip_l, t5xxl_fp16.safetensors"' in text
    assert infotext_to_request(text).text_encoders == ("clip_l", "t5xxl_fp16.safetensors")
    picked = format_infotext(GenerationRequest(model="flux1-dev"), 1, extra={"Text encoders": "a.safetensors"})
    assert infotext_to_request(picked).text_encoders == ("a.safetensors",)


# ---- loading ------------------------------------------------------------------------------------------------


def _combined(files: dict[str, Path], path: Path) -> Path:
    from safetensors.torch import load_file

    prefixes = {"model": "model.diffusion_model.", "clip_l": "text_encoders.clip_l.transformer.",
                "t5xxl": "text_encoders.t5xxl.transformer.", "vae": "vae."}
    tensors = {prefixes[name] + k: v for name, prefix in prefixes.items() for k, v in load_file(files[name]).items()}
    return save_tensors(tensors, path)


def _outputs(modules: dict) -> list[torch.Tensor]:
    """Each network run on fixed inputs (the T5 and CLIP on token ids, the VAE decoding, the transformer)."""
    from core.models.flux import img_ids, pack_latents, txt_ids

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 7), generator=gen)
    latent = torch.randn(1, 16, 4, 4, generator=gen)
    t5 = modules["text_encoder_2"](ids)
    pooled = modules["text_encoder"].encode(ids).pooled
    vae = modules["vae"].decode(latent)
    flux = modules["unet"](pack_latents(latent), img_ids(4, 4), t5, txt_ids(7), torch.tensor([0.5]),
                           pooled, guidance=torch.tensor([3.5]))
    return [t5, pooled, vae, flux]


def test_split_set_loads_like_the_combined_file(comfy, tmp_path, monkeypatch):
    _, files = comfy
    spec = hooked_flux()
    combined = _combined(files, tmp_path / "flux1-dev-combined.safetensors")
    from_one = load_components(spec, {c.role: (combined, c.prefix) for c in spec.components}, dtype=torch.float32)
    parts = {"text_encoder": files["clip_l"], "text_encoder_2": files["t5xxl"], "vae": files["vae"]}
    monkeypatch.setitem(FAMILIES, "flux", spec)
    loaded = load_checkpoint(files["model"], parts=parts, dtype=torch.float32)
    assert loaded.family == "flux" and loaded.parts == parts
    for a, b in zip(_outputs(from_one), _outputs(loaded.components), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="holds only the Flux.1 diffusion model; its VAE must come from a separate"):
        load_checkpoint(files["model"], parts={k: v for k, v in parts.items() if k != "vae"})
    with pytest.raises(CheckpointError, match="this is a CLIP-L text encoder, not the T5-XXL text encoder Flux.1 needs"):
        load_checkpoint(files["model"], parts={**parts, "text_encoder_2": files["clip_l"]})


def test_fp8_t5_stays_packed_and_matches_the_torch_upcast(comfy):
    from safetensors.torch import load_file

    _, files = comfy
    spec = hooked_flux()
    component = spec.component("text_encoder_2")
    prefix = part_prefix(files["fp8_t5"], spec, component)
    fp8 = load_components(spec, {"text_encoder_2": (files["fp8_t5"], prefix)}, dtype=torch.float32)["text_encoder_2"]
    assert isinstance(fp8.encoder.block[0].layer[0].SelfAttention.q, QuantizedLinear)
    assert isinstance(fp8.shared, QuantizedEmbedding)
    upcast = {k: v.to(torch.float32) for k, v in load_file(files["fp8_t5"]).items()}
    plain_path = save_tensors(upcast, files["fp8_t5"].with_name("upcast.safetensors"))
    plain = load_components(spec, {"text_encoder_2": (plain_path, "")}, dtype=torch.float32)["text_encoder_2"]
    matrices = sum(v.numel() for v in upcast.values() if v.dim() == 2)
    assert module_bytes(plain) - module_bytes(fp8) == matrices * 3  # 1 byte a weight instead of 4
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(fp8(ids), plain(ids))


def test_gguf_parts_stay_packed_and_match_the_gguf_dequantisation(comfy, tmp_path):
    import gguf
    import numpy as np

    _, files = comfy
    spec = hooked_flux()
    t5 = load_components(spec, {"text_encoder_2": (files["gguf_t5"], "")}, dtype=torch.float32)["text_encoder_2"]
    unet = load_components(spec, {"unet": (files["gguf_model"], "")}, dtype=torch.float32)["unet"]
    assert isinstance(t5.encoder.block[1].layer[1].DenseReluDense.wi_0, QuantizedLinear)
    assert isinstance(unet.double_blocks[0].img_attn.qkv, QuantizedLinear)
    from core.models.gguf_file import GGUFFile

    for path, module in ((files["gguf_t5"], t5), (files["gguf_model"], unet)):
        reader = gguf.GGUFReader(path)
        names = GGUFFile(path).state_names()
        dequantised = {names[t.name]: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
                       .reshape(tuple(reversed(t.shape.tolist()))).float() for t in reader.tensors}
        plain_path = save_tensors(dequantised, tmp_path / f"{path.stem}-dequantised.safetensors")
        role = "text_encoder_2" if module is t5 else "unet"
        plain = load_components(spec, {role: (plain_path, "")}, dtype=torch.float32)[role]
        assert module_bytes(module) < module_bytes(plain) * 0.4  # Q8_0: 34 bytes a block of 32 instead of 128
        for name, layer in module.named_modules():
            if isinstance(layer, QuantizedLinear):
                assert torch.equal(layer.weight, plain.get_submodule(name).weight), name
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(t5(ids), load_components(spec, {"text_encoder_2": (tmp_path / "t5-v1_1-xxl-encoder-Q8_0-"
                          "dequantised.safetensors", "")}, dtype=torch.float32)["text_encoder_2"](ids), atol=1e-6)


def test_gguf_of_another_part_is_one_message(comfy):
    _, files = comfy
    spec = hooked_flux()
    with pytest.raises(CheckpointError, match=r"this GGUF is an image model \(architecture 'flux'\), not a T5-XXL text "
                                              r"encoder, whose GGUF files have architecture 't5', 't5encoder'"):
        part_prefix(files["gguf_model"], spec, spec.component("text_encoder_2"))
    with pytest.raises(CheckpointError, match=r"not a Flux.1 diffusion model"):
        load_components(spec, {"unet": (files["gguf_t5"], "")})
    with pytest.raises(CheckpointError, match="cannot be loaded from a GGUF file"):
        part_prefix(files["gguf_t5"], spec, spec.component("text_encoder"))


# ---- batch and pipeline ---------------------------------------------------------------------------------------


def test_batch_refuses_a_job_whose_part_is_missing_before_anything_loads(tmp_path, monkeypatch):
    import textwrap

    from tests.batch_harness import RecordingRunner, batch_runner

    run = batch_runner(tmp_path, monkeypatch, RecordingRunner)
    testing.write_random_flux_split_set(tmp_path, parts=("clip_l", "vae"))
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(textwrap.dedent("""
        [[job]]
        model = "flux1-dev"
        steps = 1
    """))
    code, _, err = run(str(jobs))
    assert code == 3 and RecordingRunner.seen == []
    assert "jobs.toml: job 1: Flux.1 needs a T5-XXL text encoder: none in " in err
    jobs.write_text('[[job]]\nmodel = "flux1-dev"\nsteps = 1\ntext_encoders = ["nope"]\n')
    code, _, err = run(str(jobs))
    assert code == 3 and "text encoder 'nope' not found" in err


class _Ctx:
    def __init__(self) -> None:
        self.activities: list[str] = []

    def set_activity(self, text: str) -> None:
        self.activities.append(text)


def test_pipeline_loads_the_set_once_and_reloads_when_a_part_changes(comfy, monkeypatch):
    import core.pipeline as pipeline

    root, files = comfy
    loads = []

    class Loaded:
        def __init__(self, path, vae_path, parts):
            self.key = (str(path), str(vae_path), tuple(f"{r}={p}" for r, p in sorted(parts.items())))
            self.dtype = torch.float32
            self.name = Path(path).name  # the memory placement names a model by it
            self.conditioner = SimpleNamespace()  # the runner hands it the embedding library

    def fake_load(path, *, vae_path=None, device=None, parts=None, **_):
        loads.append((path, vae_path, parts))
        return Loaded(path, vae_path, parts)

    monkeypatch.setattr(pipeline, "load_model", fake_load)
    runner = pipeline.PipelineRunner(registry=ModelRegistry([root]), device="cpu", previews=False)
    ctx = _Ctx()
    request = GenerationRequest(model="flux1-dev", text_encoders=("t5xxl_fp16",))
    runner.ensure_model(request, ctx)
    runner.ensure_model(request, ctx)
    assert loads == [(files["model"], files["vae"], {"text_encoder": files["clip_l"], "text_encoder_2": files["t5xxl"]})]
    assert ctx.activities == ["loading flux1-dev.safetensors; using text encoder clip_l.safetensors and VAE "
                              "ae.safetensors (picked from the models folders by type)"]
    assert runner.parts.infotext()["Text encoders"] == "clip_l.safetensors, t5xxl_fp16.safetensors"
    runner.ensure_model(request.replace(text_encoders=("t5-v1_1-xxl-encoder-Q8_0",)), ctx)
    assert len(loads) == 2 and loads[1][2]["text_encoder_2"] == files["gguf_t5"]


# ---- the stdlib GGUF header reader (registry listings) -------------------------------------------------------


def test_stdlib_gguf_header_reads_what_gguf_reads(comfy):
    from core.models.checkpoint import GGUFSource
    from core.models.gguf_header import read_gguf_header

    for name in ("gguf_model", "gguf_t5"):
        header, source = read_gguf_header(comfy[1][name]), GGUFSource(comfy[1][name])
        assert (header.shapes, header.dtypes) == (source.shapes, source.dtypes)
        assert header.architecture == source.file.architecture


def test_stdlib_gguf_header_refuses_hostile_headers(tmp_path):
    import struct

    from core.models.gguf_header import read_gguf_header
    from tests.test_gguf_file import _field, _header

    cases = [_header(version=1), b"GGUF\x03\x00", _header(n_tensors=2**63, n_fields=0), _header(n_fields=2**62),
             _header(fields=_field(b"general.x", 9, struct.pack("<IQ", 5, 2**61))),
             _header(fields=_field(b"tok", 9, struct.pack("<IQ", 8, 2**40))),
             _header(fields=_field(b"k", 8, struct.pack("<Q", 2**60) + b"abc")), b"GGU", b"NOTAGGUF"]
    for i, data in enumerate(cases):
        path = tmp_path / f"hostile{i}.gguf"
        path.write_bytes(data)
        with pytest.raises(CheckpointError):
            read_gguf_header(path)
        info = ModelRegistry([tmp_path]).inspect(path)
        assert info.family is None and info.problem, info


def test_qwen3_gguf_names_are_the_checkpoint_names():
    """llama.cpp's Qwen3 tensor names, mapped, are transformers' Qwen3ForCausalLM keys (ComfyUI's qwen_3_4b
    layout), so a Qwen3 text encoder GGUF loads into the same network as the .safetensors."""
    import gguf
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from core.models.gguf_header import state_name

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    with torch.device("meta"):
        expected = set(Qwen3ForCausalLM(config).state_dict())
    names = set()
    for template in (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]):
        if template != "rope_freqs":
            names |= {template.format(bid=b) + ".weight" for b in range(2)} if "{bid}" in template else {template + ".weight"}
    assert {state_name(n, "qwen3") for n in names} == expected


def test_an_fp8_sd_checkpoint_stays_packed_and_generates(tmp_path):
    """The packed layers are generic: an fp8 SD1.x checkpoint (UNet convs and linears, CLIP, VAE) keeps its
    weights at one byte each and generates; a LoRA (convs and linears) applies at forward time and comes off."""
    import math

    from core.lora.files import LoraFileCache
    from core.lora.patch import activate
    from core.lora.tags import LoraRef
    from core.models.quant import QuantizedConv2d
    from core.models.safetensors_header import read_header
    from core.pipeline import generate, load_model

    fp8 = testing.write_random_checkpoint(tmp_path / "fp8.safetensors", "sd15", dtype=torch.float8_e4m3fn)
    packed = load_model(fp8, compute_hash=False)  # computes in fp32 on the CPU
    unet = packed.checkpoint.unet
    assert isinstance(unet.input_blocks[0][0], QuantizedConv2d)
    shapes = read_header(fp8).shapes
    matrices = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.diffusion_model.") and len(s) > 1)
    vectors = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.diffusion_model.") and len(s) == 1)
    assert module_bytes(unet) == matrices + 4 * vectors  # one byte a weight; biases and norms in fp32
    request = GenerationRequest(model="fp8", prompt="a lighthouse", steps=1, cfg=1.0, width=64, height=64, seed=1)
    image = generate(packed, request)[0][0]
    assert image.size == (64, 64) and len(set(image.getdata())) > 1
    lora = testing.write_random_lora(tmp_path / "detail.safetensors", "sd15", fmt="locon", strength=1.0)
    raw = unet.input_blocks[1][0].in_layers[2].weight_raw.clone()
    assert activate(packed.loras, [LoraRef("detail")], lambda name: lora, LoraFileCache()) == []
    assert packed.loras.merged_weights > 0
    assert generate(packed, request.replace(prompt="a lighthouse <lora:detail>"))[0][0].tobytes() != image.tobytes()
    activate(packed.loras, [], lambda name: lora, LoraFileCache())
    assert all(getattr(m, "weight_patch", None) is None for m in unet.modules())  # off (tests/test_lora_packed.py)
    assert torch.equal(unet.input_blocks[1][0].in_layers[2].weight_raw, raw)


def test_t5_part_with_the_tied_embedding_copy_and_decoder_keys(tmp_path):
    """Some T5 exports keep ``encoder.embed_tokens.weight`` (tied to ``shared``) and even the decoder: the part
    loads from the encoder's keys alone."""
    spec = hooked_flux()
    t5 = testing.random_t5_state_dict(seed=3, dtype=torch.float32)
    plain = save_tensors(t5, tmp_path / "t5.safetensors")
    extra = {**t5, "encoder.embed_tokens.weight": t5["shared.weight"], "decoder.final_layer_norm.weight": torch.ones(32)}
    full = save_tensors(extra, tmp_path / "t5-full.safetensors")
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(4))
    outputs = [load_components(spec, {"text_encoder_2": (p, part_prefix(p, spec, spec.component("text_encoder_2")))},
                               dtype=torch.float32)["text_encoder_2"](ids) for p in (plain, full)]
    assert torch.equal(*outputs)


@pytest.mark.parametrize(
    ("shapes", "kind", "prefix"),
    [
        ({"model.layers.0.self_attn.q_norm.weight": (128,), "model.embed_tokens.weight": (151936, 2560)}, "qwen3_4b", ""),
        ({"model.layers.0.self_attn.q_norm.weight": (128,), "model.embed_tokens.weight": (151936, 4096)}, "qwen3_8b", ""),
        ({"text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_norm.weight": (128,),
          "text_encoders.qwen3_4b.transformer.model.embed_tokens.weight": (151936, 2560)},
         "qwen3_4b", "text_encoders.qwen3_4b.transformer."),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 32, 3, 3),
          "bn.running_mean": (128,)}, "flux2_vae", ""),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)}, "flux_vae", ""),
    ],
)
def test_2026_part_kinds_detected_by_keys(shapes, kind, prefix):
    from core.models.parts import detect_part

    match = detect_part(shapes)
    assert (match.kind, match.prefix) == (kind, prefix)


def test_qwen2_text_encoder_is_not_a_qwen3_part():
    from core.models.parts import detect_part

    # Qwen2.5 (Qwen-Image's encoder) has the same names but no per-head q_norm
    assert detect_part({"model.layers.0.self_attn.q_proj.weight": (2048, 2048),
                        "model.embed_tokens.weight": (151936, 2048)}) is None
