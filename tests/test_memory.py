"""The precision and memory policy (core/accel/memory.py), on simulated small and large devices.

No GPU: free memory is faked, the ``meta`` device stands in for a GPU where parameters really move, and the
pipeline-level tests use a placement that records where each network would be instead of moving it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.accel import device as devices
from core.accel import memory
from core.accel.memory import (
    Estimate,
    LiveTensorBytes,
    MemoryPlan,
    Placement,
    choose_plan,
    escalate,
    fits,
    is_out_of_memory,
)
from core.accel.memory_mode import MemoryModeError, resolve_mode
from core.models.testing import write_random_checkpoint
from core.models.unet import UNetConfig, UNetModel
from core.models.vae import AutoencoderKL, VAEConfig
from core.pipeline import OutOfMemoryJobError, PipelineRunner, _decode
from core.request import GenerationRequest
from tests.reference import torch_threads

GB = 2**30


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny networks: one thread beats two fighting over a shared machine's cores
        yield


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB, for images in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / (a.float() - b.float()).pow(2).mean())).item()

# SD1.5-like sizes in fp16 (bytes): weights from the real parameter counts, activations by the formulas
SD15 = Estimate(text_weights=int(0.23 * GB), denoiser_weights=int(1.6 * GB), refiner_weights=0,
                vae_weights=int(0.16 * GB), text=2**20, denoise=int(0.6 * GB), decode=int(1.6 * GB),
                resident_weights=int(0.05 * GB), largest_block=int(0.12 * GB), latent_hw=(128, 128), batch=4)


# ------------------------------------------------------------------------------------------ precision


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an older GPU: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert devices.compute_dtype("cuda", torch.bfloat16) == torch.float16
    assert asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.compute_dtype("cuda", torch.float16) == torch.bfloat16
    assert devices.compute_dtype("cpu", torch.bfloat16) == torch.float32


def test_channels_last_for_conv_unets_on_cuda_only():
    unet = SimpleNamespace(config=SimpleNamespace(model_channels=320))
    flux = SimpleNamespace(config=SimpleNamespace(hidden_size=3072))
    assert memory.use_channels_last("cuda", unet)
    assert not memory.use_channels_last("cpu", unet)
    assert not memory.use_channels_last("cuda", flux)


def test_channels_last_unet_gives_the_same_output():
    torch.manual_seed(0)
    net = UNetModel(UNetConfig.preset("sd15", "tiny")).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 77, net.config.context_dim)
    with torch.inference_mode():
        plain = net(x, t, ctx)
        net.to(memory_format=torch.channels_last)
        assert net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(net(x, t, ctx), plain, atol=1e-5)


# ------------------------------------------------------------------------------------------ estimate


def test_activation_formulas_match_measured_peaks():
    """The calibrated constants hold on an architecture the calibration did not see at this width and size
    (SD1.5's structure at model_channels 32, an 8x8 latent, batch 2; a VAE ch 32 decoding 64 px)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(UNetConfig.preset("sd15", "full"), model_channels=32, num_heads=4, context_dim=64)
    net = UNetModel(cfg).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 77, cfg.context_dim)
    with torch.inference_mode(), LiveTensorBytes() as meter:
        net(x, t, ctx)
    estimate = memory.denoiser_activations(net, "sd15", (8, 8), 2, 4)
    assert meter.peak <= estimate <= 1.15 * meter.peak
    vae = AutoencoderKL(dataclasses.replace(VAEConfig(), ch=32)).eval()
    with torch.inference_mode(), LiveTensorBytes() as meter:
        vae.decode(torch.randn(1, 4, 8, 8))
    estimate = memory.vae_activations(vae, (64, 64), 1, 4, "vae_decode")
    assert meter.peak <= estimate <= 1.15 * meter.peak


def test_live_tensor_bytes_counts_storages_once():
    a = torch.randn(256, 256)
    with LiveTensorBytes() as meter:
        b = a * 2  # 256 KiB
        view = b.t()  # a view: no allocation
        c = b + 1
        del c
        d = a.t()  # a view of a tensor made outside
    assert meter.peak == 2 * a.numel() * 4
    assert meter.live == a.numel() * 4  # b (and its view) still alive
    del b, view, d


# ------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("free_gb, offload", [(40, "none"), (3.0, "model"), (2.0, "sequential")])
def test_the_least_offload_that_fits_is_chosen(free_gb, offload):
    free = int(free_gb * GB)
    plan = choose_plan(SD15, free, "auto", "cuda")
    assert plan.offload == offload
    assert fits(SD15.need(offload, plan.vae_tile), free)
    earlier = memory.OFFLOADS[: memory.OFFLOADS.index(offload)]
    assert all(not fits(SD15.need(o), free) for o in earlier)  # nothing less intrusive fits
    if offload == "none" and plan.vae_tile is None:
        assert plan.is_default and plan.describe() == ""
    else:
        assert plan.describe().startswith({"none": "tiled VAE", "model": "model offload",
                                           "sequential": "sequential offload"}[offload])
        assert f"est. {SD15.need() / GB:.1f} GB > {free_gb:.1f} GB free" in plan.describe()


def test_a_tiny_device_gets_a_tiled_vae_too():
    free = int(1.6 * GB)
    plan = choose_plan(SD15, free, "auto", "cuda")
    assert plan.offload == "sequential" and plan.vae_tile is not None
    assert not fits(SD15.need("sequential"), free)  # untiled would not
    assert fits(SD15.need("sequential", plan.vae_tile), free)
    assert "tiled VAE" in plan.describe()


def test_forced_modes():
    big = 80 * GB
    assert choose_plan(SD15, big, "lowvram", "cuda").describe() == "model offload (--lowvram)"
    assert choose_plan(SD15, big, "sequential", "cuda").offload == "sequential"
    assert choose_plan(SD15, 2 * GB, "lowvram", "cuda").offload == "sequential"  # model offload would not fit
    assert choose_plan(SD15, 2 * GB, "gpu", "cuda").offload == "none"  # never offloads
    assert choose_plan(SD15, 2 * GB, "auto", "cpu").offload == "none"  # the CPU has nowhere to offload to
    assert resolve_mode(True, {}) == "lowvram"
    assert resolve_mode(False, {"DARKROOM_MEMORY": " Sequential"}) == "sequential"
    with pytest.raises(MemoryModeError, match="DARKROOM_MEMORY = 'tiny' is not a memory mode; valid: auto"):
        resolve_mode(False, {"DARKROOM_MEMORY": "tiny"})


def test_escalation_after_out_of_memory():
    plan = choose_plan(SD15, 40 * GB, "auto", "cuda")
    retry = escalate(plan, SD15, "cuda")
    assert retry.offload == "model" and retry.vae_tile is not None and retry.reason == "retry"
    last = MemoryPlan("sequential", 8, free=GB)
    assert escalate(last, SD15, "cuda") is None  # nothing left to give up
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    # cuBLAS / cuDNN running out of device memory for their handles and workspaces, as torch reports it
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))


# ------------------------------------------------------------------------------------------ placement (meta = GPU)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_model_offload_moves_networks_and_back_unchanged():
    a, b = Net(), Net()
    originals = {name: p.data_ptr() for name, p in a.named_parameters()}
    placement = Placement(torch.device("meta"))
    placement.register("m", {"unet": a, "text_encoder": b})
    placement.prepare(MemoryPlan("model"))
    assert {p.device.type for p in [*a.parameters(), *b.parameters()]} == {"cpu"}
    with placement.use("m", ("text_encoder",)):
        assert {p.device.type for p in b.parameters()} == {"meta"}
        assert {p.device.type for p in a.parameters()} == {"cpu"}
    with placement.use("m", ("unet",)):
        assert {p.device.type for p in a.parameters()} == {"meta"}
        assert {p.device.type for p in b.parameters()} == {"cpu"}  # moved out for the next stage
    placement.release_all()
    # the CPU tensors are the very same ones: nothing was copied back
    assert {name: p.data_ptr() for name, p in a.named_parameters()} == originals


def test_resident_plan_keeps_the_denoiser_and_releases_text_encoders():
    unet, te = Net(), Net()
    placement = Placement(torch.device("meta"))
    placement.register("m", {"unet": unet, "text_encoder": te})
    placement.prepare(MemoryPlan("none"))
    assert next(unet.parameters()).device.type == "meta" and next(te.parameters()).device.type == "cpu"
    with placement.use("m", ("text_encoder",)):
        assert next(te.parameters()).device.type == "meta"
    placement.release("m", ("text_encoder",))
    assert next(te.parameters()).device.type == "cpu" and next(unet.parameters()).device.type == "meta"


class Probe(nn.Module):
    """A block that notes where every block's weights are while it runs (and computes nothing: meta kernels
    would import torch's Python decompositions, seconds here)."""

    def __init__(self, log: list, blocks: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(16, 16))
        self.__dict__.update(log=log, peers=blocks)  # not submodules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self, [b for b in self.peers if b.weight.device.type == "meta"]))
        return x


def test_sequential_offload_has_one_block_on_the_device_at_a_time():
    log: list = []
    net = nn.Module()
    net.blocks = nn.ModuleList()
    net.blocks.extend(Probe(log, net.blocks) for _ in range(3))
    net.scale = nn.Parameter(torch.ones(4))  # the network's own tensor: resident
    net.forward = lambda x: [block(x) for block in net.blocks][-1]
    blocks, resident = memory.offload_blocks(net)
    assert blocks == list(net.blocks)
    placement = Placement(torch.device("meta"))
    placement.register("m", {"unet": net})
    placement.prepare(MemoryPlan("sequential"))
    assert net.scale.device.type == "meta" and {b.weight.device.type for b in blocks} == {"cpu"}
    net(torch.zeros(1))
    assert [m for m, _ in log] == blocks
    assert all(on == [module] for module, on in log)  # each block alone on the device, while it runs
    assert {b.weight.device.type for b in blocks} == {"cpu"}
    placement.release_all()
    assert {p.device.type for p in net.parameters()} == {"cpu"}


def test_unet_blocks_for_sequential_offload():
    net = UNetModel(UNetConfig.preset("sd15", "tiny"))
    blocks, resident = memory.offload_blocks(net)
    assert blocks == [*net.input_blocks, net.middle_block, *net.output_blocks]
    assert net.time_embed in resident and net.out in resident  # small: kept on the device


# ------------------------------------------------------------------------------------------ the pipeline


class RecordingPlacement(Placement):
    """A GPU placement that moves nothing: it only knows which networks are "on the device"."""

    @property
    def active(self) -> bool:
        return True

    def _move_in(self, module: nn.Module) -> None:
        pass

    def _move_out(self, module: nn.Module) -> None:
        pass


class Ctx:
    job_id = 1

    def __init__(self) -> None:
        self.activities: list[str] = []

    def set_activity(self, text: str) -> None:
        self.activities.append(text)

    def step(self, *args, **kwargs) -> None:
        pass

    def is_cancelled(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        pass


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    runner = PipelineRunner([root], previews=False)
    runner.placement = RecordingPlacement(torch.device("cuda"))
    return runner


def job(**changes):
    request = GenerationRequest(model="tiny", prompt="a red fox", negative_prompt="", sampler="euler",
                                schedule="normal", steps=2, cfg=5.0, seed=3, width=64, height=64).replace(**changes)
    return SimpleNamespace(id=1, request=request)


def test_a_small_gpu_offloads_each_stage_and_says_so(runner, monkeypatch):
    model = runner.ensure_model(job().request)
    # fake free memory: the tiny model's total need (resident) does not fit, model offload does
    estimate = memory.estimate_job(model, job().request)
    assert estimate.need("model") < estimate.need("none")
    free = int((estimate.need("model") + estimate.need("none")) / 2 * memory.SAFETY_FACTOR) + memory.SAFETY_BYTES
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    stages: list[tuple[str, set[str]]] = []
    parts = model.checkpoint.components
    for role in ("unet", "vae"):
        module = parts[role].decoder if role == "vae" else parts[role]
        module.register_forward_pre_hook(
            lambda m, args, role=role: stages.append((role, {n.split("/")[1] for n in runner.placement._on})))
    te = parts["text_encoder"]
    first = next(m for m in te.modules() if list(m.children()) == [] and list(m.parameters()))
    first.register_forward_pre_hook(
        lambda m, args: stages.append(("text", {n.split("/")[1] for n in runner.placement._on})))
    ctx = Ctx()
    images = runner.run(job(), ctx)
    assert len(images) == 1
    assert runner.memory_plan.offload == "model"
    assert any(a.startswith("generating · memory: model offload (est. ") for a in ctx.activities)
    assert stages[0] == ("text", {"text_encoder"})
    assert ("unet", {"unet"}) in stages and ("vae", {"vae"}) in stages  # each alone on the device
    # the prompt is cached now: a second job never brings the text encoder back
    stages.clear()
    runner.run(job(seed=4), Ctx())
    assert not any(stage == "text" for stage, _ in stages)


def test_out_of_memory_retries_once_with_offload_then_fails_with_advice(runner, monkeypatch):
    model = runner.ensure_model(job().request)
    monkeypatch.setattr(memory, "free_memory", lambda device: 64 * GB)
    plans = []

    def failing_once():
        plans.append(runner.placement.plan)
        if len(plans) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return ["ok"]
    assert runner.run_with_memory_plan(model, job(width=256, height=256).request, None, Ctx(), failing_once) == ["ok"]
    assert [p.offload for p in plans] == ["none", "model"] and plans[1].vae_tile is not None

    def always():
        raise torch.OutOfMemoryError("CUDA out of memory")
    request = job(batch_size=4, width=512, height=512).request
    with pytest.raises(OutOfMemoryJobError) as caught:
        runner.run_with_memory_plan(model, request, None, Ctx(), always)
    message = str(caught.value)
    assert message.startswith("out of memory on cuda at 512x512 with 4 images per batch")
    assert "also after retrying with model offload" in message
    assert "what would fit:" in message and "--lowvram" in message and "per batch" in message

    def other():
        raise ValueError("not memory")
    with pytest.raises(ValueError):  # anything else is not retried
        runner.run_with_memory_plan(model, job().request, None, Ctx(), other)


def test_a_stable_fast_denoiser_fails_a_job_that_must_offload_it_with_one_message(runner, monkeypatch):
    """Stable-Fast's trace keeps the weights of trace time; the offload plans put device copies in their
    place, so such a job must fail with a message, not run on the swapped-out weights."""
    from core.accel.compile import _MARK
    from core.errors import DarkroomError

    model = runner.ensure_model(job().request)
    estimate = memory.estimate_job(model, job().request)
    free = int((estimate.need("model") + estimate.need("none")) / 2 * memory.SAFETY_FACTOR) + memory.SAFETY_BYTES
    monkeypatch.setattr(memory, "free_memory", lambda device: free)  # only model offload fits
    monkeypatch.setattr(model.checkpoint.unet, _MARK, "stable-fast", raising=False)
    ran = []
    with pytest.raises(DarkroomError, match="^--compile stable-fast cannot run this job: its memory plan needs "
                                            "model offload"):
        runner.run_with_memory_plan(model, job().request, None, Ctx(), lambda: ran.append(1))
    assert ran == []
    monkeypatch.setattr(memory, "free_memory", lambda device: 64 * GB)  # it fits: the job runs
    assert runner.run_with_memory_plan(model, job().request, None, Ctx(), lambda: ["ok"]) == ["ok"]


def test_tiled_decode_chosen_by_the_estimate_equals_untiled():
    """The estimate says the untiled decode does not fit: the plan's tile decodes what untiled decodes, up to
    the tiles' own GroupNorm statistics (a random-weight VAE differs more across tiles than a trained one)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.preset("sd15", "tiny")).eval()
    latents = torch.randn(1, 4, 32, 32)
    estimate = dataclasses.replace(SD15, text_weights=0, denoiser_weights=0, vae_weights=0, decode=8 * GB,
                                   latent_hw=(32, 32), batch=1)
    plan = choose_plan(estimate, 6 * GB, "auto", "cpu")
    assert plan.vae_tile is not None and plan.vae_tile < 32
    assert fits(estimate.need("none", plan.vae_tile), 6 * GB) and not fits(estimate.need("none"), 6 * GB)
    tiled = _decode(vae, latents, plan.vae_tile)
    plain = _decode(vae, latents)
    assert tiled.shape == plain.shape == (1, 3, 256, 256)
    assert psnr(tiled, plain) >= 35


def test_tiled_encode_equals_untiled():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.preset("sd15", "tiny")).eval()
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.inference_mode():
        plain = vae.encode(images, sample=False)
        tiled = vae.encode(images, sample=False, tile=24)
    assert tiled.shape == plain.shape == (1, 4, 32, 32)
    assert psnr(tiled / tiled.abs().max(), plain / tiled.abs().max()) >= 35


def test_batch_log_shows_a_memory_plan_that_is_not_the_default():
    import io

    from cli.batch import _PlainProgress

    err = io.StringIO()
    progress = _PlainProgress(err, 2)
    progress.activity(1, "generating")
    progress.activity(1, "generating · memory: model offload (est. 9.1 GB > 7.8 GB free)")
    progress.activity(1, "generating · memory: model offload (est. 9.1 GB > 7.8 GB free)")  # once
    assert err.getvalue().splitlines() == ["[1/2] generating · memory: model offload (est. 9.1 GB > 7.8 GB free)"]


def test_lowvram_flag_and_setting_reach_the_runner(monkeypatch):
    from cli.main import build_parser
    from tui.app import FAKE_RUNNER_ENV, _runner_factory

    monkeypatch.delenv(FAKE_RUNNER_ENV, raising=False)
    monkeypatch.delenv("DARKROOM_MEMORY", raising=False)
    args = build_parser().parse_args(["--lowvram"])
    assert args.lowvram and not build_parser().parse_args([]).lowvram
    assert _runner_factory(args)().memory_mode == "lowvram"
    monkeypatch.setenv("DARKROOM_MEMORY", "sequential")
    assert _runner_factory(build_parser().parse_args([]))().memory_mode == "sequential"


def test_bf16_is_probed_on_the_gpu_the_runner_uses(monkeypatch):
    """torch.cuda.is_bf16_supported() reads the current device: with ``--device cuda:1`` beside a GPU of another
    generation the dtype must follow cuda:1 (here a Turing card 0 and an Ampere card 1)."""
    import contextlib

    native = {0: False, 1: True}
    current = [0]

    @contextlib.contextmanager
    def on(index):
        previous, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native[current[0]])
    assert devices.compute_dtype("cuda:1") == torch.bfloat16
    assert devices.compute_dtype("cuda:0") == torch.float16
    assert devices.compute_dtype("cuda") == torch.float16 and current == [0]  # no index: the current device
