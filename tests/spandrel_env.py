"""Make ``import spandrel`` work in the tests on a machine without a usable torchvision.

spandrel (the optional ``upscale`` extra) imports all of its architectures at import time, and two of them
(LaMa, RestoreFormer) import torchvision at module level. A user's GPU install gets a torchvision that matches its
CUDA torch; this machine's CPU torch has none that imports (PyPI's fails with "operator torchvision::nms does not
exist"), so ``spandrel_imported()`` puts the stand-in package ``tests/stubs/torchvision`` on ``sys.path`` ONLY when a real
torchvision cannot be imported. The stand-in holds just the two names those architectures import; the
ESRGAN-family code the tests run never calls them. The stand-in is taken off again when the tests that need it
are done (``spandrel_imported``), so nothing else in the process takes it for a real torchvision. ``STUBS`` is also
what a subprocess (the benchmark) puts on its path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def spandrel_imported() -> Iterator[Any]:
    """spandrel, importable (with the stand-in torchvision when there is no real one) while the block runs; skips
    when spandrel is not installed (``scripts/bootstrap.sh test`` installs it). Afterwards the stand-in leaves
    ``sys.path`` and ``sys.modules`` again (spandrel stays imported), so later test files in the same process never
    take it for a real torchvision (transformers and diffusers look for one)."""
    pytest.importorskip("einops")
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (scripts/bootstrap.sh test installs it)")
    stubbed = not torchvision_importable() and str(STUBS) not in sys.path
    if stubbed:
        sys.path.insert(0, str(STUBS))
    try:
        yield importlib.import_module("spandrel")
    finally:
        if stubbed:
            sys.path.remove(str(STUBS))
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(STUBS)):
                    del sys.modules[name]
