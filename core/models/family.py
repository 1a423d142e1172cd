"""What a model family is: one frozen spec per family that owns everything Darkroom knows about it.

A family (SD1.x, SDXL, Flux.1, ...) is described by data, like BFL's ``configs`` table, not by branches
spread over the code: how to recognise its files (``detect``), the networks it is made of (``Component``:
role, checkpoint prefix, config and network classes, their real and tiny configurations, the model folders a
standalone file of it lives in), its latent space (``LatentFormat``), how it was trained to denoise
(``DiscreteSampling`` or ``FlowSampling``), the class that turns prompts into its conditioning, its pixel
multiple and default size, its Align Your Steps levels and its built-in presets. Each family is one module in
``core/models/families/``; the package's ``__init__`` finds them, so adding a family touches nothing else.

This module and the family modules import no torch: detection runs on the UI thread (``inspect_header``).
Classes that need torch are named as ``"module:attribute"`` strings and imported when a model loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Shapes = Mapping[str, tuple[int, ...]]
Reader = Callable[[str], Any] | None  # key -> tensor, for the few guesses that need tensor data

SIZES = ("tiny", "full")
ROLE_LABELS = {
    "unet": "UNet",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder",
    "text_encoder_3": "third text encoder",
    "vae": "VAE",
}


def resolve(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imports the module)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Component:
    """One network of a family as a single-file checkpoint stores it.

    ``config``/``network`` are ``"module:Class"`` references; empty means the family is recognised but this
    component cannot be loaded yet. ``presets`` maps a size (``"full"``: the real network, ``"tiny"``: the same
    structure at a few MB, for tests) to the config's keyword arguments.
    """

    role: str  # unet | text_encoder | text_encoder_2 | text_encoder_3 | vae
    prefix: str  # key prefix in a single-file checkpoint
    config: str = ""
    network: str = ""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    folders: tuple[str, ...] = ()  # model-registry kinds a standalone file of it is found in ("vae")
    # The kind of separate file it can come from (``core.models.parts.PARTS``: "t5xxl", "clip_l", "flux_vae");
    # a family whose denoiser ships alone (Flux, Z-Image) loads the other components from such files.
    part: str = ""
    # variant -> the part kind a model of that variant takes instead of ``part`` (FLUX.2 klein 9B reads
    # Qwen3-8B where the 4B reads Qwen3-4B: the transformer's text width is 3 x the encoder's)
    variant_parts: Mapping[str, str] = field(default_factory=dict)

    # What messages call it when the role's name would mislead (a Flux or Z-Image "unet" is a transformer)
    title: str = ""

    @property
    def label(self) -> str:
        return self.title or ROLE_LABELS.get(self.role, self.role)

    @property
    def loadable(self) -> bool:
        return bool(self.config and self.network)

    def part_for(self, variant: str | None) -> str:
        """The kind of part file a model of ``variant`` takes for this component."""
        return self.variant_parts.get(variant or "", self.part)

    def config_class(self) -> Any:
        return resolve(self.config)

    def network_class(self) -> Any:
        return resolve(self.network)


@dataclass(frozen=True)
class LatentFormat:
    """How one family's latents look: channels, VAE scale/shift, pixels per latent pixel, RGB preview fit.

    A raw VAE latent ``z`` moves into the model space the denoiser works in by ``(z - shift) * scale``.
    """

    family: str
    channels: int
    scale: float
    shift: float
    rgb_factors: tuple[tuple[float, float, float], ...]  # [channels][R, G, B]
    rgb_bias: tuple[float, float, float]
    downscale: int = 8
    # channels of the VAE's own latent when the model space is a rearrangement of it (FLUX.2: 32 channels
    # patchified 2x2 into 128); 0: the same as ``channels``
    vae_channels: int = 0

    @property
    def raw_channels(self) -> int:
        """Latent channels the VAE's decoder takes (``decoder.conv_in``)."""
        return self.vae_channels or self.channels

    def same_space(self, other: LatentFormat) -> bool:
        """Whether a denoiser of ``other``'s family can continue these latents (a refiner, the base's)."""
        return (self.channels, self.scale, self.shift) == (other.channels, other.scale, other.shift)

    def to_model_space(self, z: Any) -> Any:
        """Raw VAE latent -> the space the denoiser (and the preview) works in."""
        return (z - self.shift) * self.scale

    def from_model_space(self, x: Any) -> Any:
        """Model-space latent -> raw VAE latent, ready for the decoder."""
        return x / self.scale + self.shift


@dataclass(frozen=True)
class DiscreteSampling:
    """A DDPM-trained model (SD1.x/2.x/XL): 1000 timesteps of betas, sampled in the variance-exploding form.

    ``x = x0 + sigma * noise`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the network sees timestep
    ``t(sigma)`` interpolated in log sigma (``core.sampling.denoisers.DiscreteSchedule``).
    """

    prediction: str = "eps"  # what files of the family predict when nothing in the file says otherwise
    predictions: tuple[str, ...] = ("eps", "v")  # what a request's ``prediction`` override may choose
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    timesteps: int = 1000

    def schedule(self) -> Any:
        from core.sampling.denoisers import DiscreteSchedule

        return DiscreteSchedule(self.beta_start, self.beta_end, self.timesteps, self.beta_schedule)

    def noise(self, x0: Any, noise: Any, sigma: Any) -> Any:
        """The sample at noise level ``sigma`` of clean latents ``x0`` (zeros for txt2img)."""
        return x0 + noise * sigma

    def timestep(self, schedule: Any, sigma: Any) -> Any:
        return schedule.sigma_to_t(sigma)

    samplers: tuple[str, ...] = ()  # the samplers this sampling takes; () = every one

    def denoiser(self, network: Any, schedule: Any, prediction: str, guidance: float | None = None) -> Any:
        """``network`` wrapped as ``denoise(x, sigma, **cond) -> x0`` for its prediction type (``guidance``:
        distilled guidance, which DDPM models do not take)."""
        from core.errors import RequestError
        from core.sampling.denoisers import EpsDenoiser, VDenoiser

        wrappers = {"eps": EpsDenoiser, "v": VDenoiser}
        if prediction not in wrappers:
            raise RequestError("model prediction type", prediction, "eps or v for this model family")
        return wrappers[prediction](network, schedule)


@dataclass(frozen=True)
class DynamicShift:
    """Resolution-dependent shift of a flow schedule (diffusers' ``use_dynamic_shifting``, BFL's
    ``get_schedule(shift=True)``): ``mu`` grows linearly with the image's token count from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (and beyond, extrapolated), and each time t
    becomes ``e^mu / (e^mu + 1/t - 1)``. FLUX.1-dev scheduler_config.json: 0.5, 1.15, 256, 4096."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def mu(self, image_tokens: int, steps: int | None = None) -> float:
        """diffusers' ``calculate_shift`` (same operations, same order, so the same float); ``steps`` unused."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        b = self.base_shift - m * self.base_seq_len
        return image_tokens * m + b


@dataclass(frozen=True)
class EmpiricalShift:
    """FLUX.2's time shift: ``mu`` fitted to the token count AND the step count (BFL's
    ``compute_empirical_mu``, which ``Flux2KleinPipeline`` passes to its scheduler), applied as
    ``e^mu / (e^mu + 1/t - 1)`` like ``DynamicShift``. See ``core.sampling.schedules.flux2_empirical_mu``."""

    default_steps: int = 50  # the pipeline's num_inference_steps, for a schedule asked for without steps

    def mu(self, image_tokens: int, steps: int | None = None) -> float:
        from core.sampling.schedules import flux2_empirical_mu

        return flux2_empirical_mu(image_tokens, steps or self.default_steps)


@dataclass(frozen=True)
class FlowSampling:
    """A rectified-flow model (Flux.1, SD3): ``x = (1 - sigma) x0 + sigma noise``, sigma in [0, 1].

    The sampler sees the flow time as sigma: the flow ODE ``dx/dt = v = (x - x0) / t`` has the same form as the
    variance-exploding one, so every deterministic sampler runs unchanged on flow sigmas (``samplers``); the
    ones that add noise assume ``x0 + sigma noise`` and are refused. ``adapter`` (``"module:Class"``) wraps the
    network into ``(latents, t, **cond) -> velocity`` (Flux: 2x2 patches and positions).
    """

    prediction: str = "flow"
    predictions: tuple[str, ...] = ()  # nothing to override: flow models are trained one way
    shift: float = 1.0  # static sigma shift s: t' = s t / (1 + (s - 1) t) (when no dynamic shift applies)
    multiplier: float = 1.0  # timestep the network takes per unit of sigma (Flux 1, SD3 1000)
    dynamic_shift: DynamicShift | EmpiricalShift | None = None  # resolution-dependent shift (Flux.1 dev, FLUX.2)
    patch: int = 2  # latent pixels per transformer token along each side (Flux.1 2x2; FLUX.2's latent is 1)
    static_variants: tuple[str, ...] = ()  # variants trained without the dynamic shift (Flux.1 schnell)
    adapter: str = ""  # "module:Class" wrapping the network for the denoiser; empty: the network itself
    guidance: float | None = None  # distilled guidance a model with a guidance embedding gets by default
    samplers: tuple[str, ...] = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc")

    def schedule(self) -> Any:
        return None  # depends on the image size: see ``flow_schedule``

    def flow_schedule(self, variant: str, image_tokens: int, steps: int | None = None) -> Any:
        """The sigma table (``core.sampling.schedules.FlowSchedule``) of a ``variant`` model for an image of
        ``image_tokens`` (packed) tokens sampled over a schedule of ``steps`` steps (FLUX.2's shift depends on
        it)."""
        from core.sampling.schedules import FlowSchedule

        if self.dynamic_shift is not None and variant not in self.static_variants:
            return FlowSchedule(mu=self.dynamic_shift.mu(image_tokens, steps))
        return FlowSchedule(shift=self.shift)

    def noise(self, x0: Any, noise: Any, sigma: Any) -> Any:
        return x0 * (1 - sigma) + noise * sigma

    def timestep(self, schedule: Any, sigma: Any) -> Any:
        return sigma * self.multiplier

    def denoiser(self, network: Any, schedule: Any, prediction: str, guidance: float | None = None) -> Any:
        from core.sampling.denoisers import FlowDenoiser

        model = resolve(self.adapter)(network) if self.adapter else network
        return FlowDenoiser(model, time_scale=self.multiplier, guidance=guidance)


Sampling = DiscreteSampling | FlowSampling


@dataclass(frozen=True)
class Match:
    """What a family's detector found in a file.

    ``prefixes`` None means the family's own component prefixes. ``prediction`` None lets the generic markers
    (``v_pred``, ``edm_*`` keys) and then the family's ``guess_prediction`` decide. ``sure`` False marks a
    guess from secondary evidence: any sure match of another family wins over it.
    """

    variant: str = "base"
    prediction: str | None = None
    prefixes: Mapping[str, str] | None = None
    notes: tuple[str, ...] = ()
    sure: bool = True


Detector = Callable[[Shapes], Match | None]


@dataclass(frozen=True)
class ModelFamily:
    """Everything one model family means. See the module docstring and docs/architecture.md."""

    name: str  # the id used in requests, presets, metadata ("sd15")
    label: str  # what users read ("SD1.x")
    order: int  # position in lists and messages
    components: tuple[Component, ...]
    detect: Detector  # a single-file checkpoint of this family (its keys under the component prefixes)
    detect_bare: Detector | None = None  # a denoiser released alone, without prefixes (BFL's flux1-dev)
    detect_priority: int = 0  # detectors run highest first: a family whose markers imply another's goes first
    guess_prediction: Callable[[Shapes, Reader], tuple[str, tuple[str, ...]]] | None = None
    latent: LatentFormat | None = None
    sampling: Sampling = field(default_factory=DiscreteSampling)
    conditioner: str = ""  # "module:Class" turning prompts into Conditioning; empty: not runnable yet
    pixel_multiple: int = 8
    default_size: tuple[int, int] = (512, 512)
    prediction_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # e.g. SD2.x eps: 512
    ays_levels: tuple[float, ...] | None = None  # Align Your Steps' 11 published sigmas, or None
    presets: tuple[str, ...] = ()  # built-in preset names (files ``presets/<name>.toml``) for this family
    takes_presets: bool = True  # whether a preset may declare ``family = <name>``
    # "module:function": (role -> our module names) -> {LoRA module name: core.lora.keymap.Target}; empty: this
    # family takes no LoRAs yet. See core/lora/keymap.py.
    lora_keys: str = ""
    # ``GenerationRequest`` fields that only some families take (SDXL's ``refiner``/``refiner_switch``, SD2's
    # ``prediction``, Flux's ``guidance``). A field named by any family is family-specific: a request for a
    # model of a family that does not name it must leave it at its default (``core.request.family_problems``).
    request_fields: tuple[str, ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()  # the usual (width, height) choices; () derives them (size_choices)
    # Request fields whose general default does not suit the family (Flux: ``cfg`` 1): a job or form that
    # leaves the field at the general default gets this value (``core.request.with_family_defaults``).
    request_defaults: Mapping[str, Any] = field(default_factory=dict)
    prompt_weights: bool = True  # whether the conditioner applies A1111 emphasis (Flux: read and ignored)
    ignored_fields: tuple[str, ...] = ()  # general request fields a model of this family does not use (UI hides them)

    def __post_init__(self) -> None:
        roles = [c.role for c in self.components]
        if len(set(roles)) != len(roles):
            raise ValueError(f"family {self.name}: a component role appears twice in {roles}")

    @property
    def prefixes(self) -> dict[str, str]:
        return {c.role: c.prefix for c in self.components}

    @property
    def denoiser(self) -> Component:
        """The first component is the denoiser (UNet or transformer)."""
        return self.components[0]

    def component(self, role: str) -> Component:
        for c in self.components:
            if c.role == role:
                return c
        raise KeyError(f"family {self.name} has no {role} component")

    def has(self, role: str) -> bool:
        return any(c.role == role for c in self.components)

    def default_size_for(self, prediction: str | None) -> tuple[int, int]:
        """The size a model of this family with this prediction type was trained at (SD2.x: 768-v, 512 eps)."""
        return self.prediction_sizes.get(prediction or "", self.default_size)

    @property
    def size_choices(self) -> tuple[tuple[int, int], ...]:
        """The sizes the UI offers: ``sizes``, or buckets of the ``default_size`` area at the aspect ratios
        SDXL was trained on (1:1, 9:7, 19:13, 7:4, 12:5 and their portraits), sides multiples of 64."""
        if self.sizes:
            return self.sizes
        width, height = self.default_size
        area = width * height
        out: list[tuple[int, int]] = [(width, height)]
        for w, h in ((9, 7), (19, 13), (7, 4), (12, 5)):
            short = max(64, round((area * h / w) ** 0.5 / 64) * 64)
            long = round(short * w / h / 64) * 64
            for size in ((long, short), (short, long)):
                if size not in out:
                    out.append(size)
        return tuple(out)

    @property
    def runnable(self) -> bool:
        """Whether Darkroom can generate with it: every network loadable, a latent format, a conditioner."""
        return bool(self.conditioner and self.latent and all(c.loadable for c in self.components))


def refiner_problem(base: ModelFamily, refiner: ModelFamily, name: str) -> str | None:
    """Why a model of family spec ``refiner`` cannot refine one of ``base`` (None when it can): a refiner
    continues the base's latents, so it must work in the same latent space. Torch-free (``--batch`` asks it
    of the files' headers before anything loads)."""
    if base.latent is None or refiner.latent is None or base.latent.same_space(refiner.latent):
        return None
    return (f"refiner {name!r} is {refiner.label}, whose latent space differs from {base.label}'s; choose an "
            "SDXL refiner for an SDXL model")
