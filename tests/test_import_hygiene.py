"""What each entry point imports, checked in fresh interpreters.

- ``darkroom --batch`` never imports Textual;
- ``cli.main`` imports neither Textual nor torch at module level (``--version`` and usage errors stay fast);
- no ``core`` module imports Textual or Rich, nor the reference libraries diffusers/transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.family_files import write_header_only

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("DARKROOM_MODELS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=180,
    )


def test_batch_run_never_imports_textual(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    write_header_only(models / "tiny.safetensors", "sd15")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "tiny"\nsteps = 2\n')
    code = """
        import json, sys
        from PIL import Image
        from cli.main import main
        import cli.batch
        from core.worker import GeneratedImage

        class Fake:
            def run(self, job, ctx):
                for i in (1, 2):
                    ctx.step(i, 2)
                return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]

        # the real entry point, with the pipeline factory swapped for the fake
        cli.batch.pipeline_runner_factory = lambda registry, dirs, *more: Fake
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: True if name == "core.pipeline" else real_find_spec(name, *a)
        code = main(["--batch", sys.argv[1], "--models-dir", sys.argv[2], "--output-dir", sys.argv[3],
                     "--db", sys.argv[4]])
        print(json.dumps({"code": code, "textual": sorted(m for m in sys.modules if m.split(".")[0] == "textual"),
                          "torch": "torch" in sys.modules}), file=sys.stderr)
        sys.exit(code)
    """
    proc = _python(code, tmp_path, str(jobs), str(models), str(tmp_path / "out"), str(tmp_path / "db"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["textual"] == []
    assert report["torch"]  # the batch really ran the worker (its status thread uses torch)
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.strip().endswith(".png")


def test_cli_main_imports_neither_textual_nor_torch(tmp_path):
    proc = _python(
        """
        import sys
        import cli.main
        try:
            cli.main.main(["--version"])
        except SystemExit:
            pass
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "torch", "rich"))
        print("LOADED=" + ",".join(bad))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("darkroom ")  # --version really ran
    assert proc.stdout.strip().splitlines()[-1] == "LOADED=", proc.stdout


def test_core_modules_never_import_ui_or_reference_libraries(tmp_path):
    proc = _python(
        """
        import importlib, json, pkgutil, sys
        import core
        FORBIDDEN = ("textual", "rich", "diffusers", "transformers")
        culprits, broken, checked = {}, {}, []
        for info in pkgutil.walk_packages(core.__path__, "core."):
            before = {m for m in sys.modules if m.split(".")[0] in FORBIDDEN}
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # someone's work in progress; reported, not judged here
                broken[info.name] = f"{type(exc).__name__}: {exc}"
            after = {m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN} - before
            if after:
                culprits[info.name] = sorted(after)
            checked.append(info.name)
        print(json.dumps({"culprits": culprits, "broken": broken, "checked": checked}))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["culprits"] == {}, report
    # the modules this suite is responsible for were really imported and checked
    for name in ("core.store", "core.worker", "core.accel.device", "core.request", "core.events"):
        assert name in report["checked"] and name not in report["broken"], report["broken"]
