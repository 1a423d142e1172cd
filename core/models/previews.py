"""Per-step previews: TAESD when its decoder file is there, the latent -> RGB projection otherwise, throttled.

Decoder files live where ComfyUI keeps them, ``models/vae_approx/`` (also A1111/Forge's ``models/VAE-taesd/``),
named ``taesd_decoder.*`` (SD1.x/2.x), ``taesdxl_decoder.*`` (SDXL), ``taef1_decoder.*`` (Flux.1) and
``taef2_decoder.*`` (FLUX.2), as ``.safetensors`` or ``.pth``. They are read through the checkpoint loader
(``core.models.checkpoint.open_source``): safetensors as data, pickles only through torch's weights-only
unpickler, so a ``.pth`` that needs Python globals is refused and nothing in it runs.

A TAESD preview costs a few percent of an SD1.5 step on a CPU (full resolution, 8x the latent), so the
``Previewer`` measures what its previews cost against the job's wall time and skips previews to keep the
total under ``budget`` (2 %), and never makes more than one per ``min_interval`` (0.25 s: the TUI shows at most
about 4 a second and would drop the rest after they were paid for).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from core.errors import CheckpointError
from core.models.latent_formats import FORMATS, preview_image
from core.models.taesd import LATENT_CHANNELS, TAESD_NAMES, TAESDDecoder, build_decoder, decode_images

PREVIEW_FOLDERS = ("vae_approx", "VAE-taesd")  # ComfyUI, A1111/Forge
DECODER_EXTENSIONS = (".safetensors", ".pth", ".pt")  # in order of preference
PREVIEW_BUDGET = 0.02  # share of the job's time previews may take
PREVIEW_INTERVAL = 0.25  # seconds between previews at most (~4/s)


def preview_dirs(models_dirs: Sequence[Path | str]) -> list[Path]:
    """The preview-decoder folders under each models root (``root/models/vae_approx`` or ``root/vae_approx``),
    in root order, the way the model registry reads its roots."""
    out: list[Path] = []
    for root in models_dirs:
        root = Path(root).expanduser()
        for base in (root / "models", root):
            for name in PREVIEW_FOLDERS:
                folder = base / name
                if folder.is_dir() and folder not in out:
                    out.append(folder)
    return out


def find_preview_decoder(models_dirs: Sequence[Path | str], family: str) -> Path | None:
    """The TAESD decoder file for ``family`` (``sd15``, ``sd2``, ``sdxl``, ``flux``, ``flux2``), or None.

    ``taesd_decoder.safetensors`` beats ``taesd_decoder.pth`` in one folder, earlier folders beat later ones;
    a name that only starts with ``taesd_decoder`` (``taesd_decoder_v2.pth``) counts when no exact one is
    there, as in ComfyUI. Hidden files and anything that is not a regular file are ignored.
    """
    name = TAESD_NAMES.get(family)
    if name is None:
        return None
    stem = f"{name}_decoder"
    for folder in preview_dirs(models_dirs):
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError:
            continue
        files = [p for p in entries if p.suffix.lower() in DECODER_EXTENSIONS and _is_file(p)]
        exact = [p for p in files if p.stem == stem]
        loose = [p for p in files if p.stem.startswith(stem)]
        for group in (exact, loose):
            if group:
                return min(group, key=lambda p: (DECODER_EXTENSIONS.index(p.suffix.lower()), p.name))
    return None


def _is_file(path: Path) -> bool:
    from core.models.registry import not_a_regular_file

    return not_a_regular_file(path) is None


def load_preview_decoder(
    path: str | Path,
    family: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TAESDDecoder:
    """Read a TAESD decoder file (never running code from it); ``CheckpointError`` naming the file when it is
    no TAESD decoder or, given ``family``, reads another latent space than the family's."""
    from core.models.checkpoint import open_source

    path = Path(path)
    source = open_source(path)
    try:
        tensors = {key: source.get(key) for key in source.shapes}
    finally:
        source.close()
    try:
        decoder = build_decoder(tensors, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(path, f"not a TAESD preview decoder: {e}") from None
    if family in TAESD_NAMES:
        want = LATENT_CHANNELS[TAESD_NAMES[family]]
        if decoder.config.latent_channels != want:
            raise CheckpointError(
                path,
                f"this decoder reads {decoder.config.latent_channels}-channel latents, but {family} needs "
                f"{want} ({TAESD_NAMES[family]}_decoder)",
            )
    return decoder.to(device=device, memory_format=torch.channels_last)


class Previewer:
    """Turns the sampler's x0 into preview images for one job, within a time budget.

    ``preview(x0)`` always makes one (TAESD with a decoder, else the projection); ``maybe_preview(x0)`` makes
    one only when the previews so far plus this one stay within ``budget`` of the time since ``start()``
    and ``min_interval`` has passed since the last, else returns None. The cost of the next TAESD preview is
    taken as the last one's, scaled by latent area; before the first it is measured once on a latent of a
    quarter the area (cost grows linearly with area). The first preview of a job is the cheap projection, and
    it stands in until a TAESD preview fits the budget. ``clock`` is injectable so the accounting can be tested without timing.
    """

    def __init__(
        self,
        family: str,
        decoder: TAESDDecoder | None = None,
        *,
        budget: float = PREVIEW_BUDGET,
        min_interval: float = PREVIEW_INTERVAL,
        max_size: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.family = family
        self.decoder = decoder
        self.budget = budget
        self.min_interval = min_interval
        self.max_size = max_size
        self.clock = clock
        self.spent = 0.0  # seconds spent on previews (and the one calibration) since start()
        self.made = 0
        self.skipped = 0
        self.problem: str | None = None  # why TAESD was given up on in this job, if it was
        self._cost_per_area: float | None = None  # seconds per latent pixel of a TAESD preview
        self._shown_taesd = False
        self._projection_cost = 0.0
        self.start()

    @property
    def kind(self) -> str:
        """``taesd`` (or ``taesdxl``, ``taef1``, ``taef2``) when a decoder is used, else ``projection``."""
        if self.decoder is None:
            return "projection"
        return TAESD_NAMES.get(self.family, self.decoder.config.name)

    def start(self) -> None:
        """A new job starts now: the budget counts from here."""
        self._started = self.clock()
        self._last: float | None = None
        self.spent = 0.0
        self.made = self.skipped = 0
        self._shown_taesd = False

    @property
    def elapsed(self) -> float:
        return self.clock() - self._started

    # ---- making images ------------------------------------------------------------------------------------

    def preview(self, x0: torch.Tensor):
        """A PIL image of the first latent of ``x0`` (model space), unthrottled; None if the family has
        neither a decoder nor a projection table."""
        if self.decoder is not None:
            return self._taesd(x0)
        return self._projection(x0)

    def _projection(self, x0: torch.Tensor):
        if self.family not in FORMATS:
            return None
        return preview_image(x0[0] if x0.dim() == 4 else x0, self.family, self.max_size)

    def _taesd(self, x0: torch.Tensor):
        from core.tensor_bytes import rgb_image

        assert self.decoder is not None
        first = x0[:1] if x0.dim() == 4 else x0.unsqueeze(0)
        image = rgb_image(decode_images(self.decoder, first, self.family)[0])
        if self.max_size is not None and max(image.size) > self.max_size:
            from PIL import Image

            w, h = image.size
            ratio = self.max_size / max(w, h)
            image = image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), Image.Resampling.BILINEAR)
        return image

    # ---- the throttle -----------------------------------------------------------------------------------------

    def _affordable(self, cost: float, now: float) -> bool:
        # the preview itself lengthens the job, so it counts on both sides
        return self.spent + cost <= self.budget * (now - self._started + cost)

    def _timed(self, make: Callable[[], object]) -> tuple[object, float]:
        began = self.clock()
        try:
            result = make()
        finally:
            cost = self.clock() - began
            self.spent += cost  # a failed attempt cost time too
        return result, cost

    def maybe_preview(self, x0: torch.Tensor):
        """A preview image when the budget and the rate allow one, else None."""
        now = self.clock()
        if self._last is not None and now - self._last < self.min_interval:
            self.skipped += 1
            return None
        if self.decoder is not None:
            try:
                image = self._maybe_taesd(x0, now)
            except Exception as e:  # out of memory, a latent the decoder does not fit: a preview never fails a job
                self.problem = f"the {self.kind} preview failed ({type(e).__name__}: {e}); using the projection"
                self.decoder = None
                self._shown_taesd = False
            else:
                if image is not None:
                    return self._made(image)
                if self._shown_taesd:  # a blurry projection between sharp previews would only flicker
                    self.skipped += 1
                    return None
            now = self.clock()
        if self.family not in FORMATS:
            self.skipped += 1
            return None
        # the projection is one small matmul, but it obeys the same budget
        if not self._affordable(self._projection_cost, now):
            self.skipped += 1
            return None
        image, cost = self._timed(lambda: self._projection(x0))
        self._projection_cost = cost
        return self._made(image)

    def _maybe_taesd(self, x0: torch.Tensor, now: float):
        area = int(x0.shape[-1]) * int(x0.shape[-2])
        # the first preview is the projection (instant feedback); the calibration waits for the next one
        if self._cost_per_area is None and (self.made > 0 or self.family not in FORMATS):
            self._calibrate(x0)
            now = self.clock()
        if self._cost_per_area is None or not self._affordable(self._cost_per_area * area, now):
            return None
        image, cost = self._timed(lambda: self._taesd(x0))
        self._cost_per_area = cost / area
        self._shown_taesd = True
        return image

    def _made(self, image):
        self.made += 1
        self._last = self.clock()
        return image

    def _calibrate(self, x0: torch.Tensor) -> None:
        """Measure a TAESD decode on half the width and height of this latent (the cost grows with area)."""
        first = x0[:1] if x0.dim() == 4 else x0.unsqueeze(0)
        h, w = first.shape[-2:]
        small = first[..., : max(1, h // 2), : max(1, w // 2)]
        _, cost = self._timed(lambda: decode_images(self.decoder, small, self.family))
        self._cost_per_area = cost / (small.shape[-1] * small.shape[-2])


class PreviewDecoders:
    """The TAESD decoder of each family, found in the models roots and loaded once; None where there is no
    usable file. A file that cannot be used is remembered in ``problems`` (one message naming it) and the
    projection is used instead: a broken preview decoder never fails a job."""

    def __init__(self, models_dirs: Callable[[], Sequence[Path | str]] | Sequence[Path | str]) -> None:
        self._models_dirs = models_dirs
        self._loaded: dict[tuple[str, str, str], TAESDDecoder | None] = {}
        self.problems: dict[str, str] = {}

    def get(self, family: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        roots = self._models_dirs() if callable(self._models_dirs) else self._models_dirs
        path = find_preview_decoder(roots, family)
        if path is None:
            return None
        if torch.device(device).type == "cpu":
            dtype = torch.float32  # half-precision convolutions are slow or missing on CPUs
        key = (str(path), str(device), str(dtype))
        if key not in self._loaded:
            try:
                self._loaded[key] = load_preview_decoder(path, family, device=device, dtype=dtype)
            except CheckpointError as e:
                self.problems[str(path)] = str(e)
                self._loaded[key] = None
        return self._loaded[key]

    def previewer(self, family: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  **kwargs) -> Previewer:
        """A ``Previewer`` for one job of ``family``, with its decoder when there is one."""
        return Previewer(family, self.get(family, device, dtype), **kwargs)
