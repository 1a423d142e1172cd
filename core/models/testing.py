"""Random-weight checkpoints in the exact single-file layouts real files use.

Tests and benchmarks cannot download weights, so they write files with the real key names, shapes and
dtypes (``size="full"``) or the same structure at a few MB (``size="tiny"``), and load them through the same
code path as a user's checkpoint.

Runtime dependencies only (torch and the stdlib): files are written by ``core.models.safetensors_writer``, not
``safetensors.torch.save_file`` (which needs numpy), so a user's install can make a test checkpoint too
(``scripts/check_runtime_install.sh`` does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch


def _families() -> dict:
    from core.models.families import FAMILIES

    return FAMILIES


def _layout(family: str) -> list:
    """The family's components whose networks exist, in file order; the family module is the layout."""
    f = _families().get(family)
    if f is None or not f.runnable:
        valid = ", ".join(name for name, fam in _families().items() if fam.runnable)
        raise ValueError(f"family {family!r} is not supported yet; valid: {valid}")
    return list(f.components)


def _component(component, size: str, **overrides) -> torch.nn.Module:
    """Build the component on the meta device (no memory) so only its key names and shapes are used."""
    with torch.device("meta"):
        config = component.config_class()(**{**component.presets[size], **overrides})
        return component.network_class()(config)


def random_tensor(key: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights with a sane scale so activations stay O(1) through a deep random network."""
    if key.endswith("running_var"):  # a batch norm's stored variance (FLUX.2 VAE): positive, O(1)
        t = torch.exp(0.5 * torch.randn(shape, generator=generator))
    elif key.endswith(".weight") and len(shape) == 1 or key.endswith(".scale"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=generator)  # norm gains
    elif key.endswith(".bias") or len(shape) <= 1:
        t = 0.05 * torch.randn(shape, generator=generator)
    else:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return t.to(dtype)


def _save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a random file the writers below made: its folder is created first, as a test's models tree."""
    from core.models.safetensors_writer import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(tensors, path, metadata=metadata)


def random_state_dict(
    module: torch.nn.Module, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights for every entry of ``module.state_dict()`` (which may live on meta)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: random_tensor(key, value.shape, generator, dtype if value.is_floating_point() else value.dtype)
        for key, value in module.state_dict().items()
    }


def _schedule_buffers(sampling, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The DDPM buffers LDM checkpoints carry beside the networks, from the family's training schedule."""
    betas = sampling.schedule().betas
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
    }
    return {k: v.to(dtype) for k, v in buffers.items()}


def _prediction_marker(family: str, prediction: str | None):
    """The family module's ``mark_prediction(tensors, prediction)``, which makes random weights look like a
    model of that prediction type to detection (SD2.x's bias guess); None when nothing needs marking."""
    import importlib

    if prediction is None:
        return None
    spec = _families()[family]
    mark = getattr(importlib.import_module(f"core.models.families.{family}"), "mark_prediction", None)
    if mark is None:
        if prediction != spec.sampling.prediction:
            raise ValueError(f"family {family!r} files cannot be written to look like {prediction!r} models")
        return None
    return mark


def iter_random_checkpoint(
    family: str = "sd15",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    prediction: str | None = None,
    inpaint: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a random checkpoint, in file order. ``prediction`` ("eps", "v") makes it look
    like a model of that type to detection where the family guesses from weights (SD2.x); None: the family's
    default (SD2.x: v). ``inpaint``: a dedicated inpainting checkpoint (a UNet of 9 input channels)."""
    layout = _layout(family)
    if size not in ("tiny", "full"):
        raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
    mark = _prediction_marker(family, prediction or _families()[family].sampling.prediction)
    generator = torch.Generator().manual_seed(seed)
    for component in layout:
        module = _component(component, size, **({"in_channels": 9} if inpaint and component.role == "unet" else {}))
        prefix = component.prefix
        tensors = {}
        for key, value in module.state_dict().items():
            tensor_dtype = dtype if value.is_floating_point() else value.dtype
            tensors[prefix + key] = random_tensor(key, value.shape, generator, tensor_dtype)
        if mark is not None and component.role == "unet":
            mark(tensors, prediction or _families()[family].sampling.prediction)
        yield from tensors.items()
        if component.network.endswith(":CLIPTextModel"):
            # Real SD1.x files carry CLIP's position_ids buffer; loaders must tolerate it.
            yield prefix + "text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None]
        if component.network.endswith(":OpenCLIPTextModel"):
            # Real SD2.x/SDXL files keep OpenCLIP's contrastive temperature (ln 100); loaders must skip it.
            yield prefix + "logit_scale", torch.tensor(4.6052, dtype=dtype)
    sampling = _families()[family].sampling
    if sampling.schedule() is not None:
        yield from _schedule_buffers(sampling, dtype).items()


def write_random_checkpoint(
    path: str | Path,
    family: str = "sd15",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    prediction: str | None = None,
    inpaint: bool = False,
) -> Path:
    """Write a single-file ``.safetensors`` checkpoint with random weights in the family's real layout
    (``prediction``, ``inpaint``: see ``iter_random_checkpoint``)."""
    tensors = dict(iter_random_checkpoint(family, size, seed, dtype, prediction, inpaint))
    return _save(tensors, path, metadata={"format": "pt"})


def write_random_flux_checkpoint(
    path: str | Path,
    variant: str = "dev",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """A combined Flux.1 file as ComfyUI saves one (``model.diffusion_model.*``, ``text_encoders.clip_l.transformer.*``,
    ``text_encoders.t5xxl.transformer.*``, ``vae.*``); ``variant`` "schnell" leaves out ``guidance_in``."""
    from core.models.flux import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"Flux variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
    drop = "model.diffusion_model.guidance_in." if variant == "schnell" else None
    tensors = {k: v for k, v in iter_random_checkpoint("flux", size, seed, dtype) if not (drop and k.startswith(drop))}
    return _save(tensors, path, metadata={"format": "pt"})


def random_flux_transformer_state_dict(
    variant: str = "dev", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random Flux transformer weights under BFL's names (no prefix), in the module's key order."""
    from core.models.flux import Flux, FluxConfig

    with torch.device("meta"):
        module = Flux(FluxConfig.preset("flux", size, variant))
    return random_state_dict(module, seed=seed, dtype=dtype)


def write_random_flux_transformer(
    path: str | Path,
    variant: str = "dev",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A diffusion-model file in the layout of BFL's ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors``:
    transformer keys with no prefix, bf16 by default (what BFL ships)."""
    return _save(random_flux_transformer_state_dict(variant, size, seed, dtype), path)


def random_t5_state_dict(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Random T5 v1.1 encoder weights under Hugging Face names (``shared.weight``, ``encoder.block.N...``)."""
    from core.models.t5 import T5Config, T5EncoderModel

    with torch.device("meta"):
        module = T5EncoderModel(T5Config.preset("t5xxl", size))
    weights = random_state_dict(module, seed=seed, dtype=dtype)
    # Real embeddings are O(1)..O(10) per entry (T5 does not scale them by sqrt(d)); the generic 1/sqrt(fan_in)
    # init would make them tiny and the relative position bias dominate.
    weights["shared.weight"] = weights["shared.weight"] * math.sqrt(weights["shared.weight"].shape[1])
    return weights


def write_random_t5(
    path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """A text-encoder file in the layout of ComfyUI's ``t5xxl_fp16.safetensors`` (no prefix, fp16 by default):
    ``shared.weight``, ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm.weight``."""
    return _save(random_t5_state_dict(size, seed, dtype), path)


def random_flux2_transformer_state_dict(
    variant: str = "klein-4b", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random FLUX.2 transformer weights under BFL's names (no prefix, no biases), in the module's key order."""
    from core.models.flux2 import Flux2, Flux2Config

    with torch.device("meta"):
        module = Flux2(Flux2Config.preset(size, variant))
    return random_state_dict(module, seed=seed, dtype=dtype)


def write_random_flux2_transformer(
    path: str | Path,
    variant: str = "klein-4b",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> Path:
    """A diffusion-model file in the layout of BFL's ``flux-2-klein-4b.safetensors`` (and the Comfy-Org
    repackage): transformer keys with no prefix, bf16 by default; ``prefix="model.diffusion_model."`` gives
    the combined-file layout."""
    weights = random_flux2_transformer_state_dict(variant, size, seed, dtype)
    return _save({prefix + k: v for k, v in weights.items()}, path)


def random_flux2_vae_state_dict(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random FLUX.2 VAE weights under the LDM names of ``flux2-vae.safetensors`` (quant convs inside the
    encoder/decoder, ``bn.*`` statistics), with a positive running variance as a real file has."""
    from core.models.flux2_vae import Flux2AutoencoderKL, Flux2VAEConfig

    with torch.device("meta"):
        module = Flux2AutoencoderKL(Flux2VAEConfig.preset(size))
    weights = random_state_dict(module, seed=seed, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    channels = weights["bn.running_mean"].shape[0]
    # real statistics: means of O(0.1..1), variances of O(1) (never <= 0: decode multiplies by sqrt(var + eps))
    weights["bn.running_mean"] = (0.5 * torch.randn(channels, generator=generator)).to(dtype)
    weights["bn.running_var"] = torch.exp(0.5 * torch.randn(channels, generator=generator)).to(dtype)
    weights["bn.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    return weights


def write_random_flux2_vae(
    path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A VAE file in the layout of ``flux2-vae.safetensors`` (LDM names, no prefix, fp32 + the int64
    ``bn.num_batches_tracked``)."""
    return _save(random_flux2_vae_state_dict(size, seed, dtype), path)


def random_qwen3_state_dict(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random Qwen3 weights under ``Qwen3ForCausalLM`` names without ``lm_head`` (``model.embed_tokens.weight``,
    ``model.layers.N...``, ``model.norm.weight``); ``size``: tiny, 4b, 8b."""
    from core.models.qwen3 import Qwen3, Qwen3Config

    with torch.device("meta"):
        module = Qwen3(Qwen3Config.preset(size))
    return random_state_dict(module, seed=seed, dtype=dtype)


def write_random_qwen3(
    path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A text-encoder file in the layout of ComfyUI's ``qwen_3_4b.safetensors`` / ``qwen_3_8b*.safetensors``:
    398 tensors for the 36-layer models (``model.`` prefix, no ``lm_head``), bf16 by default."""
    return _save(random_qwen3_state_dict(size, seed, dtype), path)


def random_zimage_state_dict(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random Z-Image transformer weights in ComfyUI's layout (no prefix, fused ``attention.qkv``)."""
    from core.models.zimage import ZImageConfig, ZImageTransformer

    with torch.device("meta"):
        module = ZImageTransformer(ZImageConfig.preset(size))
    weights = random_state_dict(module, seed=seed, dtype=dtype)
    for key in ("x_pad_token", "cap_pad_token"):  # learned tokens of O(1) entries, like real activations
        weights[key] = torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return weights


def write_random_zimage(
    path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A diffusion-model file in the layout of ComfyUI's ``z_image_turbo_bf16.safetensors``: 453 tensors at full
    size, bf16 by default, no ``model.diffusion_model.`` prefix (loaders accept both)."""
    return _save(random_zimage_state_dict(size, seed, dtype), path)

# ------------------------------------------------------------------------------------- quantised weights

# Byte offsets of the float16 scale fields (d, dmin, m) inside one block of each GGML type.
_GGML_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
# Types gguf.quants can quantise (the others get random but valid blocks).
GGUF_QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def random_ggml_blocks(qtype: str, shape: tuple[int, ...] | list[int], seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    """Random packed bytes for a tensor of torch ``shape`` in GGML type ``qtype``, as (rows, bytes per row) uint8:
    every bit pattern is random except the float16 scale fields, which are finite, positive and of order
    ``scale`` (so the dequantised weights are O(scale * 2**bits), not inf or NaN)."""
    from core.models.quant.ggml import qtype_size

    block, type_size = qtype_size(qtype)
    rows, width = (math.prod(shape[:-1]), shape[-1]) if len(shape) > 1 else (1, shape[0])
    if width % block:
        raise ValueError(f"{qtype} rows must be a multiple of {block} values; shape {list(shape)} is not")
    generator = torch.Generator().manual_seed(seed)
    n_blocks = rows * width // block
    raw = torch.randint(0, 256, (n_blocks, type_size), dtype=torch.uint8, generator=generator)
    for offset in _GGML_F16_FIELDS[qtype]:
        field = (scale * (0.5 + torch.rand(n_blocks, 1, generator=generator))).to(torch.float16)
        raw[:, offset : offset + 2] = field.view(torch.uint8)
    return raw.reshape(rows, width // block * type_size)


def write_random_gguf(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    qtypes: dict[str, str],
    arch: str = "flux",
    *,
    seed: int = 0,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write ``tensors`` (torch shapes) to a GGUF file of ``general.architecture`` ``arch``, each in the GGML
    type ``qtypes[name]`` (default F32). F32/F16 are written as is; BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 are quantised
    by ``gguf.quants.quantize``; the K-quants, which gguf cannot quantise, get random valid blocks
    (``random_ggml_blocks``): their values are not those of the tensor given, only its shape is used.
    ``metadata``: extra key/value fields (str, int, float, or a list of one of them; ints are INT32).

    Needs the gguf package and numpy (gguf's own dependency).
    """
    import gguf
    import numpy as np

    from core.tensor_bytes import tensor_bytes

    def as_array(t: torch.Tensor, dtype: type) -> np.ndarray:
        return np.frombuffer(tensor_bytes(t), dtype=dtype).copy().reshape(tuple(t.shape))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for i, (name, tensor) in enumerate(tensors.items()):
        qtype = qtypes.get(name, "F32")
        values = tensor.detach().to(torch.float32).cpu().contiguous()
        array = as_array(values, np.float32)
        if qtype == "F32":
            writer.add_tensor(name, array)
        elif qtype == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            ggml_type = gguf.GGMLQuantizationType[qtype]
            if qtype in GGUF_QUANTIZABLE:
                data = gguf.quants.quantize(array, ggml_type)
            else:
                blocks = random_ggml_blocks(qtype, tuple(values.shape), seed=seed + i)
                byte_shape = (*values.shape[:-1], blocks.shape[-1]) if values.dim() > 1 else (blocks.shape[-1],)
                data = as_array(blocks.reshape(byte_shape), np.uint8)
            writer.add_tensor(name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------ split files


def random_clip_l_state_dict(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random CLIP ViT-L/14 text weights under Hugging Face names with ``text_projection`` (ComfyUI's
    ``clip_l.safetensors``; tiny: SD1.x's tiny CLIP-L, 32 wide, which the tiny Flux transformer takes)."""
    from dataclasses import replace

    from core.models.clip import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.preset("sd15", size)
    with torch.device("meta"):
        module = CLIPTextModel(replace(config, projection_dim=config.width))
    return random_state_dict(module, seed=seed, dtype=dtype)


def random_vae_state_dict(
    family: str = "flux", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random LDM-named VAE weights (``encoder.*``, ``decoder.*``) of ``family``'s VAE, e.g. BFL's
    ``ae.safetensors`` for ``"flux"``."""
    component = _families()[family].component("vae")
    return random_state_dict(_component(component, size), seed=seed, dtype=dtype)


SPLIT_LAYOUTS = {  # where ComfyUI and Forge keep each part of a split model (under models/)
    "comfyui": {"diffusion_model": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"},
    "comfyui-legacy": {"diffusion_model": "unet", "text_encoder": "clip", "vae": "vae"},
    "forge": {"diffusion_model": "Stable-diffusion", "text_encoder": "text_encoder", "vae": "VAE"},
}


def _split_folders(root: str | Path, layout: str) -> dict[str, Path]:
    """Part kind -> its folder under ``root/models`` in ``layout`` (``SPLIT_LAYOUTS``: comfyui, forge, ...)."""
    return {kind: Path(root) / "models" / folder for kind, folder in SPLIT_LAYOUTS[layout].items()}


def write_random_flux_split_set(
    root: str | Path,
    layout: str = "comfyui",
    *,
    variant: str = "dev",
    size: str = "tiny",
    seed: int = 0,
    t5_dtype: torch.dtype = torch.float16,
    parts: tuple[str, ...] = ("clip_l", "t5xxl", "vae"),
) -> dict[str, Path]:
    """A Flux.1 set as users keep it under ``root/models``: ``flux1-<variant>.safetensors`` (BFL layout, bf16),
    ``clip_l.safetensors``, ``t5xxl_fp16.safetensors`` (or ``t5xxl_fp8_e4m3fn`` for an fp8 ``t5_dtype``) and
    ``ae.safetensors``, in ``layout``'s folders (``SPLIT_LAYOUTS``); ``parts`` leaves some out. Returns name ->
    path ("model", "clip_l", "t5xxl", "vae")."""
    from core.models.safetensors_writer import save_tensors

    folders = _split_folders(root, layout)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    out = {"model": write_random_flux_transformer(folders["diffusion_model"] / f"flux1-{variant}.safetensors",
                                                  variant, size, seed)}
    if "clip_l" in parts:
        out["clip_l"] = save_tensors(random_clip_l_state_dict(size, seed + 1), folders["text_encoder"] / "clip_l.safetensors")
    if "t5xxl" in parts:
        name = "t5xxl_fp8_e4m3fn" if t5_dtype.itemsize == 1 else "t5xxl_fp16"
        t5 = {k: v.to(t5_dtype) if v.dim() >= 2 else v.to(torch.float16)  # norms stay fp16 in fp8 files
              for k, v in random_t5_state_dict(size, seed + 2, torch.float32).items()}
        out["t5xxl"] = save_tensors(t5, folders["text_encoder"] / f"{name}.safetensors")
    if "vae" in parts:
        out["vae"] = save_tensors(random_vae_state_dict("flux", size, seed + 3), folders["vae"] / "ae.safetensors")
    return out


def write_random_flux2_split_set(
    root: str | Path,
    layout: str = "comfyui",
    *,
    variant: str = "klein-4b",
    size: str = "tiny",
    seed: int = 0,
    transformer_dtype: torch.dtype = torch.bfloat16,
    parts: tuple[str, ...] = ("qwen3", "vae"),
) -> dict[str, Path]:
    """A FLUX.2 [klein] set as the Comfy-Org repackage lays it out under ``root/models``:
    ``flux-2-klein-<4b|9b>.safetensors`` (BFL names, bf16; an fp8 ``transformer_dtype`` writes BFL's
    ``-fp8`` file with ``weight_scale``/``input_scale`` per quantised linear), ``qwen_3_4b.safetensors`` (8B for
    9B; HF names, bf16) and ``flux2-vae.safetensors`` (fp32), in ``layout``'s folders (``SPLIT_LAYOUTS``);
    ``parts`` leaves some out. Returns name -> path ("model", "qwen3", "vae")."""
    folders = _split_folders(root, layout)
    spec = _families()["flux2"]
    weights = random_flux2_transformer_state_dict(variant, size, seed, torch.float32)
    name = f"flux-2-{variant}"
    if transformer_dtype.itemsize == 1:
        name += "-fp8"
        weights = _fp8_with_scales(weights, transformer_dtype)
    else:
        weights = {k: v.to(transformer_dtype) for k, v in weights.items()}
    out = {"model": _save(weights, folders["diffusion_model"] / f"{name}.safetensors")}
    if "qwen3" in parts:
        from core.models.qwen3 import Qwen3, Qwen3Config

        eight = variant == "klein-9b"
        config = (Qwen3Config(**spec.component("text_encoder").presets["tiny"]) if size == "tiny"
                  else Qwen3Config.preset("8b" if eight else "4b"))
        with torch.device("meta"):
            module = Qwen3(config)
        out["qwen3"] = _save(random_state_dict(module, seed=seed + 1, dtype=torch.bfloat16),
                             folders["text_encoder"] / f"qwen_3_{'8b' if eight else '4b'}.safetensors")
    if "vae" in parts:
        out["vae"] = write_random_flux2_vae(folders["vae"] / "flux2-vae.safetensors", size, seed + 2)
    return out


def _fp8_with_scales(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """BFL's fp8 layout: each 2-D weight as ``dtype`` scaled to its range (``weight_scale = max|W| / 448``, an fp32
    scalar beside it) with the static activation scale ``input_scale``; norms stay bf16."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if value.dim() == 2:
            scale = value.abs().max().float() / torch.finfo(dtype).max
            out[key] = (value / scale).to(dtype)
            layer = key.removesuffix(".weight")
            out[layer + ".weight_scale"] = scale.reshape(())
            out[layer + ".input_scale"] = torch.tensor(1.0)
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def write_random_zimage_split_set(
    root: str | Path,
    layout: str = "comfyui",
    *,
    size: str = "tiny",
    seed: int = 0,
    parts: tuple[str, ...] = ("qwen3_4b", "vae"),
) -> dict[str, Path]:
    """A Z-Image set as ComfyUI users keep it under ``root/models``: ``z_image_turbo_bf16.safetensors`` (ComfyUI
    layout, bf16), ``qwen_3_4b.safetensors`` (Hugging Face names, bf16) and Flux.1's ``ae.safetensors``, in
    ``layout``'s folders (``SPLIT_LAYOUTS``); ``parts`` leaves some out. Returns name -> path ("model",
    "qwen3_4b", "vae")."""
    folders = _split_folders(root, layout)
    out = {"model": write_random_zimage(folders["diffusion_model"] / "z_image_turbo_bf16.safetensors", size, seed)}
    if "qwen3_4b" in parts:
        out["qwen3_4b"] = write_random_qwen3(folders["text_encoder"] / "qwen_3_4b.safetensors",
                                             "tiny" if size == "tiny" else "4b", seed + 1)
    if "vae" in parts:
        out["vae"] = _save(random_vae_state_dict("flux", size, seed + 3), folders["vae"] / "ae.safetensors")
    return out


# --------------------------------------------------------------------------------------------------- LoRAs

LORA_FORMATS = ("kohya", "kohya_ldm", "peft", "locon", "loha", "lokr")
_ATTENTION_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")
_RESNET_CONVS = ("in_layers.2", "out_layers.3")


def lora_layers(family: str = "sd15", size: str = "tiny", *, convs: bool = False,
                unet: bool = True, text_encoder: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The layers a typical LoRA trains, as ``{our qualified module "role:name": (role, weight shape)}``:
    the UNet's attention and feed-forward layers (and, with ``convs``, its ResBlock 3x3 convs as LoCon/LyCORIS
    train them) and the text encoders' attention and MLP layers."""
    layers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for component in _layout(family):
        if component.role == "unet" and unet or component.role.startswith("text_encoder") and text_encoder:
            module = _component(component, size)
            if any(".resblocks." in k for k in module.state_dict()):  # OpenCLIP (bigG): LoRAs use HF names
                layers.update(_open_clip_lora_layers(component.role, module))
                continue
            for key, value in module.state_dict().items():
                if not key.endswith(".weight"):
                    continue
                name = key[: -len(".weight")]
                wanted = _CLIP_LAYERS if component.role != "unet" else _ATTENTION_LAYERS + (
                    _RESNET_CONVS if convs else ())
                if name.endswith(wanted) and "emb" not in name.rsplit(".", 1)[-1]:
                    layers[f"{component.role}:{name}"] = (component.role, tuple(value.shape))
    return layers


def _open_clip_lora_layers(role: str, module: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """An OpenCLIP text tower's attention and MLP layers under the Hugging Face names LoRAs give them."""
    layers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"]:
            continue
        hf = f"{role}:text_model.encoder.layers.{parts[2]}."
        rest = ".".join(parts[3:])
        if rest == "attn.in_proj_weight":
            width = value.shape[1]
            for p in "qkv":
                layers[f"{hf}self_attn.{p}_proj"] = (role, (width, width))
        elif rest in ("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            name = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                    "mlp.c_proj.weight": "mlp.fc2"}[rest]
            layers[hf + name] = (role, tuple(value.shape))
    return layers


def _lora_module_name(role: str, name: str, fmt: str, res_blocks: int, family: str = "sd15") -> str:
    from core.lora.keymap import ldm_unet_to_diffusers

    # kohya trains SD1.x on the diffusers UNet, SDXL on its LDM one; PEFT files always use diffusers names
    diffusers_names = fmt == "peft" or (fmt != "kohya_ldm" and family != "sdxl")
    if role == "unet" and diffusers_names:
        name = ldm_unet_to_diffusers(name, res_blocks) or name
    if fmt == "peft":
        return {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}[role] + name
    te = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_", "lora_te2_")
    prefix = {"unet": "lora_unet_", "text_encoder": te[0], "text_encoder_2": te[1]}[role]
    return prefix + name.replace(".", "_")


def random_lora_state_dict(
    family: str = "sd15",
    size: str = "tiny",
    fmt: str = "kohya",
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    unet: bool = True,
    text_encoder: bool = True,
    tucker: bool = False,
    strength: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Random LoRA weights in one real file format (``LORA_FORMATS``):

    - ``kohya``: ``lora_unet_<diffusers names>`` / ``lora_te_<HF CLIP names>`` with ``.lora_down.weight``,
      ``.lora_up.weight`` and ``.alpha`` (what sd-scripts writes for SD1.x); ``kohya_ldm`` the same with LDM
      block names (``lora_unet_input_blocks_1_1_proj_in``). For SDXL both write LDM block names and
      ``lora_te1_``/``lora_te2_`` (bigG in HF names), as sd-scripts does;
    - ``peft``: diffusers/PEFT ``unet.<diffusers name>.lora_A.weight`` / ``.lora_B.weight``, no alpha;
    - ``locon``: kohya names plus the ResBlock 3x3 convs (conv ``lora_down``; with ``tucker`` a ``lora_mid``
      core and 1x1 ``lora_down``);
    - ``loha``: ``hada_w1_a/b``, ``hada_w2_a/b`` (with ``tucker``, ``hada_t1/t2`` on the 3x3 convs);
    - ``lokr``: ``lokr_w1`` full and ``lokr_w2_a/b`` factors (with ``tucker``, ``lokr_t2`` on the 3x3 convs).

    ``strength`` sets the size of the delta against the layer's weights (about ``strength`` times as large).
    """
    if fmt not in LORA_FORMATS:
        raise ValueError(f"LoRA format {fmt!r} is unknown; valid: {', '.join(LORA_FORMATS)}")
    g = torch.Generator().manual_seed(seed)
    convs = fmt in ("locon", "loha", "lokr")
    layers = lora_layers(family, size, convs=convs, unet=unet, text_encoder=text_encoder)
    unet_presets = next((c.presets[size] for c in _layout(family) if c.role == "unet"), {})
    res_blocks = unet_presets.get("num_res_blocks", 2)  # diffusers' layers_per_block
    out: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std).to(dtype)

    for qualified, (role, shape) in layers.items():
        name = _lora_module_name(role, qualified.split(":", 1)[1], fmt, res_blocks, family)
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        fan_in = in_dim * math.prod(kernel)
        conv3 = kernel not in ((), (1, 1))
        std = strength / math.sqrt(fan_in)  # the delta's entries, about strength x the weight's
        r = min(rank, out_dim, in_dim)
        if fmt in ("kohya", "kohya_ldm", "peft", "locon"):
            down_name, up_name = (".lora_A.weight", ".lora_B.weight") if fmt == "peft" else (
                ".lora_down.weight", ".lora_up.weight")
            factor = math.sqrt(std / math.sqrt(r))
            if conv3 and tucker:
                out[name + down_name] = rand(r, in_dim, 1, 1, std=factor)
                out[name + ".lora_mid.weight"] = rand(r, r, *kernel, std=1 / math.sqrt(r * math.prod(kernel)))
            else:
                out[name + down_name] = rand(r, in_dim, *kernel, std=factor)
            out[name + up_name] = rand(out_dim, r, *((1, 1) if kernel else ()), std=factor)
            if alpha is not None and fmt != "peft":
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
        elif fmt == "loha":
            factor = math.sqrt(math.sqrt(std) / math.sqrt(r))  # (a b) * (c d) has entries ~ std
            if conv3 and tucker:
                for i in (1, 2):
                    out[f"{name}.hada_w{i}_a"] = rand(r, out_dim, std=factor)
                    out[f"{name}.hada_w{i}_b"] = rand(r, in_dim, std=factor)
                    out[f"{name}.hada_t{i}"] = rand(r, r, *kernel, std=1 / math.sqrt(r))
            else:
                for i in (1, 2):
                    out[f"{name}.hada_w{i}_a"] = rand(out_dim, r, std=factor)
                    out[f"{name}.hada_w{i}_b"] = rand(r, in_dim * math.prod(kernel), std=factor)
            if alpha is not None:
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
        else:  # lokr: w1 [a, c] full, w2 = w2_a @ w2_b [b, d(, kh, kw)], out = a*b, in = c*d
            a = next(f for f in (4, 2, 1) if out_dim % f == 0)
            c = next(f for f in (4, 2, 1) if in_dim % f == 0)
            b, d = out_dim // a, in_dim // c
            r2 = min(rank, b, d)
            out[name + ".lokr_w1"] = rand(a, c, std=1.0)
            factor = math.sqrt(std / math.sqrt(r2))
            if conv3 and tucker:
                out[name + ".lokr_w2_a"] = rand(r2, b, std=factor)
                out[name + ".lokr_w2_b"] = rand(r2, d, std=factor)
                out[name + ".lokr_t2"] = rand(r2, r2, *kernel, std=1 / math.sqrt(r2))
            else:
                out[name + ".lokr_w2_a"] = rand(b, r2, std=factor)
                out[name + ".lokr_w2_b"] = rand(r2, d, *kernel, std=factor)
            if alpha is not None:
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def write_random_lora(path: str | Path, family: str = "sd15", size: str = "tiny", fmt: str = "kohya",
                      metadata: dict[str, str] | None = None, **options) -> Path:
    """Write ``random_lora_state_dict(family, size, fmt, **options)`` as a ``.safetensors`` LoRA file."""
    return _save(random_lora_state_dict(family, size, fmt, **options), path, metadata=metadata)


FLUX_LORA_FORMATS = ("kohya", "bfl", "diffusers", "xlabs")


def random_flux_lora_state_dict(
    fmt: str = "kohya", size: str = "tiny", *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
    dtype: torch.dtype = torch.float32, strength: float = 0.3, diffusers_names: dict[str, tuple[int, ...]] | None = None,
    text_encoder: bool = False,
) -> dict[str, torch.Tensor]:
    """Random Flux.1 LoRA weights in one trainer's naming (``FLUX_LORA_FORMATS``), on every Linear layer:

    - ``kohya``: ``lora_unet_<BFL name with _>.lora_down/lora_up.weight`` + ``.alpha`` (fused qkv / linear1;
      the final layer's alpha is its rank, since diffusers drops that alpha instead of applying it);
    - ``bfl``: ``diffusion_model.<BFL name>.lora_A/lora_B.weight`` (ComfyUI / BFL naming), no alpha;
    - ``diffusers``: ``transformer.<diffusers name>.lora_A/lora_B.weight`` on the layers ``diffusers_names``
      lists (name -> weight shape, e.g. a ``FluxTransformer2DModel``'s), no alpha;
    - ``xlabs``: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.down/up.weight`` and single blocks'
      ``processor.qkv_lora`` (what XLabs' trainer writes), no alpha.

    ``text_encoder`` adds CLIP-L's attention and MLP layers (kohya ``lora_te1_text_model_encoder_layers_N_*``
    with alphas, diffusers ``text_encoder.text_model.encoder.layers.N.*``; kohya and diffusers formats only).
    """
    from core.models.flux import Flux, FluxConfig

    if fmt not in FLUX_LORA_FORMATS:
        raise ValueError(f"Flux LoRA format {fmt!r} is unknown; valid: {', '.join(FLUX_LORA_FORMATS)}")
    cfg = FluxConfig.preset("flux", size, "dev")
    with torch.device("meta"):
        module = Flux(cfg)
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in module.state_dict().items()
              if k.endswith(".weight") and v.ndim == 2}
    d = cfg.hidden_size
    if fmt == "diffusers":
        if diffusers_names is None:
            raise ValueError("the diffusers format needs diffusers_names (module name -> weight shape)")
        shapes = dict(diffusers_names)
    elif fmt == "xlabs":
        shapes = {}
        for n in range(cfg.depth):
            for i in (1, 2):
                shapes[f"double_blocks.{n}.processor.qkv_lora{i}"] = (3 * d, d)
                shapes[f"double_blocks.{n}.processor.proj_lora{i}"] = (d, d)
        for n in range(cfg.depth_single_blocks):
            shapes[f"single_blocks.{n}.processor.qkv_lora"] = (3 * d, d)
    if text_encoder and fmt not in ("kohya", "diffusers"):
        raise ValueError(f"text-encoder layers are written for the kohya and diffusers formats, not {fmt!r}")
    clip = {f"te:{k.split(':', 1)[1]}": v[1] for k, v in
            lora_layers("flux", size, unet=False).items()} if text_encoder else {}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (out_dim, in_dim) in {**shapes, **clip}.items():
        r = min(rank, out_dim, in_dim)
        factor = math.sqrt(strength / math.sqrt(in_dim) / math.sqrt(r))
        down = (torch.randn(r, in_dim, generator=g) * factor).to(dtype)
        up = (torch.randn(out_dim, r, generator=g) * factor).to(dtype)
        te = name.startswith("te:")
        name = name.removeprefix("te:")
        if fmt == "kohya":
            key = ("lora_te1_" if te else "lora_unet_") + name.replace(".", "_")
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
            if alpha is not None:
                out[key + ".alpha"] = torch.tensor(float(r if name.startswith("final_layer") else alpha), dtype=dtype)
        elif fmt == "xlabs":
            out[name + ".down.weight"], out[name + ".up.weight"] = down, up
        else:
            key = ("diffusion_model." if fmt == "bfl" else "text_encoder." if te else "transformer.") + name
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = down, up
    return out


# ---- model upscalers (ESRGAN family, as spandrel detects them) --------------------------------------------------

ESRGAN_LAYOUTS = ("esrgan", "realesrgan")


def random_esrgan_state_dict(
    layout: str = "esrgan", scale: int = 4, filters: int = 16, blocks: int = 1, *, growth: int = 32,
    unshuffle: bool = False, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RRDBNet weights, keys written out here: ``esrgan`` is the old-arch ESRGAN layout (``model.0``,
    ``model.1.sub.N.RDBk.convj.0``, upsample convs at ``model.3``, ``model.6``, ...) of 4x-UltraSharp and the other
    community models; ``realesrgan`` is basicsr's (Real-ESRGAN x4plus: ``conv_first``, ``body.N.rdbk.convj``,
    ``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``; always two 2x upsamplers, and
    ``unshuffle`` makes it x2plus: a 2x pixel-unshuffle in front, 12 input channels). ``growth`` is the dense blocks'
    growth channels (32 in every released model; spandrel assumes it)."""
    if layout not in ESRGAN_LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {', '.join(ESRGAN_LAYOUTS)}")
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key: str, out_ch: int, in_ch: int) -> None:
        shapes[key + ".weight"] = (out_ch, in_ch, 3, 3)
        shapes[key + ".bias"] = (out_ch,)

    in_ch = 12 if unshuffle else 3
    if layout == "esrgan":
        ups = int(math.log2(scale))
        conv("model.0", filters, in_ch)
        for b in range(blocks):
            for r in (1, 2, 3):
                for j in range(1, 6):
                    conv(f"model.1.sub.{b}.RDB{r}.conv{j}.0", filters if j == 5 else growth, filters + (j - 1) * growth)
        conv(f"model.1.sub.{blocks}", filters, filters)
        for u in range(ups):
            conv(f"model.{3 * u + 3}", filters, filters)
        conv(f"model.{3 * ups + 2}", filters, filters)
        conv(f"model.{3 * ups + 4}", 3, filters)
    else:
        conv("conv_first", filters, in_ch)
        for b in range(blocks):
            for r in (1, 2, 3):
                for j in range(1, 6):
                    conv(f"body.{b}.rdb{r}.conv{j}", filters if j == 5 else growth, filters + (j - 1) * growth)
        conv("conv_body", filters, filters)
        conv("conv_up1", filters, filters)
        conv("conv_up2", filters, filters)
        conv("conv_hr", filters, filters)
        conv("conv_last", 3, filters)
    last = list(shapes)[-2:]  # the output conv: images around mid-grey varying by ~0.15, <1 % clamped away
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".bias"):
            out[key] = torch.full(shape, 0.5) if key in last else 0.02 * torch.randn(shape, generator=g)
        else:  # He-like scale through the trunk (LeakyReLU halves the variance); smaller at the output
            gain = 0.3 if key in last else 1.4
            out[key] = torch.randn(shape, generator=g) * (gain / math.sqrt(math.prod(shape[1:])))
    return out


def write_random_esrgan(path: str | Path, layout: str = "esrgan", scale: int = 4, **options) -> Path:
    """A random ESRGAN-family upscaler file (``.safetensors``, or ``.pth`` written by ``torch.save`` as plain
    tensors, which ``torch.load(weights_only=True)`` reads)."""
    tensors = random_esrgan_state_dict(layout, scale, **options)
    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params_ema": tensors} if layout == "realesrgan" else tensors, path)
        return path
    return _save(tensors, path)
