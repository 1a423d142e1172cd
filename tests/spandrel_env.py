"""Make ``import spandrel`` work in the tests on a machine without a usable torchvision.

spandrel (the optional ``upscale`` extra) imports all of its architectures at import time, and two of them
(LaMa, RestoreFormer) import torchvision at module level. A user's GPU install gets a torchvision that matches its
CUDA torch; this machine's CPU torch has none that imports (PyPI's fails with "operator torchvision::nms does not
exist"), so ``use_spandrel()`` puts the stand-in package ``tests/stubs/torchvision`` on ``sys.path`` ONLY when a real
torchvision cannot be imported. The stand-in holds just the two names those architectures import; the
ESRGAN-family code the tests run never calls them. ``STUBS`` is also what a test puts on ``PYTHONPATH`` for a
subprocess.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

STUBS = Path(__file__).parent / "stubs"


def torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - missing, or a build that does not match torch (RuntimeError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported real one must not shadow the stand-in
        return False
    return True


def use_spandrel():
    """spandrel, importable (with the stand-in torchvision when there is no real one); skips when spandrel is not
    installed (``scripts/bootstrap.sh test`` installs it)."""
    pytest.importorskip("einops")
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (scripts/bootstrap.sh test installs it)")
    if not torchvision_importable() and str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    return importlib.import_module("spandrel")
