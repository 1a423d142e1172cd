"""Session-wide test settings.

The tests compare our networks with fp32 references (diffusers, transformers) to tight tolerances, so they run
as on a CPU without AMX, where ``--precision auto`` means fp32: in this process (``cpu_native_bf16``) and in the
processes tests start (``$DARKROOM_PRECISION``). ``tests/test_precision.py`` undoes both to test the bf16 path.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _reference_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_PRECISION", "fp32")
    import core.accel.device

    monkeypatch.setattr(core.accel.device, "cpu_native_bf16", lambda: False)
