"""Images a job reads (init image, mask, upscale source) as people's files are: the way up a camera's EXIF
orientation says, and 16-bit greyscale scaled to 8 bits.

Pillow leaves both to the caller: ``convert("RGB")`` keeps a phone photo's sensor orientation (A1111, ComfyUI
and every viewer turn it upright) and clips a 16-bit grey PNG (``I;16``, 0..65535) at 255, so any value above
1/256 of full scale became white.

An image with transparency is used as it shows on white (A1111 flattens img2img images onto its
``img2img_background_color``, white by default): ``convert("RGB")`` would drop the alpha and keep whatever colour an
editor left under the transparent pixels (often black, or the erased content).
"""

from __future__ import annotations

from PIL import Image, ImageChops, ImageOps

EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size an opened image has once turned upright, read from its header (nothing decoded)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the image as stored
        orientation = None
    width, height = image.size
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (decodes it), 16-bit greyscale scaled to 8-bit range."""
    return _eight_bit(_turned(image))


def _turned(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the image as stored
        image.load()
        return image


def _is_wide_grey(image: Image.Image) -> bool:
    return image.mode == "I" or image.mode.startswith("I;16")


def _eight_bit(image: Image.Image) -> Image.Image:
    if _is_wide_grey(image):
        image = image.point(lambda v: v / 257)  # 65535 -> 255; convert() would clip instead
    return image


BACKGROUND = (255, 255, 255)  # what transparent pixels become (A1111's default img2img background)


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel (RGBA, LA, PA) or a transparent palette entry or colour (a PNG ``tRNS`` chunk)."""
    return "A" in image.getbands() or "transparency" in image.info


def flattened_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, transparent pixels composited onto white (what it shows on a white page)."""
    if not has_transparency(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """An opened image file as the 8-bit RGB image it shows: upright, transparency flattened onto white."""
    turned = _turned(image)
    shown = _eight_bit(turned)
    level = turned.info.get("transparency")
    if _is_wide_grey(turned) and isinstance(level, int):
        # a 16-bit grey PNG's transparent level (tRNS) is a 16-bit value: the pixels it marks are found before
        # the scaling to 8 bits, after which it would match none (or the wrong ones)
        shown = shown.convert("L")
        shown.putalpha(_not_level(turned.convert("I"), level))
        shown.info.pop("transparency", None)
    return flattened_rgb(shown)


def _not_level(image: Image.Image, level: int) -> Image.Image:
    """An "L" mask of a 32-bit grey image: 0 where a pixel is ``level``, 255 elsewhere (``point`` takes only
    linear maps on 32-bit images; converting to "L" clips each side's difference to 0..255)."""
    above = image.point(lambda v: v * 255 - level * 255).convert("L")
    below = image.point(lambda v: v * -255 + level * 255).convert("L")
    return ImageChops.lighter(above, below)
