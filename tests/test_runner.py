"""The runner contract lives in core/runner.py: worker and pipeline meet there, and one factory builds the
real runner for the worker's default, the TUI and --batch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cli.batch
import core.runner
import core.worker
import tui.app
from core.runner import GeneratedImage, RunnerUnavailableError

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at any level (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_worker_and_pipeline_do_not_import_each_other():
    assert "core.pipeline" not in _imports(REPO / "core" / "worker.py")
    assert "core.worker" not in _imports(REPO / "core" / "pipeline.py")
    assert "core.runner" in _imports(REPO / "core" / "worker.py") & _imports(REPO / "core" / "pipeline.py")


def test_worker_reexports_the_contract_types():
    assert core.worker.GeneratedImage is GeneratedImage
    assert core.worker.RunnerUnavailableError is RunnerUnavailableError


def test_only_core_runner_builds_the_pipeline_runner():
    """No other module names PipelineRunner: the TUI, --batch and the worker all go through runner_factory."""
    users = [
        p.relative_to(REPO).as_posix()
        for folder in ("core", "cli", "tui")
        for p in (REPO / folder).rglob("*.py")
        if "PipelineRunner" in p.read_text(encoding="utf-8")
    ]
    assert sorted(users) == ["core/pipeline.py", "core/runner.py"]


def test_every_front_end_factory_delegates_to_make_runner(monkeypatch):
    made = []
    monkeypatch.setattr(core.runner, "make_runner", lambda dirs=None, **kw: made.append((dirs, kw)) or "runner")
    registry = object()
    assert cli.batch.pipeline_runner_factory(registry, [Path("m")])() == "runner"
    monkeypatch.delenv(tui.app.FAKE_RUNNER_ENV, raising=False)
    monkeypatch.delenv("DARKROOM_PRECISION")  # tests/conftest.py's fp32 pin: the TUI resolves auto
    assert tui.app._runner_factory(SimpleNamespace(models_dir=["tui-models"]))() == "runner"
    assert core.worker._default_runner_factory() == "runner"
    assert made == [
        ([Path("m")], {"registry": registry, "previews": False, "attention": "auto", "memory": "auto",
          "compile": "off", "precision": "auto"}),  # batch: nobody sees previews
        ([Path("tui-models")], {"registry": None, "previews": True, "attention": "auto", "memory": "auto",
          "compile": "off", "precision": "auto"}),
        (None, {"registry": None, "previews": True, "attention": "auto", "memory": "auto",
          "compile": "off", "precision": "auto"}),
    ]


def test_runner_module_imports_neither_torch_nor_the_pipeline():
    code = (
        "import json, sys, core.runner, core.worker; "
        "print(json.dumps(sorted(m for m in ('torch', 'PIL', 'core.pipeline') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
