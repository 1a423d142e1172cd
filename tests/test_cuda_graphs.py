"""CUDA graphs of the denoiser (core/accel/cuda_graphs.py), with a stand-in for ``torch.cuda``'s graphs that
behaves as a capture does where it matters: a capture computes nothing (its output is garbage until a replay), a
replay reads the tensors the capture read and overwrites the one it wrote, and reads the weights where they were
at capture (the stand-in fails a replay whose weights moved, where a GPU would read freed memory)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.accel import cuda_graphs, feature_cache, memory
from core.accel.compile import _MARK, DenoiserCompiler
from core.models.testing import write_random_checkpoint
from core.models.unet import UNetModel
from core.pipeline import PipelineRunner
from core.request import GenerationRequest, HiresFix
from tests.reference import torch_threads
from tests.test_compile import _tiny_unet as tiny_unet
from tests.test_memory import Ctx


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


class FakeGraph:
    def __init__(self, call, output, weights) -> None:
        self.call, self.output, self.weights = call, output, weights
        self.released = False


class FakeGraphApi:
    """``torch.cuda``'s graphs on the CPU (see the module docstring); ``fail`` is raised by every capture."""

    device_type = "cpu"

    def __init__(self, watch: torch.nn.Module | None = None, fail: BaseException | None = None) -> None:
        self.watch, self.fail = watch, fail
        self.warm_ups, self.freed = 0, 0
        self.graphs: list[FakeGraph] = []

    def _weights(self) -> list[int]:
        return [] if self.watch is None else [p.data_ptr() for p in self.watch.parameters()]

    def warm_up(self, call):
        self.warm_ups += 1
        return call()

    def capture(self, call):
        if self.fail is not None:
            raise self.fail
        output = call().fill_(float("nan"))  # recorded, not run: nothing in it yet
        graph = FakeGraph(call, output, self._weights())
        self.graphs.append(graph)
        return graph, output

    def replay(self, graph: FakeGraph) -> None:
        assert not graph.released, "replay of a released graph"
        assert graph.weights == self._weights(), "replay reads the weights where they were at capture"
        graph.output.copy_(graph.call())

    def release(self, graph: FakeGraph) -> None:
        graph.released = True

    def free_memory(self) -> None:
        self.freed += 1


def _tiny_unet() -> UNetModel:
    return tiny_unet(1)  # one resolution level: enough blocks to capture, few to run


def _steps(network, steps: int = 4, size: int = 8) -> list[torch.Tensor]:
    """A job's denoiser calls: the network's output at each of a few timesteps, every output kept. As in a
    sampler, the network's input is made in inference mode (the denoiser scales it) and the conditioning
    before it (the text encoders' output is not an inference tensor)."""
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 7, 32, generator=g)
    outputs = []
    with torch.inference_mode():
        x = torch.randn(2, 4, size, size, generator=g)
        for step in range(steps):
            out = network(x, torch.full((2,), 900.0 - 200 * step), context)
            outputs.append(out)
            x = x - 0.1 * out
    return outputs


def _graphed_steps(unet, api, **kwargs) -> tuple[list[torch.Tensor], cuda_graphs.CudaGraphs]:
    with cuda_graphs.for_job(True, api) as graphs:
        return _steps(cuda_graphs.replayed(unet), **kwargs), graphs


def test_a_job_captures_once_replays_every_later_step_and_equals_eager():
    unet = _tiny_unet()
    eager = _steps(unet)
    api = FakeGraphApi(watch=unet)
    graphed, graphs = _graphed_steps(unet, api)
    # every kept output equals eager's: inputs copied in, each output copied out before the next replay
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
    assert (api.warm_ups, graphs.captures, graphs.replays) == (1, 1, 3)
    assert api.graphs[0].released  # leaving the job frees the graph's memory


def test_moved_weights_are_captured_anew():
    """A LoRA switch assigns merged buffers (new addresses): a replay would read the old ones."""
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet)
    with cuda_graphs.for_job(True, api) as graphs:
        network = cuda_graphs.replayed(unet)
        before = _steps(network, steps=3)
        with torch.no_grad():
            for param in unet.parameters():
                param.data = param.data + 0.01  # what core.lora.patch does: ``param.data = merged``
        after = _steps(network, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before + after, _steps(_tiny_unet())[:3] + _steps(unet, steps=3)))
    assert graphs.captures == 2 and api.graphs[0].released


def test_another_size_releases_the_previous_graph_first():
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet)
    with cuda_graphs.for_job(True, api) as graphs:
        network = cuda_graphs.replayed(unet)
        small, large = _steps(network, steps=3), _steps(network, steps=3, size=16)
        assert graphs.captures == 2 and api.graphs[0].released and not api.graphs[1].released
    assert all(torch.equal(a, b) for a, b in zip(small + large, _steps(unet, 3) + _steps(unet, 3, size=16)))


def test_shapes_that_keep_changing_go_eager_with_one_note_but_shapes_seen_before_are_captured_again():
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet)
    with cuda_graphs.for_job(True, api) as graphs:
        network = cuda_graphs.replayed(unet)
        for _ in range(cuda_graphs.MAX_CAPTURES_PER_JOB):  # two passes at two sizes, again and again (hires fix)
            _steps(network, steps=3), _steps(network, steps=3, size=16)
        assert graphs.notes == [] and graphs.captures == 2 * cuda_graphs.MAX_CAPTURES_PER_JOB
        sizes = range(17, 17 + cuda_graphs.MAX_CAPTURES_PER_JOB)  # a new size each time: not static
        outputs = [_steps(network, steps=3, size=size) for size in sizes]
    assert all(torch.equal(a, b) for size, got in zip(sizes, outputs) for a, b in zip(got, _steps(unet, 3, size=size)))
    assert graphs.captures == 2 * cuda_graphs.MAX_CAPTURES_PER_JOB + cuda_graphs.MAX_CAPTURES_PER_JOB - 2
    assert graphs.notes == [f"CUDA graphs: the denoiser was called at {cuda_graphs.MAX_CAPTURES_PER_JOB + 1} input "
                            "shapes in this job; running it without graphs for the rest of the job"]


def test_a_feature_cache_pass_runs_eagerly():
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet)
    with cuda_graphs.for_job(True, api) as graphs, feature_cache.for_pass(SimpleNamespace(deepcache_interval=2)):
        _steps(cuda_graphs.replayed(unet))
    assert (api.warm_ups, graphs.captures, graphs.replays) == (0, 0, 0)


def test_a_failed_capture_leaves_the_network_eager_with_one_note_and_later_jobs_do_not_try():
    import weakref

    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet, fail=RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    uncapturable = weakref.WeakSet()  # the compiler's, across jobs
    with cuda_graphs.for_job(True, api, uncapturable) as graphs:
        graphed = _steps(cuda_graphs.replayed(unet), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(graphed, _steps(unet, steps=5)))
    assert graphs.captures == 0 and api.warm_ups == 1  # tried once, then eager
    assert graphs.notes == ["CUDA graphs could not capture UNetModel (CUDA error: operation not permitted when "
                            "stream is capturing); running it without graphs"]
    assert unet in uncapturable
    api.fail = AssertionError("a later job tried to capture it again")
    with cuda_graphs.for_job(True, api, uncapturable) as graphs:
        _steps(cuda_graphs.replayed(unet))
    assert api.warm_ups == 1 and graphs.notes == []


def test_out_of_memory_in_a_capture_runs_the_job_eagerly_and_the_next_job_tries_again():
    """The graph's pool is memory the eager call does not hold at once; the warm-up fitted, so the job goes on
    eagerly instead of the memory plan's retry offloading a job that fits."""
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet, fail=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    graphed, graphs = _graphed_steps(unet, api)
    assert all(torch.equal(a, b) for a, b in zip(graphed, _steps(unet)))
    assert graphs.captures == 0 and api.freed == 1
    assert graphs.notes == ["CUDA graphs: out of memory capturing UNetModel; running it without graphs for this job"]
    api.fail = None  # another job (a smaller size, memory freed since) captures
    assert _graphed_steps(unet, api)[1].captures == 1


def test_calls_that_cannot_be_captured_run_eagerly():
    unet = _tiny_unet()
    api = FakeGraphApi(watch=unet)
    api.device_type = "cuda"  # the tensors are on the CPU: not this device's graphs
    graphed, graphs = _graphed_steps(unet, api)
    assert all(torch.equal(a, b) for a, b in zip(graphed, _steps(unet)))
    assert (api.warm_ups, graphs.captures) == (0, 0)


def test_outside_a_job_the_network_is_called_as_it_is():
    unet = _tiny_unet()
    assert cuda_graphs.replayed(unet) is unet
    with cuda_graphs.for_job(False) as graphs:
        assert graphs is None and cuda_graphs.replayed(unet) is unet


@pytest.mark.parametrize(("mode", "device", "api", "offload", "expected"), [
    ("torch", "cuda", None, "none", True),
    ("auto", "cuda", None, "none", True),
    ("torch", "cuda", None, "model", False),  # the offload hooks move weights during the call
    ("torch", "cuda", None, "sequential", False),
    ("off", "cuda", None, "none", False),
    ("torch", "cpu", None, "none", False),
    ("torch", "cpu", FakeGraphApi(), "none", True),
])
def test_graphs_come_with_compile_on_a_gpu_without_offload(mode, device, api, offload, expected, monkeypatch):
    monkeypatch.delenv("DARKROOM_CUDA_GRAPHS", raising=False)
    assert DenoiserCompiler(mode, device, graph_api=api).cuda_graphs(offload) is expected
    monkeypatch.setenv("DARKROOM_CUDA_GRAPHS", "0")  # the way out, should a GPU's driver misbehave
    assert DenoiserCompiler(mode, device, graph_api=api).cuda_graphs(offload) is False


def test_no_graphs_on_rocm(monkeypatch):
    """ROCm's hipGraph capture can swallow an op it cannot take and replay wrong results (pytorch#155684)."""
    monkeypatch.delenv("DARKROOM_CUDA_GRAPHS", raising=False)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    assert DenoiserCompiler("torch", "cuda").cuda_graphs("none") is False
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert DenoiserCompiler("torch", "cuda").cuda_graphs("none") is True


# ------------------------------------------------------------------------------------------ through the runner


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    write_random_checkpoint(root / "checkpoints" / "tinyflux.safetensors", "flux", "tiny", seed=0)
    return root


def job(**changes):
    request = GenerationRequest(model="tiny", prompt="a red fox", negative_prompt="", sampler="euler",
                                schedule="normal", steps=4, cfg=5.0, seed=3, width=64, height=64).replace(**changes)
    return SimpleNamespace(id=1, request=request)


def graphed_runner(root, model: str) -> tuple[PipelineRunner, FakeGraphApi]:
    runner = PipelineRunner([root], previews=False)
    api = FakeGraphApi()
    runner.compiler = DenoiserCompiler("torch", graph_api=api)
    # compiled already, as far as the compiler knows: the graphs are what is tested, not dynamo
    setattr(runner.ensure_model(job(model=model).request).checkpoint.unet, _MARK, "torch")
    return runner, api


@pytest.mark.parametrize("model", ["tiny", "tinyflux"])
def test_a_compiled_job_replays_its_denoiser_and_makes_the_same_image(models, model):
    runner, api = graphed_runner(models, model)
    api.watch = runner.model.checkpoint.unet
    changes = {"model": model} if model == "tiny" else {"model": model, "cfg": 1.0, "sampler": "euler",
                                                         "schedule": "simple"}
    graphed = runner.run(job(**changes), Ctx())[0].image
    assert (runner.job_graphs.captures, runner.job_graphs.replays) == (1, 3)
    plain = PipelineRunner([models], previews=False).run(job(**changes), Ctx())[0].image
    assert graphed.tobytes() == plain.tobytes()


def test_hires_fix_captures_each_pass_and_a_cache_job_none(models):
    runner, api = graphed_runner(models, "tiny")
    runner.run(job(hires=HiresFix(scale=1.5, upscaler="latent", steps=3, denoise=0.5)), Ctx())
    assert runner.job_graphs.captures == 2 and api.graphs[0].released
    runner.run(job(deepcache_interval=2), Ctx())
    assert runner.job_graphs.captures == 0


def test_a_hires_job_of_many_batches_replays_every_batch(models):
    """Each batch captures its two passes again (one graph is kept): that is not a shape that keeps changing."""
    runner, api = graphed_runner(models, "tiny")
    batches = cuda_graphs.MAX_CAPTURES_PER_JOB // 2 + 1
    runner.run(job(hires=HiresFix(scale=1.5, upscaler="latent", steps=3, denoise=0.5), batch_count=batches), Ctx())
    assert runner.job_graphs.captures == 2 * batches and runner.job_graphs.notes == []


def test_an_offloading_job_runs_without_graphs(models, monkeypatch):
    from tests.test_memory import RecordingPlacement

    runner, api = graphed_runner(models, "tiny")
    runner.placement = RecordingPlacement(torch.device("cuda"))
    model = runner.ensure_model(job().request)
    estimate = memory.estimate_job(model, job().request)
    free = int((estimate.need("model") + estimate.need("none")) / 2 * memory.SAFETY_FACTOR) + memory.SAFETY_BYTES
    monkeypatch.setattr(memory, "free_memory", lambda device: free)  # only model offload fits
    runner.run(job(), Ctx())
    assert runner.memory_plan.offload == "model" and runner.job_graphs is None and api.graphs == []


def test_a_failed_capture_gives_the_caller_its_stream_back(monkeypatch):
    """``torch.cuda.graph.__exit__`` runs ``capture_end`` before restoring the stream; when the capture was
    voided (a host sync inside), ``capture_end`` raises and the capture stream would stay current."""
    current = ["main"]

    class VoidedCapture:
        def __init__(self, graph, stream=None, capture_error_mode="global") -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current[0] = self.stream

        def __exit__(self, *exc) -> None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", VoidedCapture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: "side")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    with pytest.raises(RuntimeError, match="during capture"):
        cuda_graphs.TorchCudaGraphs().capture(lambda: torch.zeros(1))
    assert current == ["main"]


def test_a_network_that_runs_sage_attention_is_not_captured(monkeypatch):
    """SageAttention launches kernels outside the capture stream (thu-ml/SageAttention#371): a replay would
    skip them. Its warm-up tells; with SDPA the same network is captured."""
    from core.accel.attention import AttentionDispatcher
    from tests.test_attention import FakeKernels, gpu

    kernels = FakeKernels(monkeypatch)
    unet = _tiny_unet().to(torch.bfloat16)  # Sage runs fp16/bf16 only
    notes = {}
    for mode, captures in (("auto", 0), ("sdpa", 1)):
        api = FakeGraphApi(watch=unet)
        with AttentionDispatcher(mode, probe=gpu((9, 0))).active(), cuda_graphs.for_job(True, api) as graphs:
            g = torch.Generator().manual_seed(0)
            x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
            network = cuda_graphs.replayed(unet)
            with torch.inference_mode():
                for step in range(3):
                    network(x.bfloat16(), torch.full((2,), 900.0 - 200 * step), context.bfloat16())
        assert graphs.captures == captures, mode
        notes[mode] = graphs.notes
    assert kernels.used("sage") > 0
    assert notes == {"auto": ["CUDA graphs: UNetModel runs SageAttention, whose kernels a CUDA graph cannot capture; "
                              "running it without graphs (--attention xformers or sdpa would allow them)"],
                     "sdpa": []}


def test_a_capture_around_compiled_blocks_compiles_nothing_more():
    """On a GPU a compile inside a capture fails (dynamo reads the CUDA RNG state, inductor copies constants to
    the device: pytorch#131782, #185074). The warm-up compiles; the capture's call, on static tensors that
    are other tensor objects, must hit the same compiled code."""
    unet = _tiny_unet()
    eager = _steps(unet, steps=3)
    compiler = DenoiserCompiler("torch", backend="eager")
    compiler.prepare(unet)

    class CountingApi(FakeGraphApi):
        def capture(self, call):
            self.compiles_before = compiler.compiles
            graph = super().capture(call)
            self.compiles_after = compiler.compiles
            return graph

    api = CountingApi(watch=unet)
    graphed, graphs = _graphed_steps(unet, api, steps=3)
    assert graphs.captures == 1 and api.compiles_before > 0
    assert api.compiles_after == api.compiles_before == compiler.compiles  # nothing compiled in or after it
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(graphed, eager))


def test_a_compiled_job_through_the_runner_compiles_nothing_inside_its_capture(models):
    """The real job's tensors (conditioning from the text encoders, latents from the sampler) with dynamo's
    compiled blocks: the capture hits what the warm-up compiled."""
    runner = PipelineRunner([models], previews=False)

    class CountingApi(FakeGraphApi):
        compiles_in_captures = 0

        def capture(self, call):
            before = runner.compiler.compiles
            graph = super().capture(call)
            self.compiles_in_captures += runner.compiler.compiles - before
            return graph

    api = CountingApi()
    runner.compiler = DenoiserCompiler("torch", backend="eager", graph_api=api)
    graphed = runner.run(job(steps=3), Ctx())[0].image
    assert runner.job_graphs.captures == 1 and runner.compiler.compiles > 0
    assert api.compiles_in_captures == 0
    plain = PipelineRunner([models], previews=False).run(job(steps=3), Ctx())[0].image
    assert graphed.tobytes() == plain.tobytes()
