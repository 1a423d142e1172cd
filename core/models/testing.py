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


def _component(component, size: str) -> torch.nn.Module:
    """Build the component on the meta device (no memory) so only its key names and shapes are used."""
    with torch.device("meta"):
        config = component.config_class()(**component.presets[size])
        return component.network_class()(config)


def random_tensor(key: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights with a sane scale so activations stay O(1) through a deep random network."""
    if key.endswith(".weight") and len(shape) == 1 or key.endswith(".scale"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=generator)  # norm gains
    elif key.endswith(".bias") or len(shape) <= 1:
        t = 0.05 * torch.randn(shape, generator=generator)
    else:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return t.to(dtype)


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


def iter_random_checkpoint(
    family: str = "sd15", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a random checkpoint, in file order."""
    layout = _layout(family)
    if size not in ("tiny", "full"):
        raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
    generator = torch.Generator().manual_seed(seed)
    for component in layout:
        module = _component(component, size)
        prefix = component.prefix
        for key, value in module.state_dict().items():
            tensor_dtype = dtype if value.is_floating_point() else value.dtype
            yield prefix + key, random_tensor(key, value.shape, generator, tensor_dtype)
        if component.network.endswith(":CLIPTextModel"):
            # Real SD1.x files carry CLIP's position_ids buffer; loaders must tolerate it.
            yield prefix + "text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None]
        if component.network.endswith(":OpenCLIPTextModel"):
            # Real SD2.x/SDXL files carry OpenCLIP's contrastive temperature (ln 100); loaders must ignore it.
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
) -> Path:
    """Write a single-file ``.safetensors`` checkpoint with random weights in the family's real layout."""
    from core.models.safetensors_writer import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(iter_random_checkpoint(family, size, seed, dtype))
    return save_tensors(tensors, path, metadata={"format": "pt"})


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
    from core.models.safetensors_writer import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(random_flux_transformer_state_dict(variant, size, seed, dtype), path)


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
    from core.models.safetensors_writer import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(random_t5_state_dict(size, seed, dtype), path)
