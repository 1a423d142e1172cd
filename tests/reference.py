"""Reference implementations (diffusers, transformers) built from the same single-file checkpoint as ours.

Used by the parity and end-to-end tests and by bench/: the reference networks are loaded from the file through
diffusers' own single-file converters, so a wrong key layout in our files or loader shows up as a mismatch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.models.clip import CLIPTextConfig
from core.models.flux import FluxConfig
from core.models.flux2 import Flux2Config
from core.models.unet import UNetConfig
from core.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
CLIP_DATA = Path(__file__).resolve().parents[1] / "core" / "models" / "data" / "clip"


def diffusers_unet_config(cfg: UNetConfig, sdxl_time_embed_dim: int = 256) -> dict:
    """The diffusers ``UNet2DConditionModel`` config describing the same network as ``cfg``."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth]
    config = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        # diffusers' "attention_head_dim" is the head count (a historic misnomer).
        "attention_head_dim": [cfg.heads_for(w)[0] for w in widths],
        # Levels without attention ignore their entry; the middle block reads the last one.
        "transformer_layers_per_block": [d or cfg.transformer_depth_middle for d in cfg.transformer_depth],
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.num_groups,
        "sample_size": 64,
    }
    assert cfg.transformer_depth[-1] in (0, cfg.transformer_depth_middle), "diffusers cannot express this"
    if cfg.adm_in_channels is not None:
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = sdxl_time_embed_dim
        config["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return config


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": 32,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv,
    }


def transformers_clip_config(cfg: CLIPTextConfig):
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim or cfg.width,
        eos_token_id=2,  # what the real SD configs say: pooled output at argmax(ids)
    )


def _component(checkpoint: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: tuple(v.shape) for k, v in checkpoint.items() if k.startswith(prefix)}


def reference_components(path: str | Path, dtype: torch.dtype = torch.float32) -> dict:
    """diffusers UNet + VAE and transformers CLIP text model + tokenizer, from one single-file checkpoint."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    checkpoint = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}

    unet_config = diffusers_unet_config(UNetConfig.from_state_dict(_component(checkpoint, UNET_PREFIX)))
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)

    vae_config = diffusers_vae_config(VAEConfig.from_state_dict(_component(checkpoint, VAE_PREFIX)))
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    clip_cfg = CLIPTextConfig.from_state_dict(_component(checkpoint, CLIP_PREFIX))
    text_encoder = transformers.CLIPTextModel(transformers_clip_config(clip_cfg))
    converted = convert_ldm_clip_checkpoint(checkpoint)
    converted.pop("text_model.embeddings.position_ids", None)
    # transformers >= 5.6 flattened CLIPTextModel (no text_model. level); older versions keep it.
    own_keys = set(text_encoder.state_dict())
    if not any(k.startswith("text_model.") for k in own_keys):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    text_encoder.load_state_dict(converted, strict=True)

    tokenizer = transformers.CLIPTokenizer(
        str(CLIP_DATA / "vocab.json"), str(CLIP_DATA / "merges.txt"), model_max_length=77
    )
    return {
        "unet": unet.eval().to(dtype),
        "vae": vae.eval().to(dtype),
        "text_encoder": text_encoder.eval().to(dtype),
        "tokenizer": tokenizer,
    }


def reference_pipeline(path: str | Path, scheduler=None, *, img2img: bool = False, dtype=torch.float32):
    """diffusers' ``StableDiffusionPipeline`` (or the img2img one) over the same weights, Euler by default."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="linspace",
        steps_offset=1,
    )
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        **reference_components(path, dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the reference ``b`` (fp32 norms)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


@contextmanager
def torch_threads(count: int):
    """Tiny networks run faster on one thread than on two fighting over a shared machine's cores (10x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images (PIL or arrays)."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ---- SD2.x ---------------------------------------------------------------------------------------------------

OPEN_CLIP_PREFIX = "cond_stage_model.model."


def reference_sd2_text_encoder(checkpoint: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """transformers' ``CLIPTextModel`` as diffusers builds SD2.x's encoder from a single file: one block short
    of the file's (the penultimate layer, then the final norm, is the conditioning), through
    ``convert_open_clip_checkpoint``; the file's last block, ``text_projection`` and ``logit_scale`` unused."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from core.models.open_clip import OpenCLIPTextConfig

    cfg = OpenCLIPTextConfig.from_state_dict(_component(checkpoint, OPEN_CLIP_PREFIX))
    last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{cfg.layers - 1}."
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers - 1,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_positions,
        hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim,
        eos_token_id=2,  # as stabilityai/stable-diffusion-2-1 text_encoder/config.json: pooled at argmax(ids)
    ))
    converted = convert_open_clip_checkpoint(
        model, {k: v for k, v in checkpoint.items() if not k.startswith(last)}, prefix=OPEN_CLIP_PREFIX
    )
    converted.pop("text_projection.weight", None)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5.6 flattened it
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)
    return model.eval().to(dtype)


def reference_sd2_tokenizer():
    """The SD2.x tokenizer: CLIP's vocabulary, padded with "!" (id 0) as its special_tokens_map.json says."""
    import transformers

    return transformers.CLIPTokenizer(
        str(CLIP_DATA / "vocab.json"), str(CLIP_DATA / "merges.txt"), model_max_length=77, pad_token="!"
    )


def reference_sd2_pipeline(path: str | Path, prediction: str, dtype=torch.float32):
    """diffusers' ``StableDiffusionPipeline`` over an SD2.x single file, Euler with ``prediction_type``
    ``"epsilon"`` or ``"v_prediction"``, the scheduler stabilityai/stable-diffusion-2-1 configures."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    checkpoint = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    unet_config = diffusers_unet_config(UNetConfig.from_state_dict(_component(checkpoint, UNET_PREFIX), family="sd2"))
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = diffusers_vae_config(VAEConfig.from_state_dict(_component(checkpoint, VAE_PREFIX), family="sd2"))
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace", steps_offset=1,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=reference_sd2_text_encoder(checkpoint, dtype),
        tokenizer=reference_sd2_tokenizer(), unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def merge_lora_reference(pipe, path: str | Path, unet_scale: float = 1.0, te_scale: float | None = None) -> None:
    """Merge a LoRA file into a diffusers pipeline's UNet and text encoder the way ``load_lora_weights(path)``
    followed by ``fuse_lora(lora_scale=...)`` does.

    peft (the backend ``load_lora_weights`` requires) is not installed here, so its one step is written out:
    diffusers converts the file's key names and alphas with its own functions (``lora_state_dict``, which
    runs ``_convert_non_diffusers_lora_to_diffusers`` on kohya files; ``convert_unet_state_dict_to_peft`` /
    ``convert_state_dict_to_peft``; ``get_peft_kwargs`` for rank and alpha), then PEFT's merge is
    ``W += scale * lora_alpha / r * B @ A`` for each module (``tuners/lora/layer.py`` ``get_delta_weight``).
    """
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    te_scale = unet_scale if te_scale is None else te_scale
    # load_lora_weights passes the UNet's config: it maps SDXL's LDM block names (kohya) onto diffusers' ones
    state_dict, alphas, metadata = pipe.lora_state_dict(str(path), unet_config=pipe.unet.config,
                                                        return_lora_metadata=True)
    parts = [("unet", pipe.unet, unet_scale), ("text_encoder", pipe.text_encoder, te_scale)]
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        parts.append(("text_encoder_2", pipe.text_encoder_2, te_scale))
    for prefix, model, scale in parts:
        sd = {k.removeprefix(prefix + "."): v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        if not sd:
            continue
        if prefix == "unet":
            sd = sd if "lora_A" in next(iter(sd)) else convert_unet_state_dict_to_peft(sd)
        else:
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
        network_alphas = {k.removeprefix(prefix + "."): v for k, v in (alphas or {}).items()
                          if k.startswith(prefix + ".")} or None
        config = {k.removeprefix(prefix + "."): v for k, v in (metadata or {}).items() if k.startswith(prefix + ".")}
        if config:  # a diffusers-saved adapter config: peft's LoraConfig kwargs (load_lora_adapter)
            kwargs = {"rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, **config}
        else:
            kwargs = get_peft_kwargs(rank, network_alpha_dict=network_alphas, peft_state_dict=sd,
                                     is_unet=prefix == "unet")
        assert not kwargs["rank_pattern"] and not kwargs["alpha_pattern"], "uniform rank and alpha expected"
        r = kwargs["r"]
        factor = scale * kwargs["lora_alpha"] / (r**0.5 if kwargs.get("use_rslora") else r)
        flat_text = not any(k.startswith("text_model.") for k in model.state_dict())  # transformers >= 5.6
        with torch.no_grad():
            for key in [k for k in sd if k.endswith(".lora_A.weight")]:
                name = key.removesuffix(".lora_A.weight")
                if flat_text:
                    name = name.removeprefix("text_model.")
                weight = model.get_submodule(name).weight
                a, b = sd[key].float(), sd[key.replace("lora_A", "lora_B")].float()
                delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
                weight += (factor * delta).to(weight.dtype)

# ------------------------------------------------------------------------------------------------ SDXL

SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIG_G_PREFIX = "conditioner.embedders.1.model."
REFINER_BIG_G_PREFIX = "conditioner.embedders.0.model."


def _tokenizer(pad: str):
    import transformers

    return transformers.CLIPTokenizer(
        str(CLIP_DATA / "vocab.json"), str(CLIP_DATA / "merges.txt"), model_max_length=77, pad_token=pad
    )


def _big_g_reference(checkpoint: dict[str, torch.Tensor], prefix: str):
    """transformers' ``CLIPTextModelWithProjection`` loaded through diffusers' OpenCLIP converter."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from core.models.open_clip import OpenCLIPTextConfig

    cfg = OpenCLIPTextConfig.from_state_dict(_component(checkpoint, prefix))
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_positions,
        hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim,
        eos_token_id=2,  # as the real text_encoder_2 config: pooled output at argmax(ids)
    ))
    model.load_state_dict(convert_open_clip_checkpoint(model, checkpoint, prefix=prefix), strict=True)
    return model.eval()


def sdxl_time_embed_dim(unet_cfg: UNetConfig, pooled_dim: int, count: int) -> int:
    return (unet_cfg.adm_in_channels - pooled_dim) // count


def reference_sdxl_components(
    path: str | Path, dtype: torch.dtype = torch.float32, *, refiner: bool = False, release: bool = False
) -> dict:
    """diffusers UNet + VAE and transformers CLIP-L / bigG (+ tokenizers) from one SDXL (or refiner) file.

    ``release``: keep the file's tensors in their stored dtype and drop each network's from memory once it is
    loaded, so a full-size fp16 file becomes fp32 networks in about 17 GB at the peak instead of 28 (benchmarks).
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from core.models.open_clip import OpenCLIPTextConfig

    checkpoint = load_file(str(path))
    if not release:
        checkpoint = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.items()}

    def done_with(prefix: str) -> None:
        if release:
            for key in [k for k in checkpoint if k.startswith(prefix)]:
                del checkpoint[key]

    big_g_prefix = REFINER_BIG_G_PREFIX if refiner else SDXL_BIG_G_PREFIX
    projection_dim = OpenCLIPTextConfig.from_state_dict(_component(checkpoint, big_g_prefix)).projection_dim
    unet_cfg = UNetConfig.from_state_dict(_component(checkpoint, UNET_PREFIX))
    time_dim = sdxl_time_embed_dim(unet_cfg, projection_dim, 5 if refiner else 6)
    unet_config = diffusers_unet_config(unet_cfg, sdxl_time_embed_dim=time_dim)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    unet = unet.eval().to(dtype)
    done_with(UNET_PREFIX)

    big_g = _big_g_reference(checkpoint, big_g_prefix).to(dtype)
    done_with(big_g_prefix)

    vae_cfg = VAEConfig.from_state_dict(_component(checkpoint, VAE_PREFIX), family="sdxl")
    vae_config = diffusers_vae_config(vae_cfg)
    vae = AutoencoderKL(**vae_config, force_upcast=False)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    parts = {
        "unet": unet,
        "vae": vae.eval().to(dtype),
        "text_encoder_2": big_g,
        "tokenizer_2": _tokenizer("!"),  # tokenizer_2/special_tokens_map.json: pad_token "!"
    }
    if refiner:
        return parts
    clip_cfg = CLIPTextConfig.from_state_dict(_component(checkpoint, SDXL_CLIP_L_PREFIX), family="sdxl")
    clip_l = transformers.CLIPTextModel(transformers_clip_config(clip_cfg))
    converted = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=SDXL_CLIP_L_PREFIX)
    converted = {k: v for k, v in converted.items() if k.startswith("text_model.")}
    converted.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in clip_l.state_dict()):  # transformers >= 5.6
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    clip_l.load_state_dict(converted, strict=True)
    return parts | {"text_encoder": clip_l.eval().to(dtype), "tokenizer": _tokenizer("<|endoftext|>")}


def euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace", steps_offset=1,
    )


def reference_sdxl_pipeline(path: str | Path, *, dtype=torch.float32):
    """diffusers' ``StableDiffusionXLPipeline`` over the same weights, Euler, ``force_zeros_for_empty_prompt``
    on (its default for SDXL base, and what A1111 does for an empty negative prompt)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **reference_sdxl_components(path, dtype), scheduler=euler_scheduler(), force_zeros_for_empty_prompt=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_refiner_pipeline(path: str | Path, *, dtype=torch.float32):
    """diffusers' ``StableDiffusionXLImg2ImgPipeline`` for a refiner file (bigG only, aesthetic score)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        **reference_sdxl_components(path, dtype, refiner=True), text_encoder=None, tokenizer=None,
        scheduler=euler_scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ Flux.1

FLUX_PREFIX = "model.diffusion_model."
FLUX_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
FLUX_T5_PREFIX = "text_encoders.t5xxl.transformer."
FLUX_VAE_PREFIX = "vae."
T5_TOKENIZER = Path("/work/shared/data/tokenizers/t5")
FLUX_CONFIGS = Path("/work/shared/data/model-configs/black-forest-labs")


def bfl_to_diffusers(checkpoint: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` on ``checkpoint``.

    The converter hard-codes FLUX.1's width (``inner_dim = 3072``, ``mlp_ratio = 4.0``) only to split the single
    blocks' fused linear1; for the tiny models we run diffusers' own source with those two constants set to the
    model's, and check that nothing else had to change.
    """
    import inspect

    from diffusers.loaders import single_file_utils

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    if (cfg.hidden_size, cfg.mlp_ratio) == (3072, 4.0):
        return fn(dict(checkpoint))
    source = inspect.getsource(fn)
    for old, new in (
        ("inner_dim = 3072", f"inner_dim = {cfg.hidden_size}"),
        ("mlp_ratio = 4.0", f"mlp_ratio = {cfg.mlp_ratio!r}"),
    ):
        assert source.count(old) == 1, f"diffusers' Flux converter changed: {old!r} not found once"
        source = source.replace(old, new)
    namespace = dict(vars(single_file_utils))
    exec(compile(source, single_file_utils.__file__, "exec"), namespace)
    return namespace[fn.__name__](dict(checkpoint))


def diffusers_flux_config(cfg: FluxConfig) -> dict:
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": cfg.axes_dim,
    }


def diffusers_flux2_config(cfg: Flux2Config) -> dict:
    """``Flux2Transformer2DModel`` keyword arguments for our config (the same network)."""
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": cfg.axes_dim,
        "rope_theta": cfg.theta,
        "guidance_embeds": cfg.guidance_embed,
    }


def transformers_t5_config(cfg):
    import transformers

    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False,
    )


def flux_scheduler(variant: str):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-<variant>'s scheduler_config.json."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    path = FLUX_CONFIGS / f"FLUX.1-{variant}" / "scheduler" / "scheduler_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return FlowMatchEulerDiscreteScheduler(**config)


def reference_flux_pipeline(path: str | Path, variant: str, dtype: torch.dtype = torch.float32):
    """diffusers' ``FluxPipeline`` over a combined Flux file: ``FluxTransformer2DModel`` through
    ``convert_flux_transformer_checkpoint_to_diffusers``, transformers' ``T5EncoderModel`` and ``CLIPTextModel``,
    the 16-channel ``AutoencoderKL`` through ``convert_ldm_vae_checkpoint``, the real FLUX.1 tokenizers."""
    import transformers
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

    from core.models.t5 import T5Config

    checkpoint = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}

    transformer_sd = {k[len(FLUX_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(FLUX_PREFIX)}
    cfg = FluxConfig.from_state_dict({k: tuple(v.shape) for k, v in transformer_sd.items()})
    transformer = FluxTransformer2DModel(**diffusers_flux_config(cfg))
    transformer.load_state_dict(bfl_to_diffusers(transformer_sd, cfg), strict=True)

    vae_cfg = VAEConfig.from_state_dict(_component(checkpoint, FLUX_VAE_PREFIX), family="flux")
    vae_config = diffusers_vae_config(vae_cfg)
    vae = AutoencoderKL(**vae_config, force_upcast=False)
    vae_sd = {"first_stage_model." + k[len(FLUX_VAE_PREFIX):]: v for k, v in checkpoint.items()
              if k.startswith(FLUX_VAE_PREFIX)}
    vae.load_state_dict(convert_ldm_vae_checkpoint(vae_sd, vae_config), strict=True)

    clip_cfg = CLIPTextConfig.from_state_dict(_component(checkpoint, FLUX_CLIP_L_PREFIX), family="flux")
    clip_l = transformers.CLIPTextModel(transformers_clip_config(clip_cfg))
    converted = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=FLUX_CLIP_L_PREFIX)
    converted = {k: v for k, v in converted.items() if k.startswith("text_model.")}
    converted.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in clip_l.state_dict()):  # transformers >= 5.6
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    clip_l.load_state_dict(converted, strict=True)

    t5_sd = {k[len(FLUX_T5_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(FLUX_T5_PREFIX)}
    t5 = transformers.T5EncoderModel(transformers_t5_config(T5Config.from_state_dict(
        {k: tuple(v.shape) for k, v in t5_sd.items()})))
    missing, unexpected = t5.load_state_dict(t5_sd, strict=False)  # embed_tokens is tied to shared
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)

    pipe = FluxPipeline(
        scheduler=flux_scheduler(variant),
        vae=vae.eval().to(dtype),
        text_encoder=clip_l.eval().to(dtype),
        tokenizer=_tokenizer("<|endoftext|>"),
        text_encoder_2=t5.eval().to(dtype),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(str(T5_TOKENIZER)),
        transformer=transformer.eval().to(dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
