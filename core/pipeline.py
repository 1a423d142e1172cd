"""The generation pipeline: txt2img, img2img and hires-fix over the core's networks and samplers.

``generate()`` turns one resolved ``GenerationRequest`` into images with a loaded model; ``PipelineRunner``
is the worker's ``JobRunner``: it keeps one checkpoint loaded between jobs (switching frees the old one),
caches prompt encodings, and reports every step with a cheap x0 preview.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from core import inpaint
from core.accel import cuda_graphs, feature_cache
from core.accel.cache_options import cache_warnings
from core.errors import DarkroomError, RequestError
from core.image_files import flattened_rgb, upright_rgb, upright_size
from core.lora.tags import LoraRef, strip_tags
from core.metadata import model_hash_warning
from core.models.conditioning import Conditioning, EncoderSettings, pad_to_same_length
from core.models.families import get_family
from core.models.family import DiscreteSampling, FlowSampling, ModelFamily, resolve
from core.models.previews import PreviewDecoders
from core.models.prompt_schedule import ConditioningSchedule, prompt_schedule, schedule_steps, split_and
from core.request import GenerationRequest, sampler_problem
from core.runner import GeneratedImage, RunContext
from core.sampling.denoisers import CFGDenoiser, DiscreteSchedule
from core.sampling.noise import NoiseSampler
from core.sampling.samplers import StepInfo, sample
from core.sampling.schedules import get_sigmas, schedule_length
from core.tensor_bytes import rgb_image

if TYPE_CHECKING:
    from core.accel.attention import AttentionDispatcher
    from core.models.checkpoint import LoadedCheckpoint
    from core.models.registry import ModelRegistry
    from core.store import Job

log = logging.getLogger(__name__)

# Above this many latent pixels the VAE decodes in overlapping tiles (1024x1024 images and up), which
# bounds memory with no visible seams.
TILED_DECODE_LATENT_PIXELS = 128 * 128

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step 1-based over the job, total, x0 batch)


class InitImageError(DarkroomError):
    """The img2img source image cannot be used."""


COMPILING = "compiling the denoiser for this size (its first job: seconds to minutes; later jobs reuse it)"


def generating_activity(plan: Any) -> str:
    """The activity of a job that samples: "generating", with its memory plan when it is not the default one."""
    described = plan.describe() if plan is not None else ""
    return f"generating · memory: {described}" if described else "generating"


class OutOfMemoryJobError(DarkroomError):
    """A job ran out of memory, also after the retry with offload and tiling; the message says what fits."""


class NonFiniteOutputError(DarkroomError):
    """The model produced NaN or infinite values: saving would give a black (or garbage) image."""


def _check_finite(model: LoadedModel, values: torch.Tensor, stage: str) -> None:
    """One check per batch (a single device sync), so a broken model fails the job with a reason.

    A NaN or infinity anywhere makes the sum non-finite; summing (in float32, so finite fp16 values cannot
    overflow) is a plain reduction, 10x faster on the CPU than ``isfinite(values).all()`` (7 ms against 69 ms
    for a 1024x1024 image here).
    """
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return
    if stage == "decoding":
        cause = (
            "the VAE produced NaN or infinite values while decoding (a float16 decode is retried in float32 "
            "first, so this is not the SDXL VAE's float16 overflow); its weights are probably broken"
        )
    else:
        cause = (
            "the model produced NaN or infinite values while sampling; usually the checkpoint has broken (NaN) "
            "weights, or it overflows in float16 (try float32, or another copy of the model)"
        )
    source = (model.checkpoint.vae_path if stage == "decoding" else None) or model.checkpoint.path
    raise NonFiniteOutputError(f"{source}: {cause}; no image was saved")


# ------------------------------------------------------------------------------------------ loaded model


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: networks on the device at the compute dtype, its family's conditioner
    and noise schedule."""

    checkpoint: LoadedCheckpoint
    device: torch.device
    dtype: torch.dtype
    name: str
    model_hash: str | None = None
    schedule: DiscreteSchedule | None = None  # None: the family's training schedule
    conditioner: Any = None  # None: the family's conditioner over the checkpoint's text encoders
    loras: Any = None  # core.lora.patch.LoraPatcher: the LoRAs merged into the networks
    placement: Any = None  # core.accel.memory.Placement: moves the networks as the job's memory plan says

    def __post_init__(self) -> None:
        from core.lora.patch import LoraPatcher

        if self.schedule is None:
            self.schedule = self.spec.sampling.schedule()
        if self.conditioner is None:
            self.conditioner = resolve(self.spec.conditioner)(self.checkpoint.components)
        if self.loras is None:
            self.loras = LoraPatcher(self.checkpoint.components, self.spec)

    @property
    def family(self) -> str:
        return self.checkpoint.family

    @property
    def spec(self) -> ModelFamily:
        return get_family(self.checkpoint.family)

    @property
    def key(self) -> tuple[str, str | None, tuple[str, ...]]:
        """(model file, VAE file, the other part files): the identity of what is loaded."""
        vae = self.checkpoint.vae_path
        parts = getattr(self.checkpoint, "parts", {}) or {}
        return (str(self.checkpoint.path), str(vae) if vae else None,
                tuple(f"{role}={p}" for role, p in sorted(parts.items()) if role != "vae"))

    def noise_sampler(self, seeds: list[int], width: int, height: int) -> NoiseSampler:
        """Per-image seeded noise for latents of an image of ``width`` x ``height`` pixels."""
        latent = self.spec.latent
        shape = (latent.channels, height // latent.downscale, width // latent.downscale)
        return NoiseSampler(seeds, shape, device=self.device, dtype=self.dtype)

    def replace_vae(self, vae_path: Path | None) -> None:
        """Use another VAE (``None``: the checkpoint's own) without reloading the UNet and text encoder."""
        from core.models.checkpoint import load_vae

        source = vae_path if vae_path is not None else self.checkpoint.path
        vae = load_vae(source, family=self.family, device="cpu", dtype=None)
        vae.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.checkpoint.vae = vae
        self.checkpoint.vae_path = vae_path

    @property
    def prediction(self) -> str:
        """What the network predicts: detection's finding, else the family's default (same names: eps, v)."""
        return getattr(self.checkpoint.info, "prediction", None) or self.spec.sampling.prediction

    def prediction_for(self, override: str = "auto") -> str:
        """The prediction type a request runs with: its override (``prediction = "eps" | "v"``) or, for
        ``"auto"``, the model's own. An override the family has no use for is a ``RequestError``."""
        if override == "auto":
            return self.prediction
        allowed = self.spec.sampling.predictions
        if override not in allowed:
            valid = f"auto or {' or '.join(allowed)}" if allowed else f"auto ({self.spec.label} models are flow-matching)"
            raise RequestError("prediction", override, f"{valid} for this {self.spec.label} model")
        return override

    def denoiser(self, prediction: str = "auto", guidance: float | None = None, network: Any = None) -> Any:
        """The UNet wrapped as ``denoise(x, sigma, **cond) -> x0`` for its prediction type (or ``prediction``,
        a request's override); ``guidance``: the distilled guidance of a model that takes one; ``network``: a
        stand-in for the UNet (an inpainting UNet with its extra input, ``core.inpaint.MaskedImageInput``)."""
        return self.spec.sampling.denoiser(
            cuda_graphs.replayed(network or self.checkpoint.unet), self.schedule, self.prediction_for(prediction),
            guidance=guidance,
        )

    def guidance_for(self, requested: float | None) -> float | None:
        """The distilled guidance a request runs with: its ``guidance``, else the family's default (Flux.1 dev
        3.5); None for a model without a guidance embedding (schnell ignores the field)."""
        default = getattr(self.spec.sampling, "guidance", None)
        if default is None or not getattr(getattr(self.checkpoint.unet, "config", None), "guidance_embed", False):
            return None
        return default if requested is None else float(requested)

    def sigma_schedule(self, latents: torch.Tensor, steps: int | None = None) -> Any:
        """What the sigmas are drawn from: the training schedule, or for a flow model the schedule of this
        latent size (Flux.1 dev shifts by the packed 2x2 token count, as ``FluxPipeline``'s image_seq_len;
        FLUX.2 by its 1x1 token count and the schedule's ``steps``)."""
        if self.schedule is not None:
            return self.schedule
        height, width = latents.shape[-2:]
        variant = getattr(self.checkpoint.info, "variant", "")
        patch = getattr(self.spec.sampling, "patch", 2)
        return self.spec.sampling.flow_schedule(variant, (height // patch) * (width // patch), steps)


def load_model(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    compute_hash: bool = True,
    resident: bool = True,
    parts: dict[str, Path] | None = None,
) -> LoadedModel:
    """Load a checkpoint for sampling (``parts``: role -> file for components kept in separate files).
    ``dtype=None`` picks the device's compute dtype (``core.accel.device.compute_dtype``: on a CPU, bf16 with
    AMX, else fp32). ``resident=False`` leaves the networks in
    CPU memory (at the compute dtype) for a ``Placement`` to move."""
    from core.accel.device import compute_dtype
    from core.accel.memory import use_channels_last, vae_dtype
    from core.models.checkpoint import load_checkpoint
    from core.models.hashes import model_hash

    device = torch.device(device)
    checkpoint = load_checkpoint(path, vae_path=vae_path, parts=parts, device="cpu", dtype=None)
    dtype = dtype or compute_dtype(device, checkpoint.dtype)
    target = device if resident else torch.device("cpu")
    for role, module in checkpoint.components.items():
        module.to(device=target, dtype=vae_dtype(dtype) if role == "vae" else dtype).eval().requires_grad_(False)
        if role == "unet" and use_channels_last(device, module):
            module.to(memory_format=torch.channels_last)
    return LoadedModel(
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        name=Path(path).stem,
        model_hash=model_hash(path) if compute_hash else None,
    )


# ------------------------------------------------------------------------------------------ prompt cache


class PromptCache:
    """LRU cache of prompt encodings keyed by (model, encoder settings, prompt text): repeats re-encode
    nothing. Holds ``Conditioning``s."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Conditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, model: LoadedModel, text: str, settings: EncoderSettings | int = 1) -> Conditioning:
        """``settings`` may be a bare clip skip (the only SD1.x encoder setting)."""
        if isinstance(settings, int):
            settings = EncoderSettings(clip_skip=settings)
        # the checkpoint and text encoder files (the VAE does not change the encoding) and the LoRAs merged into
        # its text encoders
        loras = getattr(model, "loras", None)  # None: a model without the LoRA machinery (test stand-ins)
        # and the textual-inversion files the text names (an edited or added embedding changes the encoding)
        embeddings = getattr(model.conditioner, "embeddings", None)
        key = (model.key[0::2], loras.text_signature if loras is not None else (),
               embeddings.signature(text) if embeddings is not None else (), settings, text)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        placement = getattr(model, "placement", None)
        if placement is None:
            cond = model.conditioner.encode(text, settings)
        else:  # the text encoders come to the device only when a prompt is not cached
            with placement.use(placement_key(model), (TEXT_PREFIX,)):
                cond = model.conditioner.encode(text, settings)
        self._entries[key] = cond
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return cond

    def clear(self) -> None:
        self._entries.clear()


TEXT_PREFIX = "text_encoder"  # core.accel.memory.TEXT_PREFIX: the text encoders' roles


def placement_key(model: LoadedModel) -> str:
    """The name a model's networks have in its ``Placement`` (one per loaded model)."""
    return f"{model.name}@{id(model):x}"


@contextmanager
def on_device(model: LoadedModel | None, *roles: str) -> Iterator[None]:
    """The networks ``roles`` of ``model`` on its device for a stage (a no-op without a placement)."""
    placement = getattr(model, "placement", None)
    if placement is None:
        yield
        return
    with placement.use(placement_key(model), roles):
        yield


def static_shift(model: LoadedModel) -> float | None:
    """The static sigma shift a flow model samples with (Z-Image 3.0), or None (no shift, a dynamic one, DDPM)."""
    sampling = model.spec.sampling
    if not isinstance(sampling, FlowSampling):
        return None
    variant = getattr(model.checkpoint.info, "variant", "")
    if sampling.dynamic_shift is not None and variant not in sampling.static_variants:
        return None
    return sampling.shift if sampling.shift != 1.0 else None


def release_text_encoders(*models: LoadedModel | None) -> None:
    """Text encoders leave the GPU after encoding (to CPU RAM); a prompt not yet cached brings them back."""
    for model in models:
        placement = getattr(model, "placement", None)
        if placement is not None:
            placement.release(placement_key(model), (TEXT_PREFIX,))


def encode_conditioning(
    model: LoadedModel, request: GenerationRequest, cache: PromptCache
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) with equal token length, so CFG runs both in one UNet call. LoRA tags are not text: the
    encoders see the prompts without them. CFG 1 has no negative pass (Flux's default), so the negative prompt is
    not encoded then (uncond is cond: T5-XXL runs once per prompt, not twice)."""
    settings = EncoderSettings.from_request(request)
    cond = cache.encode(model, strip_tags(request.prompt), settings)
    if request.cfg == 1.0:
        return cond, cond
    uncond = cache.encode(model, strip_tags(request.negative_prompt), settings)
    if cond.tokens != uncond.tokens:
        cond, uncond = pad_to_same_length(cond, uncond, cache.encode(model, "", settings))
    return cond, uncond


def for_image(
    model: LoadedModel, request: GenerationRequest, cond: Conditioning, uncond: Conditioning, width: int, height: int
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) with what the family conditions on besides the text for a ``width`` x ``height`` image
    (SDXL's size vector ``y``); unchanged for families whose conditioner has no ``for_image``."""
    finish = getattr(model.conditioner, "for_image", None)
    if finish is None:
        return cond, uncond
    return (
        finish(cond, request.prompt, width, height, negative=False),
        finish(uncond, request.negative_prompt, width, height, negative=True),
    )


def prompt_parts(model: LoadedModel, request: GenerationRequest) -> list[tuple[str, float]]:
    """The positive prompt's ``AND`` parts with their weights (LoRA tags removed). Only families with
    classifier-free guidance compose them; for others an ``AND`` is a ``RequestError``."""
    text = strip_tags(request.prompt)
    parts = split_and(text)
    if isinstance(model.spec.sampling, DiscreteSampling):
        return parts
    if len(parts) > 1:
        raise RequestError("prompt", request.prompt, f"a prompt without AND: {model.spec.label} models have no "
                           "classifier-free guidance to compose AND parts with (SD1.x, SD2.x and SDXL do)")
    return [(text, 1.0)]


def prompt_conditioning(
    model: LoadedModel, request: GenerationRequest, cache: PromptCache, width: int, height: int, *, hires: bool = False
) -> ConditioningSchedule:
    """The request's prompts per denoiser call of the first pass (or, ``hires``, of the hires pass) as A1111
    schedules them: prompt editing, alternation and ``AND`` parts (``core.models.prompt_schedule``). Each
    distinct text is encoded once through ``cache``; each call's selection is padded to one length and given
    the family's image-size extras (``for_image``) once."""
    settings = EncoderSettings.from_request(request)
    steps = schedule_steps(request.sampler, request.steps)
    hires_steps = schedule_steps(request.sampler, request.hires.steps or request.steps) if hires else None

    def encoded(text: str) -> tuple[list[int], list[tuple[str, Conditioning]]]:
        schedule = prompt_schedule(text, steps, hires_steps)
        return [end for end, _ in schedule], [(t, cache.encode(model, t, settings)) for _, t in schedule]

    positive = [(*encoded(text), weight) for text, weight in prompt_parts(model, request)]
    if request.cfg == 1.0 and len(positive) == 1 and positive[0][2] == 1.0:
        # CFG 1 without AND has no negative pass (Flux's default): the negative prompt is not encoded, so
        # T5-XXL runs once per prompt, not twice. The schedule's negative is then never used.
        negative = positive[0][:2]
    else:
        negative = encoded(strip_tags(request.negative_prompt))
    finish_image = getattr(model.conditioner, "for_image", None)

    def finish(conds: list, uncond: tuple) -> tuple[list[Conditioning], Conditioning]:
        selected = [*conds, uncond]
        tokens = max(c.tokens for _, c in selected)
        empty = cache.encode(model, "", settings) if any(c.tokens != tokens for _, c in selected) else None
        out = []
        for index, (text, c) in enumerate(selected):
            c = c.pad_to(tokens, empty) if empty is not None else c
            if finish_image is not None:
                c = finish_image(c, text, width, height, negative=index == len(conds))
            out.append(c)
        return out[:-1], out[-1]

    return ConditioningSchedule(positive, negative, finish)


# ------------------------------------------------------------------------------------------ image helpers


def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """Decoded VAE output in [-1, 1] ``[B, 3, H, W]`` -> 8-bit RGB images (rounded like diffusers)."""
    pixels = ((latents.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [rgb_image(p.permute(1, 2, 0)) for p in pixels]


def image_to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB image -> ``[1, 3, H, W]`` in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    data = data.view(image.height, image.width, 3).permute(2, 0, 1)[None]
    return (data.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(dtype)


def load_init_image(path: str, width: int, height: int, with_size: bool = False) -> Any:
    """Open the img2img source and resize it to the request's size (Lanczos); ``with_size``: (image, the
    file's own size)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # changed since it was queued
            with Image.open(path) as opened:
                size = upright_size(opened)
                opened.draft("RGB", (width, height))  # a big JPEG decodes at a reduced scale still >= the size
                image = upright_rgb(opened)  # a photo's EXIF orientation; 16-bit grey scaled, not clipped
    except FileNotFoundError:
        raise InitImageError(f"init_image {path!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InitImageError(f"init_image {path!r} is too large to decode safely ({exc})") from None
    except OSError as exc:
        raise InitImageError(f"init_image {path!r} is not a readable image ({exc})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return (image, size) if with_size else image


# VAEs (by file) whose float16 decode overflowed in this process: they decode in float32 from then on.
_FP32_VAES: set[str] = set()


def _vae_source(model: LoadedModel) -> str:
    return str(model.checkpoint.vae_path or model.checkpoint.path)


def _finite(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values.sum(dtype=torch.float32)))  # see _check_finite


def _decode(vae: torch.nn.Module, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """``tile`` (latent pixels, from the job's memory plan) tiles the decode; without one, images above
    ``TILED_DECODE_LATENT_PIXELS`` tile at the VAE's default tile."""
    with torch.inference_mode():
        if tile is not None:
            return vae.decode_tiled(latents, tile=tile, overlap=min(16, tile // 4))
        if latents.shape[-1] * latents.shape[-2] > TILED_DECODE_LATENT_PIXELS:
            return vae.decode_tiled(latents)
        return vae.decode(latents)


def _vae_tile(model: LoadedModel) -> int | None:
    placement = getattr(model, "placement", None)
    return placement.plan.vae_tile if placement is not None else None


def _overflow_safe(model: LoadedModel, run: Callable[[], torch.Tensor],
                   before_retry: Callable[[], None] | None = None) -> torch.Tensor:
    """``run()`` on the model's VAE in its dtype; a float16 result that overflows (NaN/inf: the original SDXL
    VAE does, decoding and encoding) is redone in float32 after ``before_retry()``, and that VAE stays in
    float32 (A1111's automatic ``--no-half-vae``)."""
    vae, source = model.checkpoint.vae, _vae_source(model)
    if vae.dtype == torch.float16 and source in _FP32_VAES:
        vae.to(torch.float32)
    half = vae.dtype == torch.float16
    out = run()
    if half and not _finite(out):
        _FP32_VAES.add(source)
        vae.to(torch.float32)
        if before_retry is not None:
            before_retry()
        out = run()
    return out


def decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Decode in the VAE's dtype, redone in float32 where float16 overflows (``_overflow_safe``)."""
    with on_device(model, "vae"):
        tile = _vae_tile(model)
        return _overflow_safe(model, lambda: _decode(model.checkpoint.vae, latents, tile))


def _encode(vae: torch.nn.Module, images: torch.Tensor, generators: Sequence[torch.Generator],
            tile: int | None) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([vae.encode(image[None], generator=gen, **({"tile": tile} if tile else {}))
                          for image, gen in zip(images, generators)])


def encode_images(model: LoadedModel, images: torch.Tensor, noise: NoiseSampler) -> torch.Tensor:
    """VAE-encode each image, sampling its posterior with that image's own seeded generator.

    The posterior draw comes first in each image's stream, then the starting noise, then step noise; the
    same order diffusers uses with a CPU generator, so a seed gives the same img2img result in both. The
    original SDXL VAE overflows in float16 encoding too (diffusers#7188; diffusers upcasts it for img2img): a
    float16 encode giving NaN/inf is redone in float32 from the same generator states (``_overflow_safe``).
    """
    tile = _vae_tile(model)  # the memory plan's: large images encode in tiles too
    states = [gen.get_state() for gen in noise.generators]

    def rewind() -> None:
        for gen, state in zip(noise.generators, states):
            gen.set_state(state)

    with on_device(model, "vae"):
        latents = _overflow_safe(model, lambda: _encode(model.checkpoint.vae, images, noise.generators, tile), rewind)
    return latents.to(model.dtype)  # a VAE kept in float32 after an fp16 overflow still hands the UNet its dtype


# ------------------------------------------------------------------------------------------ sampling


@dataclass
class _Progress:
    """Counts steps over the whole job (every pass of every batch) for the step callback."""

    total: int
    on_step: StepCallback | None
    done: int = 0

    def callback(self, info: StepInfo) -> None:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total, info.denoised)


def _denoiser(
    model: LoadedModel, cond: Conditioning, uncond: Conditioning, cfg: float, batch: int, prediction: str = "auto",
    guidance: float | None = None, network: Any = None,
):
    inner = model.denoiser(prediction, guidance, network)
    if isinstance(cond, ConditioningSchedule):  # the denoiser expands each call's selection to the batch
        return CFGDenoiser(inner, cond=cond, uncond=None, cfg=cfg)
    return CFGDenoiser(inner, cond=cond.expand(batch), uncond=uncond.expand(batch), cfg=cfg)


def _run_sampler(
    model: LoadedModel,
    request: GenerationRequest,
    denoiser,
    start: torch.Tensor,
    noise_sampler: NoiseSampler,
    steps: int,
    denoise: float,
    progress: _Progress,
    is_cancelled: Callable[[], bool] | None,
) -> torch.Tensor:
    """Noise ``start`` (latents, or zeros for txt2img) to the schedule's first sigma, the family's way, and
    sample to x0."""
    schedule = model.sigma_schedule(start, schedule_length(steps, denoise))
    sigmas = get_sigmas(request.schedule, schedule, steps, denoise, model.family).to(model.device)
    # the request's DeepCache / first-block cache, fresh for this pass (nothing is carried between images)
    with torch.inference_mode(), feature_cache.for_pass(request):
        # noised in inference mode, as every later step's x is: a CUDA graph's key holds the tensor's kind
        # (dynamo guards on it), and a first step of another kind would cost a cfg 1 job a warm-up more
        x = model.spec.sampling.noise(start, noise_sampler.initial(), sigmas[0])
        return sample(
            request.sampler,
            denoiser,
            x,
            sigmas,
            callback=progress.callback,
            noise_sampler=noise_sampler,
            is_cancelled=is_cancelled,
        )


class RefinerSwitch:
    """The base model's guided denoiser, then the refiner's once the share ``switch`` of the denoising is done.

    Decided per call by the timestep of sigma, as A1111 does by default ("completed ratio" ``(999 - t) / 1000
    >= switch``) and diffusers' ``denoising_end``/``denoising_start`` (the refiner takes ``t < 1000 (1 -
    switch)``): t <= 199 at 0.8. The sampler's own state (multistep history, the noise stream) carries on
    across the switch, on the same latents and sigmas, as in A1111.
    """

    def __init__(
        self, base: Any, refiner: Any, schedule: DiscreteSchedule, switch: float, refiner_model: Any = None
    ) -> None:
        self.base, self.refiner = base, refiner
        self.refiner_model = refiner_model  # the LoadedModel behind ``refiner`` (its networks must be on the device)
        self.schedule = schedule
        self.refiner_from_t = 999 - round(switch * 1000)  # the refiner takes timesteps up to this one
        self.refined = False  # whether the refiner has run (its VAE then decodes)
        self.step = 0  # calls so far: the refiner's prompt schedule carries on where the base's stopped

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        top = sigma.max() if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
        t = round(float(self.schedule.sigma_to_t(top.float().cpu())))
        chosen = self.base
        if t <= self.refiner_from_t:
            self.refined = True
            chosen = self.refiner
        if hasattr(chosen, "step"):
            chosen.step = self.step
        self.step += 1
        return chosen(x, sigma)


class RefinerError(DarkroomError):
    """The refiner cannot continue this model's latents."""


def check_refiner(model: LoadedModel, refiner: LoadedModel) -> None:
    """A refiner continues the base's latents, so it must work in the same latent space."""
    from core.models.family import refiner_problem

    problem = refiner_problem(model.spec, refiner.spec, refiner.name)
    if problem is not None:
        raise RefinerError(problem)


def steps_per_image_batch(request: GenerationRequest) -> int:
    """Sampler steps one batch of the job takes (first pass + hires pass), as counted for progress."""
    # Truncated schedules (denoise < 1) still run ``steps`` steps; denoise 0 runs none.
    first = request.steps if not request.is_img2img or request.denoise > 0 else 0
    if request.hires is None:
        return first
    return first + ((request.hires.steps or request.steps) if request.hires.denoise > 0 else 0)


def generate(
    model: LoadedModel,
    request: GenerationRequest,
    *,
    cache: PromptCache | None = None,
    on_step: StepCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    refiner: LoadedModel | None = None,
    composite: bool = True,
    upscaler: Any = None,
    init: Image.Image | None = None,
    mask: Image.Image | None = None,
    detector: Callable[[str], Any] | None = None,
    use_loras: Callable[[Sequence[LoraRef]], Any] | None = None,
    have: Callable[[int], bool] | None = None,
    on_images: Callable[[list[tuple[Image.Image, int]]], None] | None = None,
) -> list[tuple[Image.Image, int]]:
    """Run one resolved request; returns (image, seed) for every image of every batch it made.

    ``on_images(batch)`` gets each batch's finished images as soon as they are done (the worker saves them
    then); a batch whose every seed ``have(seed)`` says is made already is skipped (a resumed job).

    ``refiner`` (the loaded ``request.refiner``) takes over each pass once ``request.refiner_switch`` of the
    denoising is done, and its VAE decodes when it did. Inpainting (``core.inpaint``) pastes the result into
    the original through the blurred mask; ``composite=False`` returns the decoded work images as they are.
    ``upscaler``: the loaded upscaler model a hires fix names (``core.upscale.LoadedUpscaler``).
    ``init`` / ``mask``: the init image and mask themselves (the detail pass's regions; the request's paths are
    then labels). The request's ``detailer`` passes (``core.detailer``) run last, on each final image, with
    ``detector(name)`` (``core.detectors.load_detector`` by default) finding the detectors, and ``use_loras(refs)``
    (``core.lora.patch.activate`` over the registry) merging a detail prompt's LoRA tags."""
    if request.seed < 0:
        raise ValueError("generate() needs a resolved seed (GenerationRequest.with_resolved_seed)")
    if request.lora_refs() != model.loras.requested:
        raise ValueError("generate() needs the request's LoRAs merged first (core.lora.patch.activate)")
    cache = cache or PromptCache()
    model.prediction_for(request.prediction)  # an override that does not apply fails before any work
    problem = sampler_problem(request.sampler, model.family)
    if problem is not None:
        raise problem
    from core.upscale import is_model_upscaler

    if request.hires is not None and is_model_upscaler(request.hires.upscaler) and upscaler is None:
        raise ValueError("generate() needs the hires fix's upscaler model loaded (core.upscale.load_upscaler)")
    guidance = model.guidance_for(request.guidance)
    job_request = request
    init = init if request.is_img2img else None
    inpainting = None  # core.inpaint.InpaintJob: what is sampled and how it goes back into the image
    if request.is_img2img:
        if init is None:
            init, init_size = load_init_image(request.init_image, request.width, request.height, with_size=True)
        else:
            init, init_size = flattened_rgb(init), init.size
        if request.is_inpaint:
            inpainting = inpaint.prepare(request, init, init_size, model.spec.pixel_multiple, mask_image=mask)
        if inpainting is not None:
            for warning in inpainting.warnings:
                log.warning("%s", warning)
            init = inpainting.work_image  # the job samples at its size (outpainted; the crop at the job's size)
            request = inpainting.work_request(request)
    # A1111 prompt editing/alternation/AND: each pass schedules the conditioning over its own steps.
    conds = prompt_conditioning(model, request, cache, request.width, request.height)
    hires_conds = None
    if request.hires is not None:  # SDXL conditions on the image size: the second pass gets its own (as A1111)
        hires_conds = prompt_conditioning(model, request, cache, *hires_size(model, request), hires=True)
    refiner_conds: dict[bool, Any] = {}  # hires pass? -> the refiner's conditioning schedule
    if refiner is not None:
        check_refiner(model, refiner)
        # Encoded now, while the text encoders are on the device: they leave it before sampling.
        refiner_conds[False] = prompt_conditioning(refiner, request, cache, request.width, request.height)
        if request.hires is not None:
            refiner_conds[True] = prompt_conditioning(
                refiner, request, cache, *hires_size(model, request), hires=True
            )
    release_text_encoders(model, refiner)

    def guided(first: Any, width: int, height: int, size: int, hires: bool = False) -> Any:
        """The CFG denoiser of ``first`` (the base's, for this image size), switching to the refiner's."""
        if refiner is None:
            return first
        second = _denoiser(refiner, refiner_conds[hires], None, request.cfg, size)
        return RefinerSwitch(first, second, model.schedule, request.refiner_switch, refiner)
    seeds = request.image_seeds()
    batches = [seeds[i * request.batch_size : (i + 1) * request.batch_size] for i in range(request.batch_count)]
    if have is not None:
        batches = [batch for batch in batches if not all(have(seed) for seed in batch)]
    progress = _Progress(total=steps_per_image_batch(request) * len(batches), on_step=on_step)
    init_pixels = None
    if init is not None:
        init_pixels = image_to_tensor(init, model.device, model.dtype)
    mask_input = inpaint.takes_mask_input(model.checkpoint.unet)  # a 9-channel inpainting UNet

    results: list[tuple[Image.Image, int]] = []
    for batch_seeds in batches:
        size = len(batch_seeds)
        noise = model.noise_sampler(batch_seeds, request.width, request.height)
        # An inpainting UNet at full strength never sees the init latents (diffusers encodes none either)
        if init_pixels is not None and not (mask_input and request.denoise >= 1.0):
            start = encode_images(model, init_pixels.expand(size, -1, -1, -1), noise)
        else:
            start = torch.zeros((size, *noise.shape), device=model.device, dtype=model.dtype)
        denoise = request.denoise if init_pixels is not None else 1.0
        network, latent_mask = None, None
        if mask_input or inpainting is not None:
            noise, network, latent_mask, start = _inpaint_inputs(
                model, request, inpainting, init_pixels, start, noise, batch_seeds, mask_input)
        denoiser = guided(_denoiser(model, conds, None, request.cfg, size, request.prediction, guidance, network),
                          request.width, request.height, size)
        if latent_mask is not None:  # a normal checkpoint: the latent noise mask keeps the unmasked area
            denoiser = inpaint.LatentMaskDenoiser(denoiser, start, noise.first, latent_mask, model.spec.sampling.noise)
        latents = start
        ran = [denoiser]
        if denoise > 0:
            with on_device(model, "unet"), on_device(refiner, "unet"):
                latents = _run_sampler(
                    model, request, denoiser, start, noise, request.steps, denoise, progress, is_cancelled
                )
        _check_finite(model, latents, "sampling")
        if latent_mask is not None:
            latents = inpaint.blend(latents, start, latent_mask)
        if request.hires is not None:
            w, h = hires_size(model, request)
            hires_denoiser = guided(
                _denoiser(model, hires_conds, None, request.cfg, size, request.prediction, guidance), w, h, size,
                hires=True,
            )
            ran.append(hires_denoiser)
            latents = _hires_pass(model, request, hires_denoiser, latents, batch_seeds, progress, is_cancelled,
                                  upscaler)
            _check_finite(model, latents, "sampling")
        last = refiner if refiner is not None and any(getattr(d, "refined", False) for d in ran) else model
        pixels = decode(last, latents)
        _check_finite(last, pixels, "decoding")
        images = latents_to_images(pixels)
        if inpainting is not None and composite:
            images = inpainting.finish(images)
        finished = list(zip(images, batch_seeds))
        if job_request.detailer and composite:  # the face/detail passes, on each final image of the batch
            finished = _detail_batch(model, job_request, finished, progress, cache=cache, is_cancelled=is_cancelled,
                                     detector=detector, use_loras=use_loras)
        if on_images is not None:
            on_images(finished)
        results.extend(finished)
    return results


def _detail_batch(
    model: LoadedModel, request: GenerationRequest, images: list[tuple[Image.Image, int]], progress: _Progress,
    **kwargs: Any,
) -> list[tuple[Image.Image, int]]:
    """The detail passes (``core.detailer``) on each image of one batch. Their steps are known only once the
    regions are detected, so each pass's count is added to the progress total as it runs."""
    from core.detailer import detail_image

    out = []
    for image, seed in images:
        first = progress.done

        def step(done: int, total: int, x0: torch.Tensor, first: int = first) -> None:
            # ``total`` counts on from ``first``: the job's total plus this image's detail steps so far
            if progress.on_step is not None:
                progress.on_step(done, progress.total + total - first, x0)

        image, ran = detail_image(model, request, image, seed, generate=generate, on_step=step, first_step=first,
                                  **kwargs)
        progress.done += ran
        progress.total += ran
        out.append((image, seed))
    return out


def _inpaint_inputs(
    model: LoadedModel, request: GenerationRequest, job: inpaint.InpaintJob | None, init_pixels: torch.Tensor | None,
    start: torch.Tensor, noise: NoiseSampler, seeds: list[int], mask_input: bool,
) -> tuple[inpaint.FirstDraw, Any, torch.Tensor | None, torch.Tensor]:
    """(noise sampler, network, latent noise mask, start latents) of one batch of an inpainting job, or of any
    job on an inpainting UNet. The starting noise is drawn first; then (inpainting UNet) the masked image is
    encoded from the same per-image streams, diffusers' order. An inpainting UNet without a mask repaints
    everything (A1111: mask 1, a grey masked image)."""
    size, height, width = start.shape[0], start.shape[-2], start.shape[-1]
    noise = inpaint.FirstDraw(noise)
    work_mask = job.work_mask if job is not None else torch.ones((1, 1, request.height, request.width))
    if job is not None:
        start = inpaint.masked_content(
            start, job.latent_mask(height, width, model.device, model.dtype), request.masked_content, seeds)
    if not mask_input:
        return noise, None, job.latent_mask(height, width, model.device, model.dtype), start
    pixels = init_pixels if init_pixels is not None else torch.zeros(
        (1, 3, request.height, request.width), device=model.device, dtype=model.dtype)
    masked = inpaint.masked_pixels(pixels, work_mask).expand(size, -1, -1, -1)
    masked_latents = encode_images(model, masked, noise.inner)
    cond_mask = inpaint.conditioning_mask(work_mask, height, width).to(device=model.device, dtype=model.dtype)
    extra = torch.cat([cond_mask.expand(size, -1, -1, -1), masked_latents], dim=1)
    return noise, inpaint.MaskedImageInput(cuda_graphs.replayed(model.checkpoint.unet), extra), None, start  # no latent blend, as diffusers


def hires_size(model: LoadedModel, request: GenerationRequest) -> tuple[int, int]:
    """Pixel size of the hires-fix pass: the scaled size rounded to the family's pixel multiple."""
    multiple = model.spec.pixel_multiple
    scale = request.hires.scale
    return round(request.width * scale / multiple) * multiple, round(request.height * scale / multiple) * multiple


def _hires_pass(
    model: LoadedModel,
    request: GenerationRequest,
    denoiser,
    latents: torch.Tensor,
    seeds: list[int],
    progress: _Progress,
    is_cancelled: Callable[[], bool] | None,
    upscaler: Any = None,
) -> torch.Tensor:
    """Upscale the first pass (in latent space, or decode-resize-encode; with an upscaler model, decode, the
    model's tiled upscale, a Lanczos resize to the hires size, as A1111 does, and encode) and re-sample at
    hires.denoise."""
    hires = request.hires
    width, height = hires_size(model, request)
    # Fresh per-image streams from the same seeds, as A1111 does: at the new size the draw is a different field.
    noise = model.noise_sampler(seeds, width, height)
    if hires.upscaler == "latent":
        upscaled = F.interpolate(latents.float(), size=noise.shape[1:], mode="bilinear")
        upscaled = upscaled.to(latents.dtype)
    else:
        images = latents_to_images(decode(model, latents))
        if upscaler is not None:
            from core.sampling import Cancelled
            from core.upscale import upscale_image

            def between_tiles(done: int, total: int) -> None:  # a large upscale stops at the next tile
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled(f"cancelled while upscaling, after tile {done} of {total}")

            resized = [upscale_image(upscaler, img, width, height, on_tile=between_tiles) for img in images]
        else:
            resized = [img.resize((width, height), Image.Resampling.LANCZOS) for img in images]
        pixels = torch.cat([image_to_tensor(img, model.device, model.dtype) for img in resized])
        upscaled = encode_images(model, pixels, noise)
    if hires.denoise <= 0:
        return upscaled
    with on_device(model, "unet"), on_device(getattr(denoiser, "refiner_model", None), "unet"):
        return _run_sampler(
            model,
            request,
            denoiser,
            upscaled,
            noise,
            hires.steps or request.steps,
            hires.denoise,
            progress,
            is_cancelled,
        )


# ------------------------------------------------------------------------------------------ worker runner


class PipelineRunner:
    """The worker's ``JobRunner``: resolves models, keeps one loaded, generates with previews."""

    def __init__(
        self,
        models_dirs: list[Path] | None = None,
        *,
        registry: ModelRegistry | None = None,
        device: str | torch.device | None = None,
        previews: bool = True,
        attention: str | AttentionDispatcher = "auto",
        memory: str = "auto",
        compile: str = "off",
        precision: str = "auto",
    ) -> None:
        from core.accel.attention import AttentionDispatcher
        from core.accel.compile import DenoiserCompiler
        from core.accel.device import compute_dtype, pick_device
        from core.accel.memory import Placement
        from core.accel.memory_mode import check_mode
        from core.accel.precision_mode import check_mode as check_precision
        from core.models.registry import ModelRegistry

        self.registry = registry or ModelRegistry(models_dirs)
        self.device = pick_device(device)
        # auto, fp32, bf16, fp16 (core.accel.precision_mode): every network of every job runs in this dtype
        self.dtype = compute_dtype(self.device, precision=check_precision(precision))
        self.previews = previews
        # TAESD decoders from models/vae_approx when present, else the projection; throttled to 2 % of a job
        self.preview_decoders = PreviewDecoders(lambda: self.registry.roots)
        # One dispatcher per runner: its per-shape fallbacks last as long as the runner, its layer record a job.
        self.attention = attention if isinstance(attention, AttentionDispatcher) else AttentionDispatcher(attention)
        self.cache = PromptCache()
        # --compile: each loaded denoiser's blocks compiled once; the compiled code stays while the model does
        self.compiler = DenoiserCompiler(compile, self.device)
        self.model: LoadedModel | None = None
        from core.lora.files import LoraFileCache

        self.lora_files = LoraFileCache()
        from core.models.embeddings import EmbeddingLibrary

        # textual inversions in models/embeddings, read when a prompt names them
        self.embeddings = EmbeddingLibrary(lambda: [(m.name, m.path) for m in self.registry.embeddings()])
        self.refiner: LoadedModel | None = None
        # The memory policy (core.accel.memory): a plan per job from its estimate, or forced by ``memory``
        # (auto, gpu, lowvram, sequential: core.accel.memory_mode); the placement moves the networks for it.
        self.memory_mode = check_mode(memory, "memory")
        self.placement = Placement(self.device)
        self.memory_plan: Any = None  # the last job's MemoryPlan (its describe() is shown when not default)
        self.job_graphs: Any = None  # the last job's core.accel.cuda_graphs.CudaGraphs (None: no graphs)
        from core.models.split import PartSet

        self.parts = PartSet(Path(), None)  # the files of the model the last job used
        from core.upscale import UpscalerCache

        # the last upscaler model a job used (hires fix or an upscale job), kept loaded between jobs
        self.upscalers = UpscalerCache(lambda name: self.registry.find_upscaler(name), self.device, self.dtype)

    @property
    def loaded_model(self) -> str | None:
        return self.model.name if self.model else None

    def ensure_model(self, request: GenerationRequest, ctx: RunContext | None = None) -> LoadedModel:
        from core.models.split import resolve_parts

        path = self.registry.find_checkpoint(request.model)
        # the text encoders and VAE: named by the job, or picked from the folders for a diffusion model kept alone
        self.parts = resolve_parts(self.registry, path, request.text_encoders, request.vae)
        vae_path = self.parts.vae
        encoders = self.parts.text_encoders
        key = (str(path), str(vae_path) if vae_path else None,
               tuple(f"{role}={p}" for role, p in sorted(encoders.items())))
        if self.model is not None and self.model.key == key:
            return self.model
        if self.model is not None and self.model.key[0::2] == key[0::2]:
            # same checkpoint, other VAE: the UNet, text encoder and cached prompts stay as they are
            if ctx is not None:
                ctx.set_activity(f"loading VAE {(vae_path or path).name}")
            self.model.replace_vae(vae_path)
            return self.model
        if self.model is not None:  # free the old checkpoint before the new one takes memory
            self.placement.forget(placement_key(self.model))
            self.model = None
            self.cache.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if ctx is not None:
            picked = self.parts.picked_message()
            ctx.set_activity(f"loading {path.name}" + (f"; {picked}" if picked else ""))
        # On a GPU the networks load into CPU memory; the job's plan moves them (all of them, for most jobs)
        self.model = load_model(path, vae_path=vae_path, device=self.device, dtype=self.dtype,
                                resident=not self.placement.active, parts=encoders)
        self.model.placement = self.placement
        self.model.conditioner.embeddings = self.embeddings
        self.dtype = self.model.dtype
        return self.model

    def ensure_refiner(self, request: GenerationRequest, ctx: RunContext | None = None) -> LoadedModel | None:
        """The request's refiner, loaded beside the model (with the request's VAE, as A1111 does); kept
        loaded while jobs use the same one."""
        if not request.refiner:
            if self.refiner is not None:
                self.placement.forget(placement_key(self.refiner))
            self.refiner = None
            return None
        path = self.registry.find_checkpoint(request.refiner)
        vae_path = self.registry.find_vae(request.vae) if request.vae else None
        key = (str(path), str(vae_path) if vae_path else None, ())
        if self.refiner is not None and self.refiner.key == key:
            return self.refiner
        if self.refiner is not None:
            self.placement.forget(placement_key(self.refiner))
        self.refiner = None
        gc.collect()
        if ctx is not None:
            ctx.set_activity(f"loading refiner {path.name}")
        # no hash: the infotext names the refiner by file name only
        self.refiner = load_model(path, vae_path=vae_path, device=self.device, dtype=self.dtype, compute_hash=False,
                                  resident=not self.placement.active)
        self.refiner.placement = self.placement
        self.refiner.conditioner.embeddings = self.embeddings
        return self.refiner

    def ensure_upscaler(self, name: str, ctx: RunContext | None = None) -> Any:
        """The upscaler model ``name`` on the device, in the compute dtype where its architecture has it."""
        from core.upscale import import_spandrel

        import_spandrel()  # missing: one message saying what to install, before anything loads
        path = self.registry.find_upscaler(name)
        current = self.upscalers.loaded
        if ctx is not None and (current is None or current.path != path):
            ctx.set_activity(f"loading upscaler {path.name}")
        self.upscalers.device = self.device
        return self.upscalers.get(name, self.dtype)

    def run_upscale(self, job: Job, ctx: RunContext) -> list[GeneratedImage]:
        """A standalone upscale job: ``upscale.image`` through its upscaler model, nothing sampled; the image
        records the request (the source's parameters, and the source infotext's own keys such as its model hash)
        and A1111's ``Postprocess upscale by`` / ``Postprocess upscaler``."""
        from core.upscale import display_name, source_infotext_keys, upscale_image

        request = job.request
        started = time.monotonic()
        upscaler = self.ensure_upscaler(request.upscale.upscaler, ctx)
        loaded = time.monotonic()
        path = request.upscale.image
        try:
            with Image.open(path) as opened:
                source = upright_rgb(opened)
                carried = source_infotext_keys(opened)
        except (OSError, ValueError) as exc:
            raise InitImageError(f"upscale.image {path!r} is not a readable image ({exc})") from None
        factor = request.upscale.scale or upscaler.scale
        width, height = round(source.width * factor), round(source.height * factor)
        ctx.set_activity(f"upscaling {source.width}x{source.height} -> {width}x{height} with {upscaler.label}")
        image = upscale_image(upscaler, source, width, height, on_tile=lambda done, total: ctx.step(done, total))
        finished = time.monotonic()
        extra = {**carried, "Postprocess upscale by": factor,
                 "Postprocess upscaler": display_name(request.upscale.upscaler)}
        timings = {"load": loaded - started, "first_step": 0.0, "total": finished - started}
        return [GeneratedImage(image=image, seed=request.seed, request=request, timings=timings, extra=extra,
                               model_hash=carried.pop("Model hash", None))]

    def run(self, job: Job, ctx: RunContext) -> list[GeneratedImage]:
        request = job.request
        if request.upscale is not None:
            return self.run_upscale(job, ctx)
        started = time.monotonic()
        from core.upscale import is_model_upscaler

        upscaler = None
        if request.hires is not None and is_model_upscaler(request.hires.upscaler):
            upscaler = self.ensure_upscaler(request.hires.upscaler, ctx)
        model = self.ensure_model(request, ctx)
        mismatch = model_hash_warning(request, model.checkpoint.path, model.model_hash)
        if mismatch is not None:  # a job from an image made with another file of this name
            log.warning("%s", mismatch)  # the job's JobWarning (--batch said it before running when it knew)
        lora_extra = self.apply_loras(model, request, ctx)
        refiner = self.ensure_refiner(request, ctx)
        if self.compiler.enabled:
            for loaded_model in (model, refiner):
                if loaded_model is not None:
                    self.compiler.prepare(loaded_model.checkpoint.unet)
        compiles = self.compiler.compiles
        # the first job of a size on a compiled denoiser compiles in its first step: said, then "generating"
        compiling = self.compiler.new_shape(model.checkpoint.unet, (request.width, request.height, request.batch_size))
        loaded = time.monotonic()
        for warning in cache_warnings(request, model.spec):
            log.warning("%s", warning)  # the job's JobWarning: front ends say which job
        first_step: list[float] = []
        previewer = self.preview_decoders.previewer(model.family, model.device, model.dtype) if self.previews else None

        def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
            if not first_step:
                first_step.append(time.monotonic() - loaded)
                if compiling:
                    ctx.set_activity(generating_activity(self.memory_plan))
            preview = previewer.maybe_preview(denoised[:1]) if previewer is not None else None
            ctx.step(step, total, preview)

        guidance = model.guidance_for(request.guidance)
        if guidance is not None:  # Forge's key; recorded when the model used it, default or not
            lora_extra = {"Distilled CFG Scale": guidance, **lora_extra}
        shift = static_shift(model)
        if shift is not None:  # Forge Neo's key for a flow model's sigma shift (Z-Image: 3)
            lora_extra = {"Shift": shift, **lora_extra}

        def finished(images: list[tuple[Image.Image, int]]) -> list[GeneratedImage]:
            timings = {
                "load": loaded - started,
                "first_step": first_step[0] if first_step else 0.0,
                "total": time.monotonic() - started,  # up to this image's batch
            }
            if self.compiler.enabled:
                timings["compiles"] = float(self.compiler.compiles - compiles)  # graphs built in this job
            return [
                GeneratedImage(image=image, seed=seed, request=request, model_hash=model.model_hash, timings=timings,
                               family=model.family, extra={**self.parts.infotext(), **lora_extra})
                for image, seed in images
            ]

        # Each batch is saved as soon as it is made (a kill later in the job keeps it), and a resumed job makes
        # only the images it lacks; a context without these (a test's) gets every image back at the end.
        save_now = getattr(ctx, "save_images", None)
        have = getattr(ctx, "has_image", None)

        def attempt() -> list[tuple[Image.Image, int]]:
            graphs = self.compiler.cuda_graphs(self.memory_plan.offload)
            in_graphs = cuda_graphs.for_job(graphs, self.compiler.graph_api, self.compiler.uncapturable)
            if compiling:
                ctx.set_activity(COMPILING)
            with self.attention.active(new_job=True), in_graphs as used:
                self.job_graphs = used  # what the job captured and replayed (the bench and tests read it)
                return generate(
                    model, request, cache=self.cache, on_step=on_step, is_cancelled=ctx.is_cancelled, refiner=refiner,
                    upscaler=upscaler,
                    detector=self.detector,
                    use_loras=lambda refs: self.activate_loras(model, refs),
                    have=have,
                    on_images=(lambda images: save_now(finished(images))) if save_now is not None else None,
                )

        results = self.run_with_memory_plan(model, request, refiner, ctx, attempt)
        return [] if save_now is not None else finished(results)

    def detector(self, name: str) -> Any:
        """The detail pass's detector ``name`` (``core.detectors``; YOLO files from this runner's folders)."""
        from core.detectors import load_detector

        return load_detector(name, self.registry)

    def plan_memory(self, model: LoadedModel, request: GenerationRequest, refiner: LoadedModel | None = None) -> Any:
        """The job's memory plan: its estimate against the device's free memory (the networks the placement
        holds on the device count as free: it can move them), or what the memory mode forces."""
        from core.accel.memory import choose_plan, estimate_job, free_memory

        device = self.placement.device  # the runner's device (a test's stand-in places nothing)
        estimate = estimate_job(model, request, refiner)
        free = free_memory(device)
        if free is not None:
            free += self.placement.resident_bytes()
        plan = choose_plan(estimate, free, self.memory_mode, device)
        # merge buffers a LoRA switch kept on the GPU (for a switch back) give way to a less intrusive plan (on
        # the CPU they are RAM like the rest, and nothing moves)
        patchers = [p for m in (model, refiner) if m is not None and (p := getattr(m, "loras", None)) is not None]
        kept = sum(p.spare_bytes(device) for p in patchers) if self.placement.active else 0
        if free is not None and kept:
            roomier = choose_plan(estimate, free + kept, self.memory_mode, device)
            if (roomier.offload, roomier.vae_tile) != (plan.offload, plan.vae_tile):
                for patcher in patchers:
                    patcher.drop_spares(device)
                plan = roomier
        return plan, estimate

    def run_with_memory_plan(
        self, model: LoadedModel, request: GenerationRequest, refiner: LoadedModel | None, ctx: RunContext,
        attempt: Callable[[], list[tuple[Image.Image, int]]],
    ) -> list[tuple[Image.Image, int]]:
        """Run ``attempt`` under the job's memory plan; out of memory frees what the failed try held and
        retries once with the next plan (offload, tiled VAE), else fails this job with what would fit."""
        from core.accel.memory import escalate, free_cached, is_out_of_memory

        for loaded in (model, refiner):
            if loaded is not None:  # the LoRA merges follow the networks home (LoraPatcher.follow)
                loras = getattr(loaded, "loras", None)
                self.placement.register(placement_key(loaded), loaded.checkpoint.components,
                                        loras.follow if loras is not None else None)
        try:
            plan, estimate = self.plan_memory(model, request, refiner)
        except Exception as exc:  # noqa: BLE001 - a network the estimate does not know never fails the job
            from core.accel.memory import MemoryPlan

            warnings.warn(f"memory estimate unavailable ({type(exc).__name__}: {exc}); everything stays on the "
                          "device", stacklevel=2)
            plan, estimate = MemoryPlan(mode=self.memory_mode, reason="no estimate"), None
        for retry in (False, True):
            self.memory_plan = plan
            ctx.set_activity(generating_activity(plan))
            for loaded in (model, refiner):
                conflict = loaded and self.compiler.offload_conflict(loaded.checkpoint.unet, plan.offload)
                if conflict:
                    raise DarkroomError(conflict)
            try:
                self.placement.prepare(plan)
                return attempt()
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
                if not is_out_of_memory(exc):
                    raise
            # outside the except block: the traceback (and the tensors its frames hold) is gone
            free_cached(self.device)
            following = escalate(plan, estimate, self.placement.device) if not retry and estimate else None
            if following is None:
                break
            plan = following
        self.placement.release_all()
        free_cached(self.device)
        raise OutOfMemoryJobError(self._oom_message(model, request, refiner, plan, retried=retry))

    def _oom_message(
        self, model: LoadedModel, request: GenerationRequest, refiner: LoadedModel | None, plan: Any,
        retried: bool = True,
    ) -> str:
        import dataclasses

        from core.accel.memory import GiB, estimate_job, free_memory, what_would_fit

        free = free_memory(self.placement.device)

        def estimate_for(width: int, height: int, batch: int) -> Any:
            sized = dataclasses.replace(request, width=width, height=height, batch_size=batch)
            return estimate_job(model, sized, refiner)

        try:
            advice = what_would_fit(estimate_for, request.width, request.height, request.batch_size,
                                    model.spec.pixel_multiple, free, self.memory_mode)
        except Exception:  # noqa: BLE001 - no estimate for this model: the general advice
            advice = "a smaller size, fewer images per batch, or --lowvram"
        tried = plan.describe().split(" (")[0] or "everything on the device"
        tried = f"also after retrying with {tried}" if retried else f"with {tried} (nothing left to retry with)"
        room = f", {free / GiB:.1f} GB free" if free is not None else ""
        images = f" with {request.batch_size} images per batch" if request.batch_size > 1 else ""
        return (f"out of memory on {self.placement.device} at {request.width}x{request.height}{images} (estimated "
                f"{plan.need / GiB:.1f} GB{room}), {tried}; what would fit: {advice}")

    def activate_loras(self, model: LoadedModel, refs: Sequence[LoraRef]) -> None:
        """Merge ``refs`` in place of the current set (a detail prompt's LoRA tags, mid-job)."""
        from core.lora.patch import activate

        activate(model.loras, refs, self.registry.find_lora, self.lora_files, model=model.name)

    def apply_loras(self, model: LoadedModel, request: GenerationRequest, ctx: RunContext | None = None) -> dict:
        """Merge the request's LoRAs in place of the previous job's (only what changed is re-merged); returns
        the infotext fields that record them (A1111's ``Lora hashes``)."""
        refs = request.lora_refs()
        if refs != model.loras.requested and ctx is not None:
            ctx.set_activity(f"applying {len(refs)} LoRA{'s' if len(refs) != 1 else ''}" if refs else "removing LoRAs")
        self.activate_loras(model, refs)
        if not model.loras.active:
            return {}
        hashes: dict[str, str] = {}
        for active in model.loras.active:
            hashes.setdefault(active.ref.label(), active.file.shorthash)
        return {"Lora hashes": ", ".join(f"{name}: {h}" for name, h in hashes.items())}
