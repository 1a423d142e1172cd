"""The attention choice from the front ends to the dispatcher, and the dispatcher's record back to the status bar:
``--attention`` and ``$DARKROOM_ATTENTION`` for ``--batch`` and the TUI, the worker's Status, the status line."""

from __future__ import annotations

import textwrap
import threading
from types import SimpleNamespace

import pytest
from PIL import Image

import core.pipeline
from cli.main import build_parser, main
from core.accel import attention as attn
from core.accel.attention import AttentionDispatcher, DeviceInfo
from core.accel.attention_mode import AttentionModeError
from core.events import JobFinished, Status
from core.request import GenerationRequest
from core.store import JobStore
from core.worker import GeneratedImage, Worker
from tests.family_files import write_header_only
from tests.test_attention import FakeKernels, qkv


class RecordingPipeline(core.pipeline.PipelineRunner):
    """The real runner's construction (and so its dispatcher); ``run`` makes a blank image instead of loading."""

    modes: list[str] = []

    def run(self, job, ctx):
        type(self).modes.append(self.attention.mode)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]


@pytest.fixture
def batch(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    monkeypatch.delenv("DARKROOM_ATTENTION", raising=False)
    monkeypatch.setattr(core.pipeline, "PipelineRunner", RecordingPipeline)
    RecordingPipeline.modes = []
    models = tmp_path / "models"
    models.mkdir()
    write_header_only(models / "fake.safetensors", "sd15")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(textwrap.dedent('[[job]]\nmodel = "fake"\nprompt = "a cat"\nsteps = 1\n'))

    def run(*extra: str) -> int:
        return main(["--batch", str(jobs), "--models-dir", str(models), "--db", str(tmp_path / "db"),
                     "--output-dir", str(tmp_path / "out"), *extra])

    return run


def test_batch_flag_reaches_the_dispatcher(batch):
    assert batch("--attention", "SDPA") == 0
    assert RecordingPipeline.modes == ["sdpa"]


def test_batch_environment_setting_and_default(batch, monkeypatch):
    assert batch() == 0
    monkeypatch.setenv("DARKROOM_ATTENTION", "xformers")
    assert batch() == 0
    assert batch("--attention", "sage") == 0  # the command line wins over the environment
    assert RecordingPipeline.modes == ["auto", "xformers", "sage"]


def test_batch_bad_environment_value_is_a_usage_error(batch, monkeypatch, capsys):
    monkeypatch.setenv("DARKROOM_ATTENTION", "flash2")
    assert batch() == 2
    err = capsys.readouterr().err
    assert "$DARKROOM_ATTENTION = 'flash2' is not an attention backend; valid: auto, sage, xformers, sdpa" in err
    assert RecordingPipeline.modes == []


def test_unknown_flag_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--attention", "flash"])
    assert exc.value.code == 2 and "invalid choice: 'flash'" in capsys.readouterr().err
    assert build_parser().parse_args([]).attention is None


def test_tui_runner_gets_the_flag_and_the_setting(monkeypatch):
    from tui.app import FAKE_RUNNER_ENV, _runner_factory

    monkeypatch.delenv(FAKE_RUNNER_ENV, raising=False)
    monkeypatch.setattr(core.pipeline, "PipelineRunner", RecordingPipeline)
    monkeypatch.setenv("DARKROOM_ATTENTION", "sage")
    assert _runner_factory(SimpleNamespace(attention="xformers", models_dir=None))().attention.mode == "xformers"
    assert _runner_factory(SimpleNamespace(attention=None, models_dir=None))().attention.mode == "sage"
    monkeypatch.setenv("DARKROOM_ATTENTION", "nope")
    with pytest.raises(AttentionModeError, match="DARKROOM_ATTENTION = 'nope'"):
        _runner_factory(SimpleNamespace(attention=None, models_dir=None))


def test_tui_app_construction_reads_the_flag(monkeypatch, tmp_path):
    """create_app builds the worker with a factory whose runner carries the mode from the parsed arguments."""
    from tui.app import FAKE_RUNNER_ENV, create_app

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path))
    monkeypatch.delenv(FAKE_RUNNER_ENV, raising=False)
    monkeypatch.delenv("DARKROOM_ATTENTION", raising=False)
    monkeypatch.setattr(core.pipeline, "PipelineRunner", RecordingPipeline)
    args = build_parser().parse_args(["--attention", "sdpa", "--db", str(tmp_path / "db")])
    app = create_app(args)
    try:
        assert app.worker._get_runner().attention.mode == "sdpa"
    finally:
        app.worker.store.close()


class DispatchingRunner:
    """Runs three 'layers' through its dispatcher the way the pipeline does: one job, one ``active`` block."""

    def __init__(self, monkeypatch) -> None:
        FakeKernels(monkeypatch, xformers=False)  # sage only: head dim 160 goes to sdpa
        self.attention = AttentionDispatcher(probe=lambda device: DeviceInfo("cuda", (9, 0)))

    def run(self, job, ctx):
        with self.attention.active(new_job=True):
            for _ in range(2):
                for dim in (40, 80, 160):
                    attn.attention(*qkv(8, dim, 16), 8, layer=f"layer{dim}")
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]


def test_worker_status_carries_the_layer_summary(tmp_path, monkeypatch):
    runner = DispatchingRunner(monkeypatch)
    store = JobStore(tmp_path / "db")
    worker = Worker(store, runner, output_dir=tmp_path / "out", status_interval=0.05)
    statuses: list[Status] = []
    done = threading.Event()

    def on_event(event) -> None:
        if isinstance(event, Status):
            statuses.append(event)
        if isinstance(event, JobFinished):
            done.set()

    worker.subscribe(on_event)
    worker.start()
    try:
        worker.submit(GenerationRequest(model="fake.safetensors", prompt="a cat", steps=1))
        assert done.wait(20)
        pause = threading.Event()
        for _ in range(200):  # the status after the job
            if statuses and statuses[-1].attention_backend == "sage 2 / sdpa 1":
                break
            pause.wait(0.05)
    finally:
        worker.stop(timeout=10)
        store.close()
    assert statuses[-1].attention_backend == "sage 2 / sdpa 1"


def test_a_compiling_runner_says_its_denoiser_is_compiled():
    """Compiled blocks bypass the dispatcher (inductor lowers their attention), so its record counts only the
    rest: "sdpa 1" alone read as if the whole job ran on SDPA."""
    from types import SimpleNamespace

    import torch

    runner = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, attention=SimpleNamespace(
        summary=lambda: "sdpa 1"), compiler=SimpleNamespace(enabled=True))
    worker = Worker(JobStore(":memory:"), runner)
    worker._runner = runner
    assert worker._make_status(None).attention_backend == "compiled + sdpa 1"
    runner.compiler.enabled = False
    assert worker._make_status(None).attention_backend == "sdpa 1"


def test_status_bar_shows_the_summary():
    from tui.widgets.status_bar import status_text

    status = Status(0, device="cuda:0", attention_backend="sage 14 / sdpa 2", dtype="float16")
    assert "  attention: sage 14 / sdpa 2  float16  " in status_text(status).plain
    hostile = Status(0, device="cuda:0", attention_backend="sage\x1b[2J 1")
    assert "\x1b" not in status_text(hostile).plain


def test_pipeline_runner_routes_every_network_through_its_dispatcher(tmp_path, monkeypatch):
    """A real job on a tiny checkpoint: UNet, CLIP and VAE layers all reach the runner's dispatcher (a simulated
    sm90 GPU with fake kernels; fp32 here, so xformers), the record resets per job, the image is SDPA's."""
    import torch

    from core.models.testing import write_random_checkpoint

    kernels = FakeKernels(monkeypatch)
    write_random_checkpoint(tmp_path / "tiny.safetensors", "sd15", "tiny", seed=0)
    request = GenerationRequest(model="tiny", prompt="a lighthouse", sampler="euler", steps=2, seed=1,
                                width=64, height=64)
    job = SimpleNamespace(id=1, request=request)
    ctx = SimpleNamespace(step=lambda *a, **k: None, set_activity=lambda text: None, is_cancelled=lambda: False)
    gpu_like = AttentionDispatcher(probe=lambda device: DeviceInfo("cuda", (9, 0)))
    runner = core.pipeline.PipelineRunner([tmp_path], attention=gpu_like, previews=False)
    assert runner.attention is gpu_like
    [got] = runner.run(job, ctx)
    model = runner.model.checkpoint
    text_layers = sum(type(m).__name__ == "CLIPAttention" for m in model.text_encoder.modules())
    layers = (sum(type(m).__name__ == "CrossAttention" for m in model.unet.modules()) + text_layers
              + sum(type(m).__name__ == "AttnBlock" for m in model.vae.decoder.modules()))
    assert text_layers > 0 and gpu_like.summary() == f"xformers {layers}"
    calls = kernels.used("xformers")
    runner.run(job, ctx)  # a new record: the prompts come from the cache, so no text-encoder layer ran
    assert gpu_like.summary() == f"xformers {layers - text_layers}" and kernels.used("xformers") > calls
    runner.attention = AttentionDispatcher("sdpa")
    [want] = runner.run(job, ctx)
    assert runner.attention.summary() == f"sdpa {layers - text_layers} (forced sdpa)"
    diff = (torch.tensor(list(got.image.getdata())) - torch.tensor(list(want.image.getdata()))).abs().max()
    assert diff <= 1  # 8-bit pixels: the fake xformers computes in float32 like SDPA
    assert attn.current_dispatcher() is None  # the context ends with the job
