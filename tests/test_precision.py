"""The precision policy: ``--precision`` / ``$DARKROOM_PRECISION``, bf16 on CPUs with AMX, and a real job in bf16.

The rest of the suite runs as on a CPU without AMX (tests/conftest.py); these tests undo that where needed.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import core.accel.device as devices
from cli.batch import EXIT_USAGE, run_batch
from cli.main import build_parser
from core.accel.precision_mode import PrecisionModeError, check_mode, resolve_mode
from core.models.testing import write_random_checkpoint
from core.runner import make_runner
from tests.batch_harness import run_jobs


def test_precision_choice_is_checked_and_normalised():
    assert check_mode(" BF16 ") == "bf16" and check_mode("float32") == "fp32" and check_mode("half") == "fp16"
    assert resolve_mode(None, {}) == "auto"
    assert resolve_mode(None, {"DARKROOM_PRECISION": "bfloat16"}) == "bf16"
    assert resolve_mode("fp32", {"DARKROOM_PRECISION": "bf16"}) == "fp32"  # the command line wins
    with pytest.raises(PrecisionModeError, match=r"\$DARKROOM_PRECISION = 'int8' is not a precision; valid: auto, "
                       r"fp32, bf16, fp16"):
        resolve_mode(None, {"DARKROOM_PRECISION": "int8"})


def test_auto_is_bf16_on_a_cpu_with_amx_and_fp32_without(monkeypatch):
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: True)
    assert devices.compute_dtype("cpu") == torch.bfloat16
    assert devices.compute_dtype("cpu", precision="fp32") == torch.float32
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: False)
    assert devices.compute_dtype("cpu") == torch.float32
    assert devices.compute_dtype("cpu", precision="bf16") == torch.bfloat16
    assert devices.compute_dtype("cpu", precision="fp16") == torch.float16
    # a forced choice holds on a GPU too; auto keeps the GPU rule (bf16 where native, else fp16)
    monkeypatch.setattr(devices, "_native_bf16", lambda device=None: False)
    assert devices.compute_dtype("cuda") == torch.float16
    assert devices.compute_dtype("cuda", precision="bf16") == torch.bfloat16
    assert devices.compute_dtype("cuda", precision="fp32") == torch.float32


def test_the_amx_probe_reads_torch(monkeypatch):
    """``cpu_native_bf16`` is torch's AMX probe (tests/conftest.py's stand-in keeps it as ``real``)."""
    probe = getattr(devices.cpu_native_bf16, "real", devices.cpu_native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert probe() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert probe() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert probe() is False  # a torch without the probe: fp32, as before


def test_the_precision_setting_reaches_the_runner(tmp_path, monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args([]).precision is None
    assert make_runner([tmp_path], device="cpu", precision="bf16").dtype == torch.bfloat16
    assert make_runner([tmp_path], device="cpu", precision="fp32").dtype == torch.float32
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: True)
    assert make_runner([tmp_path], device="cpu").dtype == torch.bfloat16  # auto on an AMX CPU
    err = io.StringIO()
    code = run_batch("-", stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err, precision="fp8",
                     db_path=tmp_path / "db.sqlite3")
    assert code == EXIT_USAGE
    assert "--precision = 'fp8' is not a precision; valid: auto, fp32, bf16, fp16" in err.getvalue()


def _batch_image(tmp_path, models, monkeypatch, precision: str) -> np.ndarray:
    job = {"model": "tiny", "prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 3, "seed": 7, "width": 64,
           "height": 64, "cfg": 5.0}
    (tmp_path / precision).mkdir()
    (path,), _ = run_jobs([job], models, tmp_path / precision, monkeypatch, precision=precision)
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_a_job_in_bf16_on_the_cpu_makes_the_fp32_image_to_bf16_rounding(tmp_path, monkeypatch):
    models = tmp_path / "models"
    write_random_checkpoint(models / "tiny.safetensors", "sd15", "tiny", seed=0)
    full, half = (_batch_image(tmp_path, models, monkeypatch, precision) for precision in ("fp32", "bf16"))
    mse = float(((full - half) ** 2).mean())
    assert mse > 0, "the bf16 run computed in fp32"
    assert 10 * np.log10(255**2 / mse) > 30  # the same picture, to bf16 rounding


def test_every_kind_of_job_runs_in_bf16_on_the_cpu(tmp_path, monkeypatch):
    """The paths the fp32 suite never runs in half precision (img2img, masks, hires, LoRA, the Flux
    transformer): with ``--precision auto`` on an AMX CPU they all run in bf16, so a dtype mix-up is a crash."""
    from core.models.testing import write_random_flux_split_set, write_random_lora

    models = tmp_path / "models"
    write_random_checkpoint(models / "checkpoints" / "sd15.safetensors", "sd15", "tiny", seed=0)
    write_random_lora(models / "loras" / "style.safetensors", "sd15", "tiny")
    write_random_flux_split_set(tmp_path, "comfyui")
    Image.new("RGB", (64, 64), (120, 80, 200)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    base = {"prompt": "a lighthouse", "steps": 2, "seed": 3, "width": 64, "height": 64}
    img = {"init_image": str(tmp_path / "init.png")}
    jobs = [
        {**base, "model": "sd15", "prompt": "a lighthouse <lora:style:0.8>", "negative_prompt": "blurry"},
        {**base, "model": "sd15", **img},
        {**base, "model": "sd15", **img, "mask": str(tmp_path / "mask.png"), "inpaint_area": "only_masked",
         "masked_content": "latent_noise"},
        {**base, "model": "sd15", "hires": {"scale": 1.5}, "sampler": "dpmpp_2m", "schedule": "karras"},
        {**base, "model": "flux1-dev", "cfg": 1.0, **img},
    ]
    paths, _ = run_jobs(jobs, models, tmp_path, monkeypatch, precision="bf16")
    images = [np.asarray(Image.open(p)) for p in paths]
    assert [im.shape[:2] for im in images] == [(64, 64)] * 3 + [(96, 96), (64, 64)]
    assert all(im.std() > 1 for im in images)  # pictures, not a flat fill from a NaN or a dropped pass


def test_the_tui_builds_its_worker_with_the_precision_and_yielding_the_cpu(tmp_path, monkeypatch):
    from tui.app import FAKE_RUNNER_ENV, create_app

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path))
    monkeypatch.delenv(FAKE_RUNNER_ENV, raising=False)
    args = build_parser().parse_args(["--precision", "bf16", "--db", str(tmp_path / "db"), "--models-dir",
                                      str(tmp_path)])
    app = create_app(args)
    try:
        assert app.worker._get_runner().dtype == torch.bfloat16
        assert app.worker.yield_cpu  # the job thread gives the UI and the terminal the CPU first
    finally:
        app.worker.store.close()


def test_the_gpu_check_loads_each_precision_it_measures(tmp_path):
    """bench/gpu_check.py's fp16 and bf16 rows must run in that dtype: it used to patch compute_dtype around
    ensure_model, which the runner no longer calls there (it passes the dtype it chose when built), so on an
    Ampere GPU both rows ran in bf16."""
    from bench import gpu_check

    write_random_checkpoint(tmp_path / "checkpoints" / "tiny.safetensors", "sd15", "tiny")
    for precision, dtype in gpu_check.DTYPES.items():
        runner = gpu_check.darkroom_runner(tmp_path, torch.device("cpu"), precision)
        model = runner.ensure_model(gpu_check.request_for("tiny", 64, 64, 2))
        assert model.dtype == dtype and next(model.checkpoint.unet.parameters()).dtype == dtype
