"""core.accel.torch_import: torch's libraries preloaded outside the GIL, collection paused for the import.

Each check runs in a fresh interpreter: this test process has imported torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the preload uses dlopen (POSIX only)")


def run_python(script: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_preload_maps_torch_libraries_without_importing_torch() -> None:
    report = run_python(
        "import json, sys\n"
        "from core.accel.torch_import import preload_torch_libraries, torch_library_paths\n"
        "names = [p.name for p in torch_library_paths()]\n"
        "loaded = preload_torch_libraries()\n"
        "maps = open('/proc/self/maps').read() if sys.platform.startswith('linux') else ''\n"
        "print(json.dumps({'names': names, 'loaded': loaded, 'torch_imported': 'torch' in sys.modules,\n"
        "                  'cpu_mapped': 'libtorch_cpu' in maps}))\n"
    )
    assert any(name.startswith("libtorch_cpu") for name in report["names"])
    assert report["loaded"] == len(report["names"])
    assert report["torch_imported"] is False  # only the shared libraries, no Python module yet
    if sys.platform.startswith("linux"):
        assert report["cpu_mapped"] is True


def test_import_torch_restores_collection_and_freezes_torch() -> None:
    report = run_python(
        "import gc, json, sys\n"
        "from core.accel.torch_import import import_torch\n"
        "seen = []\n"
        "gc.callbacks.append(lambda phase, info: seen.append(info['generation']) if phase == 'start' else None)\n"
        "torch = import_torch()\n"
        "gc.callbacks.clear()\n"
        "print(json.dumps({'same': torch is sys.modules['torch'], 'enabled': gc.isenabled(),\n"
        "                  'frozen': gc.get_freeze_count(), 'collections_during_import': len(seen),\n"
        "                  'tensor': torch.ones(2).sum().item(), 'again': import_torch() is torch}))\n"
    )
    assert report["same"] and report["again"]
    assert report["enabled"] is True
    assert report["collections_during_import"] == 0
    assert report["frozen"] > 100_000  # torch's objects moved out of the collector's reach
    assert report["tensor"] == 2.0


def test_import_torch_leaves_a_disabled_collector_disabled() -> None:
    report = run_python(
        "import gc, json\n"
        "gc.disable()\n"
        "from core.accel.torch_import import import_torch\n"
        "import_torch()\n"
        "print(json.dumps({'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count()}))\n"
    )
    assert report == {"enabled": False, "frozen": 0}  # the caller's own gc policy is not touched


def test_import_torch_from_two_threads_imports_once() -> None:
    report = run_python(
        "import json, threading\n"
        "from core.accel.torch_import import import_torch\n"
        "results = []\n"
        "threads = [threading.Thread(target=lambda: results.append(import_torch())) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(json.dumps({'count': len(results), 'same': results[0] is results[1]}))\n"
    )
    assert report == {"count": 2, "same": True}


def test_missing_torch_library_directory_means_no_preload(tmp_path: Path, monkeypatch) -> None:
    from core.accel import torch_import

    fake_torch = tmp_path / "torch"
    fake_torch.mkdir()
    (fake_torch / "__init__.py").write_text("")
    monkeypatch.setattr(torch_import.importlib.util, "find_spec",
                        lambda name: type("Spec", (), {"origin": str(fake_torch / "__init__.py")})())
    assert torch_import.torch_library_paths() == []
    assert torch_import.preload_torch_libraries() == 0
