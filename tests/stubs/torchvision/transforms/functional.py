"""The two names spandrel's LaMa and RestoreFormer import; never called by the tests (they fail if they are)."""

from enum import Enum


class InterpolationMode(Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _not_available(*args, **kwargs):
    raise RuntimeError("the test stand-in for torchvision has no image transforms (tests/stubs/torchvision)")


rotate = _not_available
normalize = _not_available
