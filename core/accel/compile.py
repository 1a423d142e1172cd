"""Compiling the denoiser: ``torch.compile`` per block (inductor), or Stable-Fast when installed; on a CUDA GPU,
with the whole network call captured in a CUDA graph where the shapes are static (``core.accel.cuda_graphs``).

The network is compiled by regions, each repeated block on its own (the UNet's input, middle and output
blocks; Flux's double- and single-stream blocks), as diffusers' regional compilation does: a block compiles in
seconds instead of the whole graph in minutes, identical blocks share the compiled code, and the feature caches
(:mod:`core.accel.feature_cache`), which choose per step which blocks run, stay plain Python around them.

Compiled code lives on the network's modules, so it lasts as long as the model stays loaded: the second job
of a model and size compiles nothing (``dynamic=False``: each latent size gets its own static graph).
``compiles`` counts the graphs this compiler's backend built.

The blocks compile without inductor's CUDA graphs (``mode="reduce-overhead"``): its CUDA graph trees start a
new generation at every call into a compiled region from eager code, and freeing the previous generation's
outputs invalidates the tensors one block hands the next (and the UNet's skips): ``g(f(x))`` with both compiled
fails with "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"
(pytorch/pytorch#152887, #160281, open). Per-block regions are what the feature caches need. The CUDA graph is
instead one capture of the whole network call, around the compiled blocks (``cuda_graphs``), for the jobs where
nothing decides per step: no feature cache, no offload.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.accel.compile_mode import check_mode

log = logging.getLogger(__name__)

GRAPHS_ENV_VAR = "DARKROOM_CUDA_GRAPHS"
_MARK = "_darkroom_compiled"  # attribute on a compiled network: the mode it was compiled with


def regions(network: nn.Module) -> list[nn.Module]:
    """The blocks of ``network`` compiled one by one (the whole network when it has no known block lists)."""
    if hasattr(network, "input_blocks"):  # core.models.unet.UNetModel
        return [*network.input_blocks, network.middle_block, *network.output_blocks]
    if hasattr(network, "double_blocks"):  # core.models.flux.Flux
        return [*network.double_blocks, *network.single_blocks]
    return [network]


def _raise_recompile_limits(per_code: int) -> None:
    """Blocks of one class share one code object, and dynamo keeps at most ``recompile_limit`` graphs per code
    object (8) before it falls back to eager: SD1.5 has about 20 distinct blocks, times the sizes used. The
    limits were ``cache_size_limit`` / ``accumulated_cache_size_limit`` before pytorch#143709 (Dec 2024), and
    torch>=2.2 is what Darkroom declares."""
    config = torch._dynamo.config
    per, total = (("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit")
                  else ("cache_size_limit", "accumulated_cache_size_limit"))
    limit = max(getattr(config, per), per_code)
    setattr(config, per, limit)
    setattr(config, total, max(getattr(config, total), 4 * limit))


def stable_fast_available() -> bool:
    return importlib.util.find_spec("sfast") is not None


class DenoiserCompiler:
    """Compiles each network handed to :meth:`prepare` once, by the session's mode (``core.accel.compile_mode``).

    ``backend`` replaces inductor (tests use ``"aot_eager"`` or a callable); ``graph_api`` replaces
    ``torch.cuda``'s graphs (tests: a stand-in that runs on the CPU); ``notes`` holds each fallback message once,
    for front ends to show.
    """

    def __init__(
        self, mode: str = "off", device: torch.device | str = "cpu", backend: str | Callable | None = None,
        graph_api: Any = None, graphs: bool | None = None,
    ):
        self.mode = check_mode(mode)
        self.device = torch.device(device)
        self.backend = backend
        self.graph_api = graph_api
        # CUDA graphs of compiled jobs; $DARKROOM_CUDA_GRAPHS=0 turns them off (the bench compares both)
        if graphs is None:
            graphs = os.environ.get(GRAPHS_ENV_VAR, "1").strip().lower() not in ("0", "off", "no", "false")
        self.graphs = graphs
        # networks whose CUDA graph capture failed (a host sync inside): later jobs run them eagerly at once
        self.uncapturable: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.compiles = 0
        self.notes: list[str] = []
        self._shapes: dict[int, set[tuple]] = {}  # id(network) -> the job sizes it has compiled for

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s", message)

    def _counted(self, inner: Callable) -> Callable:
        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            self.compiles += 1
            return inner(gm, example_inputs)

        return backend

    def _torch_backend(self) -> Callable:
        if callable(self.backend):
            return self._counted(self.backend)
        if self.backend is not None:
            return self._counted(torch._dynamo.lookup_backend(self.backend))
        from torch._inductor.compile_fx import compile_fx

        # cudagraphs off even where $TORCHINDUCTOR_CUDAGRAPHS turns them on: they break on chained regions (module doc)
        return self._counted(functools.partial(compile_fx, config_patches={"triton.cudagraphs": False}))

    def _stable_fast(self, network: nn.Module) -> bool:
        """Stable-Fast's UNet compiler on ``network``; False (after one note) where it cannot run."""
        if self.device.type != "cuda":
            self._note("stable-fast needs an NVIDIA GPU; compiling with torch.compile instead")
            return False
        if not stable_fast_available():
            self._note("stable-fast is not installed (pip install stable-fast); compiling with torch.compile instead")
            return False
        try:
            from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig, compile_unet

            config = CompilationConfig.Default()
            # No CUDA graph: a captured graph replays the weights' addresses of its capture, and both a LoRA
            # switch (core.lora.patch assigns merged buffers: ``param.data = buffer``) and the memory plan's
            # offload (core.accel.memory.Placement puts other tensors in place) give the weights new ones; the
            # graph would go on reading the old (stale or freed) memory.
            config.enable_cuda_graph = False
            compile_unet(network, config)
        except Exception as exc:  # noqa: BLE001 - an optional extra that fails in any way: torch.compile instead
            self._note(f"stable-fast could not compile the denoiser ({exc}); compiling with torch.compile instead")
            return False
        return True

    def prepare(self, network: nn.Module) -> nn.Module:
        """Compile ``network``'s blocks in place (once; a network already compiled is left as it is)."""
        if not self.enabled or getattr(network, _MARK, None):
            return network
        mode = self.mode
        if mode == "auto":
            # Stable-Fast only when asked for by name: its traced network keeps the weights it was traced with,
            # so it cannot follow the offload plans (``offload_conflict``); torch.compile follows them
            mode = "torch"
        if mode == "stable-fast" and self._stable_fast(network):
            setattr(network, _MARK, "stable-fast")
            return network
        backend = self._torch_backend()
        blocks = regions(network)
        _raise_recompile_limits(16 * len(blocks))
        for block in blocks:
            block.compile(backend=backend, dynamic=False)
        setattr(network, _MARK, "torch")
        return network

    def new_shape(self, network: nn.Module, key: tuple) -> bool:
        """Whether a job at ``key`` (its size and batch) is the first on this compiled ``network``: its first
        step compiles, which takes seconds to minutes, and the front ends say so. Records it."""
        seen = self._shapes.setdefault(id(network), set())
        if not self.enabled or key in seen:
            return False
        seen.add(key)
        return True

    def cuda_graphs(self, offload: str) -> bool:
        """Whether a job under a memory plan with ``offload`` replays its denoiser from CUDA graphs: compiling is
        on, the device is an NVIDIA GPU (or a stand-in API is given), and nothing is offloaded (the plan's hooks move
        weights during the call, which a replay would not do)."""
        # NVIDIA only: on ROCm an op a capture cannot take can be swallowed and replayed wrong (pytorch#155684)
        nvidia = self.device.type == "cuda" and getattr(torch.version, "hip", None) is None
        return self.enabled and self.graphs and (nvidia or self.graph_api is not None) and offload == "none"

    def offload_conflict(self, network: nn.Module, offload: str) -> str | None:
        """Why ``network`` cannot run under a memory plan with ``offload`` ("model"/"sequential"), or None.

        Stable-Fast's ``torch.jit.trace`` keeps the Parameter objects of trace time, while the plan's Placement
        (core.accel.memory) puts device copies in their place for each stage: the traced network would go on
        reading the copies of its trace (stale after a LoRA switch) and free nothing on the GPU."""
        if offload == "none" or getattr(network, _MARK, None) != "stable-fast":
            return None
        return (f"--compile stable-fast cannot run this job: its memory plan needs {offload} offload, and the "
                "network Stable-Fast traced keeps its weights where they were traced; use --compile torch (it "
                "follows the offload), or a smaller size or batch that fits on the GPU")

    def describe(self, network: nn.Module | None = None) -> str:
        """What runs: ``off``, ``torch`` or ``stable-fast`` (for the status line and the bench)."""
        return getattr(network, _MARK, None) or ("off" if not self.enabled else self.mode)
