"""Session-wide test settings.

The tests compare our networks with fp32 references (diffusers, transformers) to tight tolerances, so they run
as on a CPU without AMX, where ``--precision auto`` means fp32: in this process (``cpu_native_bf16``) and in the
processes tests start (``$DARKROOM_PRECISION``). Session-scoped, so module-scoped model fixtures see it too.
``tests/test_precision.py`` undoes it where it tests the bf16 path (the real probe is the stand-in's ``real``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _reference_precision() -> Iterator[None]:
    import core.accel.device

    def without_amx() -> bool:
        return False

    without_amx.real = core.accel.device.cpu_native_bf16
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DARKROOM_PRECISION", "fp32")
        patch.setattr(core.accel.device, "cpu_native_bf16", without_amx)
        yield
