"""Compiling the denoiser (core/accel/compile.py): compiled output equals eager, a second job compiles
nothing, Stable-Fast falls back with one message, and the --compile / $DARKROOM_COMPILE choice.

The mechanism is proven with dynamo's ``eager`` backend (the graphs inductor would get, without inductor's
minutes of C++ compilation on this CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.accel.compile import DenoiserCompiler, regions
from core.accel.compile_mode import CompileModeError, check_mode, resolve_mode
from core.models.testing import random_state_dict
from core.models.unet import UNetConfig, UNetModel
from tests.reference import rel_err, torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _tiny_unet(seed: int) -> UNetModel:
    # one resolution level (5 blocks to capture, not 9): dynamo's tracing is what costs time here
    cfg = dataclasses.replace(UNetConfig.preset("sd15", "tiny"), channel_mult=(1,), transformer_depth=(1,))
    with torch.device("meta"):
        meta = UNetModel(cfg)
    model = UNetModel(cfg)
    model.load_state_dict(random_state_dict(meta, seed=seed), strict=True)
    return model.eval().requires_grad_(False)


def _job(unet: UNetModel, steps: int = 2) -> torch.Tensor:
    """A stand-in for one job's denoiser calls: a CFG batch at a fixed size, a few timesteps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, unet.config.context_dim, generator=g)
    with torch.inference_mode():
        for step in range(steps):
            x = unet(x, torch.full((2,), 900.0 - 300 * step), context)
    return x


@pytest.fixture(scope="module")
def compiled():
    """A tiny UNet compiled with dynamo's ``eager`` backend (the graphs, captured once, are what is tested),
    its compiler, and the output of one job before and after compiling."""
    # dynamo keeps graphs per code object, not per module: blocks of this shape compiled by an earlier test in this
    # process (test_cuda_graphs uses _tiny_unet too) would be reused, and this compiler would count none
    torch._dynamo.reset()
    unet = _tiny_unet(1)
    eager = _job(unet)
    compiler = DenoiserCompiler("torch", backend="eager")
    assert compiler.prepare(unet) is unet and compiler.describe(unet) == "torch"
    return unet, compiler, eager, _job(unet)


def test_compiled_unet_equals_eager_and_the_second_job_compiles_nothing(compiled):
    unet, compiler, eager, first = compiled
    built = compiler.compiles
    assert built >= len(unet.output_blocks)  # the blocks were captured as graphs ...
    assert rel_err(first, eager) < 1e-5  # ... that compute what eager did
    compiler.prepare(unet)  # the next job's prepare leaves a compiled network alone
    second = _job(unet)
    assert compiler.compiles == built  # same model, same shape: nothing recompiled
    assert torch.equal(second, first)


def test_feature_caches_run_around_the_compiled_blocks(compiled):
    from core.accel.feature_cache import CacheSettings, FeatureCache

    unet, compiler, _, _ = compiled
    eager_unet = _tiny_unet(1)
    results = []
    for net in (eager_unet, unet):
        cache = FeatureCache(CacheSettings(deepcache_interval=3))
        with cache.active():
            results.append(_job(net, steps=3))
        assert (cache.stats.full, cache.stats.shallow) == (1, 2)
    assert rel_err(results[1], results[0]) < 1e-5
    assert compiler.compiles > 0


def test_regions_are_the_blocks():
    unet = _tiny_unet(3)
    blocks = regions(unet)
    assert len(blocks) == len(unet.input_blocks) + 1 + len(unet.output_blocks)
    assert regions(torch.nn.Linear(2, 2))[0].__class__ is torch.nn.Linear


def test_off_compiles_nothing_and_stable_fast_falls_back_with_one_message(monkeypatch):
    unet = _tiny_unet(4)
    off = DenoiserCompiler("off")
    off.prepare(unet)
    assert off.describe(unet) == "off" and getattr(unet, "_darkroom_compiled", None) is None
    import core.accel.compile as compile_module

    monkeypatch.setattr(compile_module, "stable_fast_available", lambda: False)
    compiler = DenoiserCompiler("stable-fast", device="cpu", backend="eager")
    compiler.prepare(unet)
    compiler.prepare(_tiny_unet(5))
    assert compiler.describe(unet) == "torch"
    assert compiler.notes == ["stable-fast needs an NVIDIA GPU; compiling with torch.compile instead"]
    cuda = DenoiserCompiler("stable-fast", device="cuda", backend="eager")
    cuda.prepare(_tiny_unet(6))  # compiles lazily: nothing runs on CUDA here
    assert cuda.notes == ["stable-fast is not installed (pip install stable-fast); compiling with torch.compile instead"]


def test_compile_mode_choice():
    assert check_mode(" Torch ") == "torch" and check_mode("inductor") == "torch"
    assert check_mode("sfast") == "stable-fast" and check_mode("on") == "auto"
    assert resolve_mode(None, {}) == "off"
    assert resolve_mode(None, {"DARKROOM_COMPILE": "auto"}) == "auto"
    assert resolve_mode("torch", {"DARKROOM_COMPILE": "off"}) == "torch"
    with pytest.raises(CompileModeError, match=r"\$DARKROOM_COMPILE = 'fast' is not a compile mode; valid: off"):
        resolve_mode(None, {"DARKROOM_COMPILE": "fast"})


def test_the_compile_setting_reaches_the_runner(tmp_path):
    import io

    from cli.batch import EXIT_USAGE, run_batch
    from cli.main import build_parser
    from core.runner import make_runner

    parser = build_parser()
    assert parser.parse_args(["--compile"]).compile == "auto"
    assert parser.parse_args(["--compile", "torch"]).compile == "torch"
    assert parser.parse_args([]).compile is None
    runner = make_runner([tmp_path], device="cpu", compile="torch")
    assert runner.compiler.mode == "torch" and runner.compiler.enabled
    assert not make_runner([tmp_path], device="cpu").compiler.enabled
    err = io.StringIO()
    code = run_batch("-", stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err, compile="fast",
                     db_path=tmp_path / "db.sqlite3")
    assert code == EXIT_USAGE
    assert "--compile = 'fast' is not a compile mode; valid: off, auto, torch, stable-fast" in err.getvalue()


def test_blocks_compile_without_cuda_graphs_on_cuda(monkeypatch):
    """CUDA graph trees start a new generation at each call into a compiled region, which invalidates the
    tensors one block hands the next: ``g(f(x))`` fails on a GPU (pytorch/pytorch#152887). The per-block
    regions must go to inductor with CUDA graphs off, even where $TORCHINDUCTOR_CUDAGRAPHS turns them on."""
    import sys
    import types

    patches = []
    fake = types.ModuleType("torch._inductor.compile_fx")

    def compile_fx(gm, example_inputs, config_patches=None):  # noqa: ANN001, ANN202
        patches.append(config_patches)
        return gm.forward

    fake.compile_fx = compile_fx
    monkeypatch.setitem(sys.modules, "torch._inductor.compile_fx", fake)
    for device in ("cuda", "cpu"):
        compiler = DenoiserCompiler("torch", device=device)
        compiled = compiler._torch_backend()(torch.fx.symbolic_trace(torch.nn.Identity()), [])
        assert compiled(torch.ones(1)).item() == 1.0 and compiler.compiles == 1
    assert patches == [{"triton.cudagraphs": False}] * 2


def test_recompile_limits_are_raised_under_the_names_older_torch_has(monkeypatch):
    """torch before pytorch#143709 (Dec 2024; Darkroom declares torch>=2.2) names the limits
    ``cache_size_limit`` / ``accumulated_cache_size_limit`` and has no ``recompile_limit``."""
    class OldConfig:  # the real config without the new names (torch.compile reads the rest of it)
        def __init__(self) -> None:
            self.cache_size_limit, self.accumulated_cache_size_limit = 8, 256

        def __getattr__(self, name: str):  # noqa: ANN204
            if name in ("recompile_limit", "accumulated_recompile_limit"):
                raise AttributeError(name)
            return getattr(real, name)

    real = torch._dynamo.config
    old = OldConfig()
    monkeypatch.setattr(torch._dynamo, "config", old)
    unet = _tiny_unet(7)
    DenoiserCompiler("torch", backend=lambda gm, inputs: gm.forward).prepare(unet)  # compiles lazily
    assert old.cache_size_limit == 16 * len(regions(unet))
    assert old.accumulated_cache_size_limit == 4 * old.cache_size_limit
    assert not hasattr(old, "recompile_limit")


def test_stable_fast_compiles_without_a_cuda_graph(monkeypatch):
    """A CUDA graph replays the weights' addresses of its capture; a LoRA switch (``param.data = buffer``) and
    the offload plans (other tensors put in place) move them, so stable-fast must not capture one."""
    import sys
    import types

    import core.accel.compile as compile_module

    compiled = []
    sfast = types.ModuleType("sfast.compilers.diffusion_pipeline_compiler")

    class CompilationConfig:
        class Default:  # stable-fast's defaults, as far as they matter here
            enable_jit = True
            enable_cuda_graph = False

    sfast.CompilationConfig = CompilationConfig
    sfast.compile_unet = lambda network, config: compiled.append((network, config.enable_cuda_graph))
    monkeypatch.setitem(sys.modules, "sfast.compilers.diffusion_pipeline_compiler", sfast)
    monkeypatch.setattr(compile_module, "stable_fast_available", lambda: True)
    unet = _tiny_unet(8)
    auto = DenoiserCompiler("auto", device="cuda")
    assert auto.prepare(_tiny_unet(8)) is not None and compiled == []  # auto is torch.compile, even with sfast
    compiler = DenoiserCompiler("stable-fast", device="cuda")
    compiler.prepare(unet)
    assert compiler.describe(unet) == "stable-fast" and compiled == [(unet, False)]
    # the trace keeps its weights: a plan that offloads the denoiser is refused for it, and only for it
    assert compiler.offload_conflict(unet, "none") is None
    assert compiler.offload_conflict(_tiny_unet(8), "model") is None
    message = compiler.offload_conflict(unet, "sequential")
    assert message.startswith("--compile stable-fast cannot run this job: its memory plan needs sequential offload")
    assert "--compile torch" in message


def test_the_first_job_of_a_size_says_it_is_compiling_until_its_first_step(tmp_path):
    """Compiling happens in the first step and takes minutes on a full model: the status said "generating"
    at step 0 all that time."""
    from types import SimpleNamespace

    from core.models.testing import write_random_checkpoint
    from core.pipeline import COMPILING, PipelineRunner
    from core.request import GenerationRequest
    from tests.test_memory import Ctx

    write_random_checkpoint(tmp_path / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    runner = PipelineRunner([tmp_path], previews=False)
    runner.compiler = DenoiserCompiler("torch", backend="eager")
    steps: list[str] = []

    class Recording(Ctx):
        def step(self, *args, **kwargs) -> None:
            steps.append(self.activities[-1])

    def job(**changes):
        request = GenerationRequest(model="tiny", prompt="a fox", sampler="euler", steps=2, cfg=5.0, seed=3,
                                    width=64, height=64).replace(**changes)
        return SimpleNamespace(id=1, request=request)

    first = Recording()
    runner.run(job(), first)
    assert COMPILING in first.activities and first.activities[-1] == "generating"
    assert steps[0] == "generating"  # said until the first step is done, not during the others
    again = Recording()
    runner.run(job(seed=4), again)
    assert COMPILING not in again.activities  # the same size: compiled already
    other = Recording()
    runner.run(job(width=96), other)
    assert COMPILING in other.activities
