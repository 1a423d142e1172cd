"""CUDA graphs of the denoiser (core/accel/cuda_graphs.py), with a stand-in for ``torch.cuda``'s graphs that
behaves as a capture does where it matters: a capture computes nothing (its output is garbage until a replay), a
replay reads the tensors the capture read and overwrites the one it wrote, and reads the weights where they were
at capture (the stand-in fails a replay whose weights moved, where a GPU would read freed memory); a capture fails
on what reads tensor values on the host or copies host data in (``capturing``), so every family's network is
checked for host syncs on the CPU."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
# tensor factories: without a device they make host tensors (on a GPU, to be copied over inside the capture)
_FACTORIES = {getattr(torch, name) for name in ("zeros", "ones", "empty", "full", "arange", "linspace", "rand",
                                                "randn", "randint", "eye", "tensor", "as_tensor", "from_numpy")}


class _HostCalls(TorchFunctionMode):
    """Python-level calls a capture refuses: reading values (``.tolist()`` dispatches no operator, so only this
    level sees it), a ``.cpu()`` / ``.to("cpu")`` copy, a tensor made on the host."""

    READS = {"tolist", "item", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS or name == "to" and "cpu" in [*(a for a in args[1:] if isinstance(a, str)),
                                                             kwargs.get("device")]:
            raise RuntimeError(f"{CAPTURE_ERROR} ({name}: tensor values read on the host)")
        if func in _FACTORIES and "device" not in kwargs:
            raise RuntimeError(f"{CAPTURE_ERROR} (torch.{name} without a device: a host tensor)")
        return func(*args, **kwargs)


class _HostOps(TorchDispatchMode):
    """Operators a capture refuses, wherever they come from: a host read (``int(t)``, ``x[mask]``, whose shape
    is the mask's count) or a tensor of Python data (``torch.tensor(lengths, device=...)``, an index list). A
    Python number set into a slice (``mask[i, n:] = False``) is allowed: on a GPU it is a fill."""

    READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = name in self.INDEXING and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name in self.READS or masks:
            raise RuntimeError(f"{CAPTURE_ERROR} ({name}: tensor values read on the host)")
        if name in ("aten::lift_fresh", "aten::lift_fresh_copy") and args[0].dim() > 0:
            raise RuntimeError(f"{CAPTURE_ERROR} ({name}: host data copied in)")
        return func(*args, **(kwargs or {}))


@contextmanager
def capturing():
    """What a CUDA capture refuses, refused on the CPU as a GPU refuses it: anything in the captured call that
    reads tensor values on the host or copies host data to the GPU. Every tensor is a host tensor here, so a
    factory inside the call must name its device (``device=x.device``), as it must on a GPU."""
    with _HostOps(), _HostCalls():
        yield


class FakeGraph:
    def __init__(self, call, output, weights) -> None:
        self.call, self.output, self.weights = call, output, weights
        self.released = False


class FakeGraphApi:
    """``torch.cuda``'s graphs on the CPU (see the module docstring); a capture fails on a host sync as a GPU's
    does (``capturing``); ``fail`` is raised by every capture."""

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
        with capturing():
            output = call()
        output.fill_(float("nan"))  # recorded, not run: nothing in it yet
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


class Scaled(torch.nn.Module):
    """x * w, plus whatever ``extra`` does in the call (a host sync, for the tests of ``capturing``)."""

    def __init__(self, extra=None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + (0 if self.extra is None else self.extra(x))


@pytest.mark.parametrize("extra", [
    lambda x: x.sum().item(),
    lambda x: x.tolist()[0][0],
    lambda x: int(x[0, 0] > 0),
    lambda x: x.sum() if bool(x.sum() > 0) else 0,
    lambda x: x[x > 0].sum(),
    lambda x: torch.tensor([1.0, 2.0], device=x.device)[:, None],  # host data copied in
    lambda x: torch.arange(2)[:, None].to(x.device),  # a host tensor
    lambda x: x.to("cpu", torch.float64).sum().to(x.device, x.dtype),  # the device's values read on the host
    lambda x: x.cpu().sum(),
], ids=["item", "tolist", "int", "bool", "mask index", "tensor of a list", "host factory", "to cpu", "cpu"])
def test_the_stand_in_capture_refuses_host_syncs_as_a_gpu_does(extra):
    network, x = Scaled(extra), torch.randn(2, 3)
    api = FakeGraphApi(watch=network)
    with torch.inference_mode(), cuda_graphs.for_job(True, api) as graphs:
        outputs = [cuda_graphs.replayed(network)(x) for _ in range(3)]
    assert graphs.captures == 0 and len(graphs.notes) == 1 and CAPTURE_ERROR in graphs.notes[0]
    assert all(torch.equal(out, network(x)) for out in outputs)  # eager after the failed capture


def test_device_side_work_is_captured():
    """What the networks do instead: factories on the input's device, scalars from shapes, slices filled."""

    def extra(x):
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        mask[:, x.shape[1] // 2:] = False
        return torch.arange(x.shape[1], device=x.device) * mask

    network, x = Scaled(extra), torch.randn(2, 3)
    api = FakeGraphApi(watch=network)
    with torch.inference_mode(), cuda_graphs.for_job(True, api) as graphs:
        outputs = [cuda_graphs.replayed(network)(x + step) for step in range(3)]
        assert all(torch.equal(out, network(x + step)) for step, out in enumerate(outputs))
    assert (graphs.captures, graphs.replays, graphs.notes) == (1, 2, [])


class Captioned(torch.nn.Module):
    """Z-Image's call: the latents and a list of captions of their own lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor, captions: list[torch.Tensor], scale: tuple[torch.Tensor, ...]) -> torch.Tensor:
        pooled = torch.stack([c.mean(0) * self.w for c in captions])  # [B, 4]
        return x * pooled[:, :, None] * scale[0] + scale[1]


def test_a_list_of_tensors_is_captured_each_tensor_an_input_each_length_a_shape():
    network = Captioned()
    api = FakeGraphApi(watch=network)
    g = torch.Generator().manual_seed(0)

    def call(fn, lengths, step):
        x = torch.randn(len(lengths), 4, 3, generator=g)
        captions = [torch.randn(n, 4, generator=g) for n in lengths]
        scale = (torch.full((1,), 1.0 + step), torch.randn(1, generator=g))
        return fn(x, captions, scale), network(x, captions, scale)

    with torch.inference_mode(), cuda_graphs.for_job(True, api) as graphs:
        graphed = cuda_graphs.replayed(network)
        pairs = [call(graphed, (5, 3), step) for step in range(4)]  # every input new each step
        assert (graphs.captures, graphs.replays) == (1, 3)
        pairs += [call(graphed, (3, 5), step) for step in range(3)]  # the same total, other lengths: a new graph
        assert (graphs.captures, graphs.replays) == (2, 5) and api.graphs[0].released
    assert all(torch.equal(a, b) for a, b in pairs) and graphs.notes == []


def _adapter_calls(family: str):
    """(adapter, calls): a tiny random network of ``family`` behind its sampler-side adapter, and the
    adapter's calls at a few shapes in turn, one shape coming back (a new latent size, a new caption length)."""
    from core.models import flux, flux2, zimage

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if family == "zimage":
        network = zimage.ZImageTransformer(zimage.ZImageConfig.preset("tiny")).eval()
        context = torch.randn(2, 70, network.config.cap_feat_dim, generator=g)
        calls = [(torch.randn(2, 16, h, w, generator=g), {"context": context, "cap_lens": torch.tensor(lens)})
                 for h, w, lens in ((4, 4, [40, 9]), (4, 4, [9, 40]), (4, 6, [9, 40]), (4, 4, [40, 9]))]
        return zimage.LatentZImage(network), calls
    if family == "flux":
        network = flux.Flux(flux.FluxConfig.preset("flux", "tiny", "schnell")).eval()
        extra = {"y": torch.randn(1, network.config.vec_in_dim, generator=g)}
        adapter, channels, width = flux.LatentFlux(network), network.config.in_channels // 4, network.config.context_in_dim
    else:
        network = flux2.Flux2(flux2.Flux2Config.preset("tiny")).eval()
        extra, adapter = {}, flux2.LatentFlux2(network)
        channels, width = network.config.in_channels, network.config.context_in_dim
    calls = [(torch.randn(1, channels, h, w, generator=g), {"context": torch.randn(1, s, width, generator=g), **extra})
             for h, w, s in ((4, 4, 5), (4, 4, 7), (6, 4, 7), (4, 4, 5))]
    return adapter, calls


@pytest.mark.parametrize("family", ["flux", "flux2", "zimage"])
def test_an_adapters_rope_table_is_the_one_of_each_calls_shape(family, monkeypatch):
    """The adapters hand their networks the RoPE tables (made once per shape): each call's output is the one the
    network gives making its own table from the call's positions."""
    from core.models import flux

    adapter, calls = _adapter_calls(family)
    t = torch.tensor([0.5] * calls[0][0].shape[0])
    with torch.inference_mode():
        handed = [adapter(x, t, **cond) for x, cond in calls]
        # the same calls with the tables left to the network: the adapters' caches never hit
        monkeypatch.setattr(flux.LastTable, "get", lambda self, key, make: None)
        own = [adapter(x, t, **cond) for x, cond in calls]
    assert all(torch.equal(a, b) for a, b in zip(handed, own))


def test_zimage_reads_its_caption_lengths_on_the_host_once_per_pass():
    """A pass hands Z-Image's adapter the same cap_lens tensor at every step; reading it on the host is a GPU
    sync, so only a new tensor (another pass) is read: a later step's whole adapter call passes the capture's
    host checks, and a new tensor's lengths are used."""
    adapter, calls = _adapter_calls("zimage")
    (x, cond), (_, swapped) = calls[0], calls[1]  # captions [40, 9], then [9, 40]
    t = torch.tensor([0.5, 0.5])
    with torch.inference_mode():
        first = adapter(x, t, **cond)
        with capturing():
            again = adapter(x, t, **cond)
        other = adapter(x, t, **swapped)
        expected = type(adapter)(adapter.network)(x, t, **swapped)
    assert torch.equal(first, again)
    assert torch.equal(other, expected)


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
    for family in ("sdxl", "flux", "flux2", "zimage"):
        write_random_checkpoint(root / "checkpoints" / f"tiny{family}.safetensors", family, "tiny", seed=0)
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


# A caption past 32 tokens against an empty negative prompt: Z-Image's cond and uncond captions pad to different
# lengths, so its CFG batch is ragged (a key mask) as well as a list.
LONG_PROMPT = "a red fox in deep snow under pine trees at dawn, " * 4
FLOW = {"sampler": "euler", "schedule": "simple"}


@pytest.mark.parametrize(("model", "changes"), [
    ("tiny", {}),
    ("tinysdxl", {}),
    ("tinyflux", {"cfg": 1.0, **FLOW}),
    ("tinyflux2", FLOW),
    ("tinyzimage", {"prompt": LONG_PROMPT, **FLOW}),
    # the distilled models' usual cfg 1: the network gets the sampler's own x at the first step, no CFG batch
    ("tinyflux2", {"cfg": 1.0, **FLOW}),
    ("tinyzimage", {"cfg": 1.0, **FLOW}),
], ids=["sd15", "sdxl", "flux", "flux2", "zimage", "flux2-cfg1", "zimage-cfg1"])
def test_a_compiled_job_replays_its_denoiser_and_makes_the_same_image(models, model, changes):
    """Every family's network through the runner: captured (no host sync inside it: the stand-in refuses them
    as a GPU does), replayed at every later step, the image equal to the eager job's."""
    runner, api = graphed_runner(models, model)
    api.watch = runner.model.checkpoint.unet
    changes = {"model": model, **changes}
    graphed = runner.run(job(**changes), Ctx())[0].image
    assert (runner.job_graphs.captures, runner.job_graphs.replays, runner.job_graphs.notes) == (1, 3, [])
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
    torch._dynamo.reset()  # graphs of these blocks compiled by an earlier test would be reused: nothing counted
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
    torch._dynamo.reset()  # as above: this job's warm-up must compile
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
