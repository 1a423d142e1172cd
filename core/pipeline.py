"""The generation pipeline: txt2img, img2img and hires-fix over the core's networks and samplers.

``generate()`` turns one resolved ``GenerationRequest`` into images with a loaded model; ``PipelineRunner``
is the worker's ``JobRunner``: it keeps one checkpoint loaded between jobs (switching frees the old one),
caches prompt encodings, and reports every step with a cheap x0 preview.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import DarkroomError, RequestError
from core.lora.tags import strip_tags
from core.models.conditioning import Conditioning, EncoderSettings, pad_to_same_length
from core.models.families import get_family
from core.models.family import ModelFamily, resolve
from core.models.previews import PreviewDecoders
from core.request import GenerationRequest
from core.runner import GeneratedImage, RunContext
from core.sampling.denoisers import CFGDenoiser, DiscreteSchedule
from core.sampling.noise import NoiseSampler
from core.sampling.samplers import StepInfo, sample
from core.sampling.schedules import get_sigmas
from core.tensor_bytes import rgb_image

if TYPE_CHECKING:
    from core.accel.attention import AttentionDispatcher
    from core.models.checkpoint import LoadedCheckpoint
    from core.models.registry import ModelRegistry
    from core.store import Job

# Above this many latent pixels the VAE decodes in overlapping tiles (1024x1024 images and up), which
# bounds memory with no visible seams.
TILED_DECODE_LATENT_PIXELS = 128 * 128

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step 1-based over the job, total, x0 batch)


class InitImageError(DarkroomError):
    """The img2img source image cannot be used."""


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
    def key(self) -> tuple[str, str | None]:
        vae = self.checkpoint.vae_path
        return (str(self.checkpoint.path), str(vae) if vae else None)

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

    def denoiser(self, prediction: str = "auto") -> Any:
        """The UNet wrapped as ``denoise(x, sigma, **cond) -> x0`` for its prediction type (or ``prediction``,
        a request's override)."""
        return self.spec.sampling.denoiser(self.checkpoint.unet, self.schedule, self.prediction_for(prediction))


def load_model(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    compute_hash: bool = True,
) -> LoadedModel:
    """Load a checkpoint for sampling. ``dtype=None`` picks the device's compute dtype (fp32 on CPU)."""
    from core.accel.device import compute_dtype
    from core.models.checkpoint import load_checkpoint, model_hash

    device = torch.device(device)
    checkpoint = load_checkpoint(path, vae_path=vae_path, device="cpu", dtype=None)
    dtype = dtype or compute_dtype(device, checkpoint.dtype)
    for module in checkpoint.components.values():
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
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
        # the checkpoint file (the VAE does not change the encoding) and the LoRAs merged into its text encoders
        loras = getattr(model, "loras", None)  # None: a model without the LoRA machinery (test stand-ins)
        # and the textual-inversion files the text names (an edited or added embedding changes the encoding)
        embeddings = getattr(model.conditioner, "embeddings", None)
        key = (model.key[0], loras.text_signature if loras is not None else (),
               embeddings.signature(text) if embeddings is not None else (), settings, text)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        cond = model.conditioner.encode(text, settings)
        self._entries[key] = cond
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return cond

    def clear(self) -> None:
        self._entries.clear()


def encode_conditioning(
    model: LoadedModel, request: GenerationRequest, cache: PromptCache
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) with equal token length, so CFG runs both in one UNet call. LoRA tags are not text: the
    encoders see the prompts without them."""
    settings = EncoderSettings.from_request(request)
    cond = cache.encode(model, strip_tags(request.prompt), settings)
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


def load_init_image(path: str, width: int, height: int) -> Image.Image:
    """Open the img2img source and resize it to the request's size (Lanczos)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # changed since it was queued
            with Image.open(path) as opened:
                opened.draft("RGB", (width, height))  # a big JPEG decodes at a reduced scale still >= the size
                image = opened.convert("RGB")
    except FileNotFoundError:
        raise InitImageError(f"init_image {path!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InitImageError(f"init_image {path!r} is too large to decode safely ({exc})") from None
    except OSError as exc:
        raise InitImageError(f"init_image {path!r} is not a readable image ({exc})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


# VAEs (by file) whose float16 decode overflowed in this process: they decode in float32 from then on.
_FP32_VAES: set[str] = set()


def _vae_source(model: LoadedModel) -> str:
    return str(model.checkpoint.vae_path or model.checkpoint.path)


def _finite(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values.sum(dtype=torch.float32)))  # see _check_finite


def _decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if latents.shape[-1] * latents.shape[-2] > TILED_DECODE_LATENT_PIXELS:
            return vae.decode_tiled(latents)
        return vae.decode(latents)


def decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Decode in the VAE's dtype; a float16 decode that overflows (NaN/inf: the original SDXL VAE does) is
    redone in float32, and that VAE stays in float32 (A1111's automatic ``--no-half-vae``)."""
    vae = model.checkpoint.vae
    source = _vae_source(model)
    if vae.dtype == torch.float16 and source in _FP32_VAES:
        vae.to(torch.float32)
    pixels = _decode(vae, latents)
    if vae.dtype == torch.float16 and not _finite(pixels):
        _FP32_VAES.add(source)
        vae.to(torch.float32)
        pixels = _decode(vae, latents)
    return pixels


def encode_images(model: LoadedModel, images: torch.Tensor, noise: NoiseSampler) -> torch.Tensor:
    """VAE-encode each image, sampling its posterior with that image's own seeded generator.

    The posterior draw comes first in each image's stream, then the starting noise, then step noise; the
    same order diffusers uses with a CPU generator, so a seed gives the same img2img result in both.
    """
    vae = model.checkpoint.vae
    with torch.inference_mode():
        return torch.cat(
            [vae.encode(image[None], generator=gen) for image, gen in zip(images, noise.generators)]
        ).to(model.dtype)  # a VAE kept in float32 after an fp16 overflow still hands the UNet its dtype


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
    model: LoadedModel, cond: Conditioning, uncond: Conditioning, cfg: float, batch: int, prediction: str = "auto"
):
    return CFGDenoiser(model.denoiser(prediction), cond=cond.expand(batch), uncond=uncond.expand(batch), cfg=cfg)


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
    sigmas = get_sigmas(request.schedule, model.schedule, steps, denoise, model.family).to(model.device)
    x = model.spec.sampling.noise(start, noise_sampler.initial(), sigmas[0])
    with torch.inference_mode():
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

    def __init__(self, base: Any, refiner: Any, schedule: DiscreteSchedule, switch: float) -> None:
        self.base, self.refiner = base, refiner
        self.schedule = schedule
        self.refiner_from_t = 999 - round(switch * 1000)  # the refiner takes timesteps up to this one
        self.refined = False  # whether the refiner has run (its VAE then decodes)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        top = sigma.max() if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
        t = round(float(self.schedule.sigma_to_t(top.float().cpu())))
        if t <= self.refiner_from_t:
            self.refined = True
            return self.refiner(x, sigma)
        return self.base(x, sigma)


class RefinerError(DarkroomError):
    """The refiner cannot continue this model's latents."""


def check_refiner(model: LoadedModel, refiner: LoadedModel) -> None:
    """A refiner continues the base's latents, so it must work in the same latent space."""
    a, b = model.spec.latent, refiner.spec.latent
    if (a.channels, a.scale, a.shift) != (b.channels, b.scale, b.shift):
        raise RefinerError(
            f"refiner {refiner.name!r} is {refiner.spec.label}, whose latent space differs from "
            f"{model.spec.label}'s; choose an SDXL refiner for an SDXL model"
        )


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
) -> list[tuple[Image.Image, int]]:
    """Run one resolved request; returns (image, seed) for every image of every batch.

    ``refiner`` (the loaded ``request.refiner``) takes over each pass once ``request.refiner_switch`` of the
    denoising is done, and its VAE decodes when it did."""
    if request.seed < 0:
        raise ValueError("generate() needs a resolved seed (GenerationRequest.with_resolved_seed)")
    if request.lora_refs() != model.loras.requested:
        raise ValueError("generate() needs the request's LoRAs merged first (core.lora.patch.activate)")
    cache = cache or PromptCache()
    model.prediction_for(request.prediction)  # an override that does not apply fails before any work
    text_cond, text_uncond = encode_conditioning(model, request, cache)
    cond, uncond = for_image(model, request, text_cond, text_uncond, request.width, request.height)
    refiner_text = None
    if refiner is not None:
        check_refiner(model, refiner)
        refiner_text = encode_conditioning(refiner, request, cache)

    def guided(first: Any, width: int, height: int, size: int) -> Any:
        """The CFG denoiser of ``first`` (the base's, for this image size), switching to the refiner's."""
        if refiner_text is None:
            return first
        second = _denoiser(refiner, *for_image(refiner, request, *refiner_text, width, height), request.cfg, size)
        return RefinerSwitch(first, second, model.schedule, request.refiner_switch)
    seeds = request.image_seeds()
    progress = _Progress(total=steps_per_image_batch(request) * request.batch_count, on_step=on_step)
    init_pixels = None
    if request.is_img2img:
        init = load_init_image(request.init_image, request.width, request.height)
        init_pixels = image_to_tensor(init, model.device, model.dtype)

    results: list[tuple[Image.Image, int]] = []
    for batch_index in range(request.batch_count):
        batch_seeds = seeds[batch_index * request.batch_size : (batch_index + 1) * request.batch_size]
        size = len(batch_seeds)
        denoiser = guided(_denoiser(model, cond, uncond, request.cfg, size, request.prediction), request.width,
                          request.height, size)
        noise = model.noise_sampler(batch_seeds, request.width, request.height)
        if init_pixels is not None:
            start = encode_images(model, init_pixels.expand(size, -1, -1, -1), noise)
            denoise = request.denoise
        else:
            start = torch.zeros((size, *noise.shape), device=model.device, dtype=model.dtype)
            denoise = 1.0
        latents = start
        ran = [denoiser]
        if denoise > 0:
            latents = _run_sampler(
                model, request, denoiser, start, noise, request.steps, denoise, progress, is_cancelled
            )
        _check_finite(model, latents, "sampling")
        if request.hires is not None:
            hires_denoiser = denoiser
            w, h = hires_size(model, request)
            if getattr(model.conditioner, "for_image", None) is not None:
                # SDXL conditions on the image size: the second pass gets its own (A1111 does the same).
                hires_denoiser = guided(
                    _denoiser(model, *for_image(model, request, text_cond, text_uncond, w, h), request.cfg, size),
                    w, h, size,
                )
            ran.append(hires_denoiser)
            latents = _hires_pass(model, request, hires_denoiser, latents, batch_seeds, progress, is_cancelled)
            _check_finite(model, latents, "sampling")
        last = refiner if refiner is not None and any(getattr(d, "refined", False) for d in ran) else model
        pixels = decode(last, latents)
        _check_finite(last, pixels, "decoding")
        results.extend(zip(latents_to_images(pixels), batch_seeds))
    return results


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
) -> torch.Tensor:
    """Upscale the first pass (in latent space, or decode-resize-encode) and re-sample at hires.denoise."""
    hires = request.hires
    width, height = hires_size(model, request)
    # Fresh per-image streams from the same seeds, as A1111 does: at the new size the draw is a different field.
    noise = model.noise_sampler(seeds, width, height)
    if hires.upscaler == "latent":
        upscaled = F.interpolate(latents.float(), size=noise.shape[1:], mode="bilinear")
        upscaled = upscaled.to(latents.dtype)
    else:
        images = latents_to_images(decode(model, latents))
        resized = [img.resize((width, height), Image.Resampling.LANCZOS) for img in images]
        pixels = torch.cat([image_to_tensor(img, model.device, model.dtype) for img in resized])
        upscaled = encode_images(model, pixels, noise)
    if hires.denoise <= 0:
        return upscaled
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
    ) -> None:
        from core.accel.attention import AttentionDispatcher
        from core.accel.device import compute_dtype, pick_device
        from core.models.registry import ModelRegistry

        self.registry = registry or ModelRegistry(models_dirs)
        self.device = pick_device(device)
        self.dtype = compute_dtype(self.device)
        self.previews = previews
        # TAESD decoders from models/vae_approx when present, else the projection; throttled to 2 % of a job
        self.preview_decoders = PreviewDecoders(lambda: self.registry.roots)
        # One dispatcher per runner: its per-shape fallbacks last as long as the runner, its layer record a job.
        self.attention = attention if isinstance(attention, AttentionDispatcher) else AttentionDispatcher(attention)
        self.cache = PromptCache()
        self.model: LoadedModel | None = None
        from core.lora.files import LoraFileCache

        self.lora_files = LoraFileCache()
        from core.models.embeddings import EmbeddingLibrary

        # textual inversions in models/embeddings, read when a prompt names them
        self.embeddings = EmbeddingLibrary(lambda: [(m.name, m.path) for m in self.registry.embeddings()])
        self.refiner: LoadedModel | None = None

    @property
    def loaded_model(self) -> str | None:
        return self.model.name if self.model else None

    def ensure_model(self, request: GenerationRequest, ctx: RunContext | None = None) -> LoadedModel:
        path = self.registry.find_checkpoint(request.model)
        vae_path = self.registry.find_vae(request.vae) if request.vae else None
        key = (str(path), str(vae_path) if vae_path else None)
        if self.model is not None and self.model.key == key:
            return self.model
        if self.model is not None and self.model.key[0] == key[0]:
            # same checkpoint, other VAE: the UNet, text encoder and cached prompts stay as they are
            if ctx is not None:
                ctx.set_activity(f"loading VAE {(vae_path or path).name}")
            self.model.replace_vae(vae_path)
            return self.model
        if self.model is not None:  # free the old checkpoint before the new one takes memory
            self.model = None
            self.cache.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if ctx is not None:
            ctx.set_activity(f"loading {path.name}")
        self.model = load_model(path, vae_path=vae_path, device=self.device)
        self.model.conditioner.embeddings = self.embeddings
        self.dtype = self.model.dtype
        return self.model

    def ensure_refiner(self, request: GenerationRequest, ctx: RunContext | None = None) -> LoadedModel | None:
        """The request's refiner, loaded beside the model (with the request's VAE, as A1111 does); kept
        loaded while jobs use the same one."""
        if not request.refiner:
            self.refiner = None
            return None
        path = self.registry.find_checkpoint(request.refiner)
        vae_path = self.registry.find_vae(request.vae) if request.vae else None
        key = (str(path), str(vae_path) if vae_path else None)
        if self.refiner is not None and self.refiner.key == key:
            return self.refiner
        self.refiner = None
        gc.collect()
        if ctx is not None:
            ctx.set_activity(f"loading refiner {path.name}")
        # no hash: the infotext names the refiner by file name only
        self.refiner = load_model(path, vae_path=vae_path, device=self.device, dtype=self.dtype, compute_hash=False)
        self.refiner.conditioner.embeddings = self.embeddings
        return self.refiner

    def run(self, job: Job, ctx: RunContext) -> list[GeneratedImage]:
        request = job.request
        started = time.monotonic()
        model = self.ensure_model(request, ctx)
        lora_extra = self.apply_loras(model, request, ctx)
        refiner = self.ensure_refiner(request, ctx)
        loaded = time.monotonic()
        ctx.set_activity("generating")
        first_step: list[float] = []
        previewer = self.preview_decoders.previewer(model.family, model.device, model.dtype) if self.previews else None

        def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
            if not first_step:
                first_step.append(time.monotonic() - loaded)
            preview = previewer.maybe_preview(denoised[:1]) if previewer is not None else None
            ctx.step(step, total, preview)

        with self.attention.active(new_job=True):
            results = generate(
                model, request, cache=self.cache, on_step=on_step, is_cancelled=ctx.is_cancelled, refiner=refiner
            )
        finished = time.monotonic()
        timings = {
            "load": loaded - started,
            "first_step": first_step[0] if first_step else 0.0,
            "total": finished - started,
        }
        return [
            GeneratedImage(image=image, seed=seed, request=request, model_hash=model.model_hash, timings=timings,
                           family=model.family, extra=lora_extra)
            for image, seed in results
        ]

    def apply_loras(self, model: LoadedModel, request: GenerationRequest, ctx: RunContext | None = None) -> dict:
        """Merge the request's LoRAs in place of the previous job's (only what changed is re-merged); returns
        the infotext fields that record them (A1111's ``Lora hashes``)."""
        from core.lora.patch import activate

        refs = request.lora_refs()
        if refs != model.loras.requested and ctx is not None:
            ctx.set_activity(f"applying {len(refs)} LoRA{'s' if len(refs) != 1 else ''}" if refs else "removing LoRAs")
        activate(model.loras, refs, self.registry.find_lora, self.lora_files, model=model.name)
        if not model.loras.active:
            return {}
        hashes: dict[str, str] = {}
        for active in model.loras.active:
            hashes.setdefault(active.ref.label(), active.file.shorthash)
        return {"Lora hashes": ", ".join(f"{name}: {h}" for name, h in hashes.items())}
