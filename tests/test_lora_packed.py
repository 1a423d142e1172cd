"""LoRAs on packed (fp8 / GGUF) weights, applied at forward time: a Flux transformer with fp8 or GGUF Q8_0 weights
and a LoRA gives the output of the dequantised transformer with the LoRA merged; removing the LoRAs gives back
the plain packed output bit for bit (the packed bytes are never written); and ``darkroom --batch`` runs a Flux
LoRA on a GGUF Q8_0 transformer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.lora.files import LoraFileCache
from core.lora.patch import LoraPatcher, activate
from core.lora.tags import LoraRef
from core.models.families import FAMILIES
from core.models.flux import Flux, FluxConfig
from core.models.quant import QuantizedLinear, QuantizedTensor, assign_weights
from core.models.safetensors_writer import save_tensors
from core.models.testing import random_flux_lora_state_dict, random_flux_transformer_state_dict
from tests.batch_harness import run_jobs
from tests.reference import psnr, torch_threads

CFG = FluxConfig.preset("flux", "tiny", "dev")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return random_flux_transformer_state_dict("dev", "tiny", seed=0, dtype=torch.float32)


def _q8_0(weight: torch.Tensor) -> QuantizedTensor:
    """GGUF Q8_0 of a float weight as gguf.quants writes it (fp16 scale d = max|x| / 127, int8 q = round(x / d))."""
    gguf = pytest.importorskip("gguf")
    data = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return QuantizedTensor(torch.from_numpy(data.copy()), "Q8_0", weight.shape)


def _packed(base, kind: str) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The transformer's matrices packed as fp8 (e4m3fn, with a ComfyUI per-layer scale) or GGUF Q8_0."""
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for key, value in base.items():
        if value.ndim != 2 or value.shape[-1] % 32:
            out[key] = value
        elif kind == "fp8":
            scale = float(value.abs().max()) / 448
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".scale_weight"] = torch.tensor(scale)
        else:
            out[key] = _q8_0(value)
    return out


def _flux(tensors, dtype: torch.dtype) -> Flux:
    module = Flux(CFG).to("meta")  # built on meta directly, torch imports torch._dynamo (seconds)
    swapped = assign_weights(module, tensors, dtype=dtype)
    return module.eval(), swapped


def _dequantised(packed: Flux) -> Flux:
    """The same weights as an ordinary float model: every packed layer's weight dequantised once."""
    from core.models.quant.layers import _Packed

    state = dict(packed.state_dict())
    for name, layer in packed.named_modules():
        if isinstance(layer, _Packed):
            state.pop(name + ".weight_raw")
            state[name + ".weight"] = layer.weight
    module = Flux(CFG).to(next(iter(state.values())).dtype)
    module.load_state_dict(state)
    return module.eval()


def _inputs(seed: int = 1) -> dict:
    from core.models.flux import img_ids, pack_latents, txt_ids

    g = torch.Generator().manual_seed(seed)
    return {"img": pack_latents(torch.randn(1, CFG.in_channels // 4, 8, 8, generator=g)), "img_ids": img_ids(8, 8, 1),
            "txt": torch.randn(1, 5, CFG.context_in_dim, generator=g), "txt_ids": txt_ids(5, 1),
            "timesteps": torch.rand(1, generator=g), "y": torch.randn(1, CFG.vec_in_dim, generator=g),
            "guidance": torch.tensor([3.5])}


def _diffusers_shapes(base) -> dict[str, tuple[int, int]]:
    """diffusers' FluxTransformer2DModel Linear names -> weight shapes, from our key map's own table (split q/k/v
    are row blocks of the fused weight)."""
    from core.lora.flux_keys import diffusers_targets

    names = [k.removesuffix(".weight") for k, v in base.items() if k.endswith(".weight") and v.ndim == 2]
    shapes = {}
    for name, target in diffusers_targets("unet", names).items():
        rows, width = base[target.weight].shape
        if target.rows is not None:
            start, stop = target.rows
            rows = (rows if stop is None else stop * width) - start * width
        if not name.startswith(("double_blocks", "single_blocks")):  # XLabs names
            shapes[name] = (rows, width)
    return shapes


def _lora_file(tmp_path: Path, name: str, fmt: str, seed: int, base=None) -> Path:
    names = _diffusers_shapes(base) if fmt == "diffusers" else None
    tensors = random_flux_lora_state_dict(fmt, seed=seed, diffusers_names=names, strength=1.0)
    return save_tensors(tensors, tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_a_lora_on_packed_weights_equals_the_merge_into_the_dequantised_model_and_comes_off_exactly(
        base, tmp_path, kind):
    packed, swapped = _flux(_packed(base, kind), torch.float32)
    assert "double_blocks.0.img_attn.qkv" in swapped and isinstance(packed.double_blocks[0].img_attn.qkv, QuantizedLinear)
    plain = _dequantised(packed)
    raw = {k: v.clone() for k, v in packed.state_dict().items() if k.endswith("weight_raw")}
    x = _inputs()
    with torch.inference_mode():
        before = packed(**x)
        assert torch.equal(before, plain(**x))  # the dequantised model is the packed one's twin

    files = {"kohya": _lora_file(tmp_path, "kohya", "kohya", 1),  # fused qkv / linear1 layers
             "split": _lora_file(tmp_path, "split", "diffusers", 2, base)}  # q/k/v rows, norm_out's swapped halves
    refs = [LoraRef("kohya", 0.8), LoraRef("split", -0.6)]
    ours, reference = LoraPatcher({"unet": packed}, FAMILIES["flux"]), LoraPatcher({"unet": plain}, FAMILIES["flux"])
    cache = LoraFileCache()
    assert activate(ours, refs, files.__getitem__, cache) == []
    activate(reference, refs, files.__getitem__, cache)
    assert ours.merged_weights == reference.merged_weights == len(swapped)  # the LoRAs cover every packed Linear
    with torch.inference_mode():
        with_lora, expected = packed(**x), plain(**x)
    change = (with_lora - before).abs().max()
    assert change > 1e-2  # the LoRA does something
    # the same float32 ops on the same dequantised weights: equal up to reassociation in the matmuls
    assert torch.allclose(with_lora, expected, rtol=1e-5, atol=1e-5), (with_lora - expected).abs().max()

    activate(ours, [LoraRef("kohya", 0.8)], files.__getitem__, cache)  # switch: one LoRA fewer
    activate(reference, [LoraRef("kohya", 0.8)], files.__getitem__, cache)
    with torch.inference_mode():
        assert torch.allclose(packed(**x), plain(**x), rtol=1e-5, atol=1e-5)

    activate(ours, [], files.__getitem__, cache)
    assert ours.merged_weights == 0
    with torch.inference_mode():
        assert torch.equal(packed(**x), before)  # removed: the plain packed output, bit for bit
    assert all(torch.equal(v, raw[k]) for k, v in packed.state_dict().items() if k in raw)  # bytes untouched


def test_in_bf16_a_packed_model_with_a_lora_computes_what_the_dequantised_model_with_it_merged_does(base, tmp_path):
    """In a 16-bit compute dtype too: the layer adds the LoRA to its bf16 dequantised weight as the merge into a
    bf16 weight does (float32 row blocks, one rounding), so the outputs are the same bits."""
    packed, _ = _flux(_packed(base, "fp8"), torch.bfloat16)
    plain = _dequantised(packed)
    path = _lora_file(tmp_path, "kohya", "kohya", 3)
    for model in (packed, plain):
        activate(LoraPatcher({"unet": model}, FAMILIES["flux"]), [LoraRef("kohya", 0.7)], lambda name: path,
                 LoraFileCache())
    x = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() and k != "img_ids" and k != "txt_ids"
         else v for k, v in _inputs().items()}
    with torch.inference_mode():
        assert torch.equal(packed(**x), plain(**x))
    layer = packed.single_blocks[1].linear1
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, plain.single_blocks[1].linear1.weight)


def test_unquantised_gguf_layers_are_patched_on_a_copy_never_on_their_bytes():
    """GGUF F32/F16/BF16 layers decode to a view of their bytes in their own dtype: a LoRA goes on a copy."""
    from core.lora.files import LoraModule
    from core.lora.keymap import Target
    from core.lora.patch import ForwardDelta

    weight = torch.randn(64, 32)
    for qtype, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16)):
        raw = weight.to(dtype).reshape(-1).view(torch.uint8).clone()
        layer = QuantizedLinear(QuantizedTensor(raw, qtype, (64, 32)), dtype=dtype)
        module = LoraModule("x", "lora", {"up": torch.randn(64, 4), "down": torch.randn(4, 32)}, 4.0)
        layer.weight_patch = ForwardDelta([(None, module, 1.0, Target("unet", "x"))])
        x = torch.randn(3, 32).to(dtype)
        first, second = layer(x), layer(x)
        assert torch.equal(first, second) and torch.equal(layer.weight_raw, raw), qtype
        layer.weight_patch = None
        assert not torch.equal(layer(x), first)


def test_a_lora_that_does_not_fit_a_packed_layer_is_refused_before_anything_runs(base, tmp_path):
    from core.lora import LoraError

    packed, _ = _flux(_packed(base, "fp8"), torch.float32)
    tensors = random_flux_lora_state_dict("kohya", seed=4)
    tensors["lora_unet_img_in.lora_down.weight"] = torch.zeros(4, 8)  # img_in is [64, 64]
    path = save_tensors(tensors, tmp_path / "bad.safetensors")
    patcher = LoraPatcher({"unet": packed}, FAMILIES["flux"])
    with pytest.raises(LoraError, match="module 'lora_unet_img_in' does not fit the model's 'img_in.weight'"):
        activate(patcher, [LoraRef("bad")], lambda name: path, LoraFileCache())
    assert patcher.merged_weights == 0 and all(
        getattr(m, "weight_patch", None) is None for m in packed.modules())  # nothing left half-applied


def test_batch_runs_a_flux_lora_on_a_gguf_transformer(tmp_path, monkeypatch):
    """``darkroom --batch``: a kohya Flux LoRA on a Q8_0 transformer gives (near) the image the same LoRA gives
    on the bf16 transformer the GGUF was made from, and visibly not the image without it."""
    from PIL import Image
    from safetensors.torch import load_file

    from core.models import testing

    root = tmp_path / "ComfyUI"
    files = testing.write_random_flux_split_set(root, variant="dev", seed=3)
    flux = {k: v.float() for k, v in load_file(files["model"]).items()}
    types = {k: "Q8_0" for k, v in flux.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}
    pytest.importorskip("gguf")
    testing.write_random_gguf(root / "models" / "unet" / "flux1-dev-Q8_0.gguf", flux, types)
    (root / "models" / "loras").mkdir()
    save_tensors(random_flux_lora_state_dict("kohya", seed=5, strength=1.0), root / "models" / "loras" / "style.safetensors")
    job = {"prompt": "a lighthouse at dusk <lora:style:1>", "steps": 2, "seed": 21, "width": 64, "height": 64}
    jobs = [{"model": "flux1-dev-Q8_0", **job}, {"model": "flux1-dev", **job},
            {"model": "flux1-dev-Q8_0", **job, "prompt": "a lighthouse at dusk"}]
    paths, _ = run_jobs(jobs, root / "models", tmp_path, monkeypatch)
    gguf_lora, bf16_lora, gguf_plain = (Image.open(p).convert("RGB") for p in paths)
    near, without = psnr(gguf_lora, bf16_lora), psnr(gguf_lora, gguf_plain)
    print(f"Flux.1 Q8_0 + LoRA vs bf16 + LoRA: {near:.1f} dB; vs Q8_0 without the LoRA: {without:.1f} dB")
    assert near >= 30 and without < near - 5
    assert "Lora hashes" in Image.open(paths[0]).text["parameters"]


def test_the_memory_estimate_counts_the_float32_lora_a_packed_model_adds_on_the_device(tmp_path):
    """A merge takes its weight's place (the estimate does not change), but a packed layer adds its LoRA at
    forward time from float32 copies of the module's tensors on its device: the job's estimate counts them in
    the denoiser's weights, and in what sequential offload keeps resident (cached as each block runs)."""
    from safetensors.torch import load_file

    from core.accel.memory import estimate_job
    from core.models import testing
    from core.models.quant.layers import packed_state
    from core.pipeline import PipelineRunner
    from core.request import GenerationRequest

    pytest.importorskip("gguf")
    root = tmp_path / "ComfyUI"
    files = testing.write_random_flux_split_set(root, variant="dev", seed=3)
    flux = {k: v.float() for k, v in load_file(files["model"]).items()}
    types = {k: "Q8_0" for k, v in flux.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}
    testing.write_random_gguf(root / "models" / "unet" / "flux1-dev-Q8_0.gguf", flux, types)
    (root / "models" / "loras").mkdir()
    save_tensors(random_flux_lora_state_dict("kohya", seed=5), root / "models" / "loras" / "style.safetensors")
    runner = PipelineRunner([root / "models"], previews=False)
    plain = GenerationRequest(model="flux1-dev-Q8_0", prompt="a lighthouse", steps=2, width=64, height=64)
    with_lora = plain.replace(prompt="a lighthouse <lora:style:1>")
    model = runner.ensure_model(plain)
    before = estimate_job(model, plain)
    runner.apply_loras(model, with_lora)
    after = estimate_job(model, with_lora)

    lora = runner.lora_files.get(root / "models" / "loras" / "style.safetensors")
    packed = set(packed_state(model.checkpoint.components["unet"]))
    table = model.loras.table
    on_packed = [m for name, m in lora.modules.items() if name in table and table[name].weight in packed]
    assert on_packed and all(m.kind == "lora" for m in on_packed)  # plain LoRAs: no whole-weight working copy
    expected = sum(4 * t.numel() for m in on_packed for t in m.tensors.values())
    assert after.denoiser_weights - before.denoiser_weights == expected
    assert after.resident_weights - before.resident_weights == expected
    runner.apply_loras(model, plain)
    assert estimate_job(model, plain) == before
