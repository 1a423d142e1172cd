"""Inpainting and outpainting: masks, the "only masked" crop, the latent noise mask and the final composite.

What an A1111/Forge user expects, in A1111's order (``modules/processing.py``, read for the facts):

1. The mask image becomes a binary mask (white, or opaque in an alpha-only mask, = repaint; > 128 counts),
   scaled to the init image's size in the job; ``invert_mask`` flips it. Outpainting pads the image (edge
   pixels repeated) and masks the new area.
2. It is blurred by a Gaussian of sigma ``mask_blur`` (kernel ``2 int(2.5 sigma + 0.5) + 1``).
3. "Only masked": the blurred mask's bounding box plus ``only_masked_padding``, widened to the job's aspect
   ratio (inside the image), is cropped and scaled to the job's size: the region is worked on at full
   resolution. "Whole picture": the whole (padded) image is.
4. ``masked_content``: "fill" replaces the masked pixels by colours spread in from around them before
   encoding; "latent noise" / "latent nothing" replace the masked latents by seeded noise / zeros.
5. Sampling (normal checkpoints): the blurred mask at the latent size, rounded (A1111's default), is the latent
   noise mask: at every step the unmasked area of the input is the init latent noised to the current sigma, and
   of the output the init latent (ComfyUI's ``KSamplerX0Inpaint``; A1111 blends the output); the final latents
   are blended once more. Dedicated inpainting checkpoints (a 9-channel UNet)
   instead take ``[latents, mask, masked-image latents]`` as their input, as diffusers'
   ``StableDiffusionInpaintPipeline`` does, and sample freely.
6. The decoded image (scaled back into the crop for "only masked") is composited over the original through the
   blurred mask (``2 x`` the blurred mask, clipped, for the whole picture; the blurred mask for a crop).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from core.masks import binary, load_mask
from core.request import GenerationRequest
from core.tensor_bytes import tensor_bytes

log = logging.getLogger(__name__)

MASK_INPUT_CHANNELS = 9  # latent 4 + mask 1 + masked-image latent 4: SD1.5 / SDXL inpainting UNets


# ------------------------------------------------------------------------------------------ mask tensors


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An ``L`` or ``RGB`` image -> ``[1, C, H, W]`` float32 in [0, 1]."""
    channels = len(image.getbands())
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, channels).permute(2, 0, 1)[None].float() / 255.0


def to_image(values: torch.Tensor) -> Image.Image:
    """``[1, C, H, W]`` in [0, 1] -> an ``L`` (one channel) or ``RGB`` image."""
    data = (values[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    mode = "L" if data.shape[-1] == 1 else "RGB"
    return Image.frombytes(mode, (data.shape[1], data.shape[0]), bytes(tensor_bytes(data)))


def gaussian_blur(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of ``values`` ``[1, C, H, W]`` with A1111's kernel size, mirrored at the edges."""
    if sigma <= 0:
        return values
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    channels = values.shape[1]
    out = values
    for dim in (3, 2):
        pad = size // 2
        mode = "reflect" if pad < out.shape[dim] else "replicate"
        padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
        shape = (1, 1, 1, size) if dim == 3 else (1, 1, size, 1)
        weight = kernel.view(shape).expand(channels, -1, -1, -1).to(out)
        out = F.conv2d(F.pad(out, padding, mode=mode), weight, groups=channels)
    return out


# ------------------------------------------------------------------------------------------ geometry


def outpaint_padding(request: GenerationRequest, multiple: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels added: the request's, with what rounds each side of the new size up to
    the family's pixel multiple added on a side that grows (right/bottom first)."""
    o = request.outpaint
    if o is None:
        return 0, 0, 0, 0
    left, top, right, bottom = o.left, o.top, o.right, o.bottom
    extra_w = -(request.width + left + right) % multiple
    extra_h = -(request.height + top + bottom) % multiple
    if right or not left:
        right += extra_w
    else:
        left += extra_w
    if bottom or not top:
        bottom += extra_h
    else:
        top += extra_h
    return left, top, right, bottom


def pad_edges(image: Image.Image, padding: tuple[int, int, int, int]) -> Image.Image:
    """``image`` grown by (left, top, right, bottom), the new pixels repeating the nearest edge pixel."""
    if not any(padding):
        return image
    left, top, right, bottom = padding
    values = to_tensor(image.convert("RGB"))
    return to_image(F.pad(values, (left, right, top, bottom), mode="replicate"))


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2), exclusive, of the nonzero pixels of ``mask`` ``[1, 1, H, W]``; None when it is empty."""
    nonzero = mask[0, 0] > 0
    if not bool(nonzero.any()):
        return None
    rows = torch.nonzero(nonzero.any(dim=1)).flatten()
    cols = torch.nonzero(nonzero.any(dim=0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_region(
    bbox: tuple[int, int, int, int], padding: int, work: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The "only masked" crop: ``bbox`` grown by ``padding`` (inside the image of ``size``), then widened or
    heightened about its centre to the work size's aspect ratio, shifted back inside the image where it
    overflows (A1111's ``get_crop_region_v2`` and ``expand_crop_region``, in words)."""
    width, height = size
    x1, y1 = max(bbox[0] - padding, 0), max(bbox[1] - padding, 0)
    x2, y2 = min(bbox[2] + padding, width), min(bbox[3] + padding, height)
    aspect = work[0] / work[1]

    def grow(a: int, b: int, want: float, limit: int) -> tuple[int, int]:
        diff = int(want - (b - a))
        a -= diff // 2
        b += diff - diff // 2
        if b > limit:  # past the far edge: shift back
            a -= b - limit
            b = limit
        if a < 0:  # past the near edge: shift forward
            b -= a
            a = 0
        return a, min(b, limit)

    if (x2 - x1) / (y2 - y1) > aspect:
        y1, y2 = grow(y1, y2, (x2 - x1) / aspect, height)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * aspect, width)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: torch.Tensor) -> Image.Image:
    """A1111's "fill": the masked pixels take the colours around them, spread in by ever smaller blurs of the
    unmasked pixels (a normalised convolution per scale; the coarse scales reach the middle of a large mask)."""
    pixels = to_tensor(image.convert("RGB"))
    known = (mask < 0.5).float()
    if not bool(known.any()):
        return image
    mean = (pixels * known).sum(dim=(2, 3), keepdim=True) / known.sum()
    filled = pixels * known + mean * (1 - known)
    for sigma in (64.0, 16.0, 4.0, 1.0):
        scale = max(1, int(sigma // 4))  # the wide blurs run on a smaller copy: same result, far cheaper
        small_size = (max(1, pixels.shape[2] // scale), max(1, pixels.shape[3] // scale))
        num = F.interpolate(pixels * known, size=small_size, mode="area")
        den = F.interpolate(known, size=small_size, mode="area")
        num, den = gaussian_blur(num, sigma / scale), gaussian_blur(den, sigma / scale)
        num = F.interpolate(num, size=pixels.shape[2:], mode="bilinear", align_corners=False)
        den = F.interpolate(den, size=pixels.shape[2:], mode="bilinear", align_corners=False)
        estimate = num / den.clamp_min(1e-6)
        reached = (den > 1e-3).float()
        filled = filled * (1 - reached) + estimate * reached
    return to_image(pixels * known + filled * (1 - known))


# ------------------------------------------------------------------------------------------ the job


@dataclass
class InpaintJob:
    """One inpainting/outpainting job's images: what is sampled (``work_image`` with its blurred ``work_mask``,
    ``width`` x ``height``) and how the result goes back into ``canvas`` (the init image, padded when
    outpainting): pasted into ``crop`` (only masked) and composited through ``overlay``."""

    canvas: Image.Image
    overlay: Image.Image  # L, canvas size: 255 = the generated pixels, 0 = the original
    crop: tuple[int, int, int, int] | None
    work_image: Image.Image
    work_mask: torch.Tensor  # [1, 1, H, W] float32 in [0, 1], blurred
    width: int
    height: int
    warnings: tuple[str, ...] = ()

    def latent_mask(self, height: int, width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
        """The latent noise mask ``[1, 1, h, w]``: the blurred mask scaled to the latent size (area average), then
        rounded as A1111 does by default ("mask_round"); the blur's soft edge is the pixel composite's."""
        small = F.interpolate(self.work_mask, size=(height, width), mode="area").round()
        return small.to(device=device, dtype=dtype)

    def work_request(self, request: GenerationRequest) -> GenerationRequest:
        """The request the passes run: at the work size. The padding is in that size now, so the outpaint table
        goes (validated again, it would count twice)."""
        return dataclasses.replace(request, width=self.width, height=self.height, outpaint=None)

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The generated work images put back into the canvas (A1111's overlay)."""
        out = []
        for image in images:
            if self.crop is not None:
                x1, y1, x2, y2 = self.crop
                pasted = self.canvas.copy()
                pasted.paste(image.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
                image = pasted
            out.append(Image.composite(image.convert("RGB"), self.canvas, self.overlay))
        return out


def prepare(request: GenerationRequest, init: Image.Image, init_size: tuple[int, int] | None,
            multiple: int, mask_image: Image.Image | None = None) -> InpaintJob | None:
    """The job's images for ``request`` (``init``: its init image, at the request's size from a file;
    ``init_size``: the file's own size, which the mask should have; ``mask_image``: the mask itself instead of
    the request's file, the detail pass's). "Only masked" works at the request's size (the detail pass's
    image may be larger). None for "only masked" with an empty mask: then A1111 does plain img2img, and so
    does this (with a warning)."""
    width, height = request.width, request.height
    warnings: list[str] = []
    if mask_image is None and request.mask is not None:
        mask_image, warnings = load_mask(request.mask, init_size)
    if mask_image is not None:
        if mask_image.size != init.size:
            mask_image = binary(mask_image.resize(init.size, Image.Resampling.LANCZOS))
        mask = to_tensor(binary(mask_image))
    else:
        mask = torch.zeros((1, 1, init.height, init.width))
    if request.invert_mask:
        mask = 1 - mask
    padding = outpaint_padding(request, multiple)
    canvas = init.convert("RGB")
    if any(padding):
        left, top, right, bottom = padding
        canvas = pad_edges(canvas, padding)
        mask = F.pad(mask, (left, right, top, bottom), value=1.0)
    mask = gaussian_blur(mask, float(request.mask_blur)).clamp(0, 1)
    full = (canvas.width, canvas.height)
    crop = None
    if request.inpaint_area == "only_masked":
        bbox = mask_bbox(mask)
        if bbox is None:
            log.warning("only_masked with an empty mask: plain img2img of the whole image, as A1111 does")
            return None
        crop = crop_region(bbox, request.only_masked_padding, (width, height), full)
        x1, y1, x2, y2 = crop
        overlay = to_image(mask)
        work_image = canvas.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
        work_mask = F.interpolate(mask[:, :, y1:y2, x1:x2], size=(height, width), mode="bilinear",
                                  align_corners=False, antialias=True).clamp(0, 1)
    else:
        if mask_bbox(mask) is None:  # a whole-picture job that changes nothing: the sampling is wasted
            warnings.append("the mask is empty (no white pixel, or all white with invert_mask): nothing is "
                            "repainted, the image comes back as it was")
        overlay = to_image((mask * 2).clamp(0, 1))
        work_image, work_mask = canvas, mask
        width, height = full
    if request.masked_content == "fill":
        work_image = fill_masked(work_image, work_mask)
    return InpaintJob(canvas=canvas, overlay=overlay, crop=crop, work_image=work_image, work_mask=work_mask,
                      width=width, height=height, warnings=tuple(warnings))


def takes_mask_input(unet: Any) -> bool:
    """A dedicated inpainting UNet (9 input channels: latent, mask, masked-image latent)."""
    return getattr(getattr(unet, "config", None), "in_channels", 4) == MASK_INPUT_CHANNELS


def masked_content(start: torch.Tensor, mask: torch.Tensor, how: str, seeds: list[int]) -> torch.Tensor:
    """The init latents with the masked area as ``how`` says: "latent_noise" is each image's own seeded unit
    noise (a fresh draw from its seed, as A1111's), "latent_nothing" zeros; else unchanged."""
    if how == "latent_noise":
        from core.sampling.noise import initial_noise

        noise = initial_noise(seeds, start.shape[1:], start.device, start.dtype)
        return start * (1 - mask) + noise * mask
    if how == "latent_nothing":
        return start * (1 - mask)
    return start


def conditioning_mask(work_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inpainting UNet's mask channel: the mask rounded (>= 0.5), nearest-scaled to the latent size (as
    diffusers and A1111 feed it)."""
    return F.interpolate((work_mask >= 0.5).float(), size=(height, width))


def masked_pixels(pixels: torch.Tensor, work_mask: torch.Tensor) -> torch.Tensor:
    """The image in [-1, 1] with the masked area 0 (grey): what the inpainting UNet sees of the original."""
    keep = (work_mask < 0.5).to(device=pixels.device, dtype=pixels.dtype)
    return pixels * keep


class MaskedImageInput:
    """An inpainting UNet called as a normal one: the mask and masked-image latents ``extra`` ``[B, 5, h, w]``
    are concatenated after the (already scaled) latents, repeated over a CFG batch of ``k B``."""

    def __init__(self, network: Callable[..., torch.Tensor], extra: torch.Tensor) -> None:
        self.network = network
        self.extra = extra
        self.config = getattr(network, "config", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        extra = self.extra.to(device=x.device, dtype=x.dtype)
        extra = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
        return self.network(torch.cat([x, extra], dim=1), t, **cond)


class FirstDraw:
    """A noise sampler whose starting draw is taken now, so the job can use it (the latent noise mask noises
    the init latents with it) and draw from the same per-image streams after it (the masked-image posterior,
    in diffusers' order), while the sampler still gets it as its ``initial()``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first = inner.initial()
        self.generators = inner.generators
        self.shape = inner.shape

    def initial(self) -> torch.Tensor:
        return self.first

    def __call__(self, sigma: Any = None, sigma_next: Any = None) -> torch.Tensor:
        return self.inner(sigma, sigma_next)


class LatentMaskDenoiser:
    """The latent noise mask around a (guided) denoiser: the unmasked area of each call's input is the init
    latent noised to that sigma (with the job's starting noise), and of its x0 the init latent, so only the
    masked area is generated and it is generated in context. ``noise(x0, noise, sigma)``: the family's."""

    def __init__(self, inner: Any, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                 add_noise: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> None:
        self.inner, self.init, self.noise, self.mask = inner, init, noise, mask
        self.add_noise = add_noise

    def __getattr__(self, name: str) -> Any:  # refined, refiner_model, step, calls: the inner denoiser's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        s = s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s
        keep = 1 - self.mask
        x = x * self.mask + self.add_noise(self.init, self.noise, s) * keep
        return self.inner(x, sigma) * self.mask + self.init * keep


def blend(latents: torch.Tensor, init: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The final latent blend: generated where masked, the init latents elsewhere."""
    return latents * mask + init * (1 - mask)


def padded_size(request: GenerationRequest, multiple: int) -> tuple[int, int]:
    """The outpainted image's size."""
    left, top, right, bottom = outpaint_padding(request, multiple)
    return request.width + left + right, request.height + top + bottom
