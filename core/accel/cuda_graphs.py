"""CUDA graphs for the denoiser where the shapes are static: one network call captured per input shape, replayed
at every later step of the pass.

A sampling step launches about a thousand kernels (SD1.5's UNet: ResBlocks, attention, norms), and at small
sizes on a fast GPU the CPU's launching is what the step waits for. A CUDA graph records those launches once;
a replay is one launch. What makes a replay equal the eager call:

- **Inputs and output.** A replay reads the tensors the capture read and writes the tensor it wrote, so each
  call copies its inputs into those (static) tensors and returns a copy of the output (the next replay
  overwrites it; samplers keep earlier outputs). An argument may be a list or tuple of tensors (Z-Image's
  ragged captions): each is an input, and each one's shape is part of the graph's key.
- **Weights.** A replay reads each weight at its address of capture time. A graph is keyed by the addresses of
  the network's parameters and buffers, so a LoRA switch (``core.lora.patch`` assigns merged buffers) or a
  move to another device captures anew; a weight changed in place is what the replay reads.
- **No Python runs in a replay**, so whatever decides per call stays eager: a feature cache pass
  (``core.accel.feature_cache`` picks the blocks per step) and the memory plan's offload hooks (the runner
  asks for graphs only when nothing is offloaded: ``DenoiserCompiler.cuda_graphs``). Inside the network,
  anything that reads a tensor's values on the host (``.tolist()``, ``.item()``, a pageable copy to the GPU)
  cannot be captured: the capture fails, and that network runs eagerly from then on (one note; the set of such
  networks is the compiler's, so later jobs do not try again). The families' networks take what needs the
  host from their adapters instead (the RoPE tables, made from positions on the CPU: ``core.models.flux
  .joint_rope``, ``core.models.zimage.rope_tables``); tests/test_cuda_graphs.py's stand-in capture refuses
  host reads as a GPU does.
- **Warm-up.** The first call at a shape runs eagerly on the capture stream: cuBLAS workspaces and other lazy
  inits, torch.compile's compiles and the attention dispatcher's per-shape fallbacks all happen outside the
  capture. The second call captures.
- **SageAttention is never captured.** Its fused quantisation and sm90 kernels launch on the legacy default
  stream, outside a capture on any other (thu-ml/SageAttention#371, open), and its sm120 path replays wrong
  values (#392): a replay would silently skip or corrupt attention. Inside compiled blocks attention is SDPA
  anyway (``core.accel.attention``), but a block dynamo left eager would dispatch; a warm-up whose attention
  used SageAttention leaves the network eager for the job, with one note.

Whole-network capture, not inductor's CUDA graph trees: those break on the per-block regions the compiler
makes (``core.accel.compile``). Only the last captured graph is kept: its private memory pool holds a set of
activations, and a hires pass, a refiner or a detail region should not pay for the previous one's. Out of
memory during a capture leaves the network eager for the job (the eager warm-up fitted: no reason to offload),
any other failure leaves it eager from then on. Graphs live for one job (``for_job``).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from core.accel import feature_cache
from core.accel.attention import backends_used

log = logging.getLogger(__name__)

# More input shapes captured than this in one job: the shapes are not static (a prompt schedule changing the
# batch, say). Shapes captured again (a hires fix or refiner job's passes, once per batch) do not count.
MAX_CAPTURES_PER_JOB = 8


class GraphApi(Protocol):
    """What capturing needs from ``torch.cuda`` (tests hand in a stand-in that runs on the CPU)."""

    device_type: str

    def warm_up(self, call: Callable[[], Any]) -> Any: ...

    def capture(self, call: Callable[[], Any]) -> tuple[Any, Any]:
        """(graph, output) of recording ``call``; the recording has not run yet."""
        ...

    def replay(self, graph: Any) -> None: ...

    def release(self, graph: Any) -> None: ...

    def free_memory(self) -> None: ...


class TorchCudaGraphs:
    """``torch.cuda.CUDAGraph`` on one side stream, as PyTorch's whole-network capture recipe does it."""

    device_type = "cuda"

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def warm_up(self, call: Callable[[], Any]) -> Any:
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = call()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def capture(self, call: Callable[[], Any]) -> tuple[Any, Any]:
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream()
        try:
            # thread_local: another thread's CUDA call (the UI asking for free memory) does not void this capture
            with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
                out = call()
        except BaseException:
            # torch.cuda.graph's __exit__ leaves the capture stream current when capture_end raises
            torch.cuda.set_stream(caller)
            raise
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()

    def release(self, graph: Any) -> None:
        graph.reset()
        torch.cuda.empty_cache()

    def free_memory(self) -> None:
        """After a capture ran out of memory: what it had taken goes back before the eager call."""
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class _Captured:
    key: tuple
    graph: Any
    inputs: list[torch.Tensor]  # the static tensors the graph reads, in the order of the call's tensors
    output: torch.Tensor  # the static tensor it writes


def _tensor_key(tensor: torch.Tensor) -> tuple:
    # is_inference: dynamo guards on it (an inference tensor lacks the ADInplaceOrView dispatch key), so a static
    # copy of another kind than the warm-up's would recompile inside the capture
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor.is_inference()


def _signature(network: nn.Module, args: tuple, kwargs: dict, device_type: str) -> tuple[tuple, list] | None:
    """(key, the call's tensors in order) of a call that can be captured, None for one that cannot (a tensor
    on another device, an argument that is neither a tensor, a list or tuple of tensors, nor a plain constant).
    A list's tensors are the call's one after another, each shape in the key (Z-Image's ragged captions: the
    cond and uncond caption lengths are part of the shape)."""
    parts: list[tuple] = []
    tensors: list[torch.Tensor] = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            items = [value]
        elif type(value) in (list, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            items = list(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, value))
            continue
        else:
            return None
        if any(t.device.type != device_type for t in items):
            return None
        keys = tuple(_tensor_key(t) for t in items)
        parts.append((name, keys[0]) if isinstance(value, torch.Tensor) else (name, type(value), keys))
        tensors.extend(items)
    weights = tuple(t.data_ptr() for t in itertools.chain(network.parameters(), network.buffers()))
    return (id(network), tuple(parts), weights), tensors


def _static_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` of the same kind: an inference tensor only where it is one (the text encoders'
    outputs, made outside inference mode, are not; dynamo's guards tell the two apart)."""
    if tensor.is_inference():
        return tensor.clone()
    with torch.inference_mode(False):
        return tensor.clone()


def _with_tensors(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their tensors (lists' and tuples' too) replaced by ``tensors`` (the order of
    ``_signature``)."""
    supply = iter(tensors)

    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(supply)
        if type(value) in (list, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            return type(value)(next(supply) for _ in value)
        return value

    new_args = tuple(swap(v) for v in args)
    new_kwargs = {k: swap(v) for k, v in sorted(kwargs.items())}
    return new_args, new_kwargs


class CudaGraphs:
    """The graphs of one job: ``call`` runs a network call eagerly, or captures it, or replays it.

    ``captures`` and ``replays`` count what it did; ``notes`` holds each reason a network went eager, once.
    ``uncapturable``: the networks whose capture failed (kept across jobs by the caller; added to here)."""

    def __init__(self, api: GraphApi | None = None, uncapturable: weakref.WeakSet | None = None) -> None:
        self.api = api or TorchCudaGraphs()
        self.uncapturable = weakref.WeakSet() if uncapturable is None else uncapturable
        self.captures = 0
        self.replays = 0
        self.notes: list[str] = []
        self._warm: set[tuple] = set()
        self._captured: set[tuple] = set()  # the keys captured in this job (one may be captured again)
        self._eager: set[int] = set()  # id() of networks that run eagerly for the rest of this job
        self._last: _Captured | None = None

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s", message)

    def call(self, network: nn.Module, args: tuple, kwargs: dict) -> Any:
        if id(network) in self._eager or network in self.uncapturable or feature_cache.current() is not None:
            return network(*args, **kwargs)
        signature = _signature(network, args, kwargs, self.api.device_type)
        if signature is None:
            return network(*args, **kwargs)
        key, tensors = signature
        last = self._last
        if last is not None and last.key == key:
            for static, value in zip(last.inputs, tensors):
                static.copy_(value)
            self.api.replay(last.graph)
            self.replays += 1
            return last.output.clone()
        if key not in self._warm:
            self._warm.add(key)
            with backends_used() as attention_used:
                out = self.api.warm_up(lambda: network(*args, **kwargs))
            if not isinstance(out, torch.Tensor):  # one output tensor is what a replay hands back
                self.uncapturable.add(network)
            if "sage" in attention_used:
                self._eager.add(id(network))
                self._note(f"CUDA graphs: {type(network).__name__} runs SageAttention, whose kernels a CUDA graph "
                           "cannot capture; running it without graphs (--attention xformers or sdpa would allow them)")
            return out
        if key not in self._captured and len(self._captured) >= MAX_CAPTURES_PER_JOB:
            self._note(f"CUDA graphs: the denoiser was called at {len(self._captured) + 1} input shapes in this "
                       "job; running it without graphs for the rest of the job")
            self._eager.add(id(network))
            return network(*args, **kwargs)
        return self._capture(network, key, args, kwargs, tensors)

    def _capture(self, network: nn.Module, key: tuple, args: tuple, kwargs: dict, tensors: list) -> torch.Tensor:
        from core.accel.memory import is_out_of_memory

        self.release()  # the previous graph's memory pool goes before this one takes its own
        static = [_static_copy(t) for t in tensors]  # outside the graph's pool: they outlive its replays
        static_args, static_kwargs = _with_tensors(args, kwargs, static)
        try:
            graph, output = self.api.capture(lambda: network(*static_args, **static_kwargs))
        except Exception as exc:  # noqa: BLE001 - any failure: this network runs eagerly
            del static, static_args, static_kwargs
            if is_out_of_memory(exc):
                # The graph's pool is memory the eager run does not hold at once, and the eager warm-up fitted:
                # run eagerly (for this job) rather than let the plan's retry offload a job that fits
                self._eager.add(id(network))
                self._note(f"CUDA graphs: out of memory capturing {type(network).__name__}; running it without "
                           "graphs for this job")
                self.api.free_memory()
                return network(*args, **kwargs)
            self.uncapturable.add(network)
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._note(f"CUDA graphs could not capture {type(network).__name__} ({first_line}); running it "
                       "without graphs")
            return network(*args, **kwargs)
        self.captures += 1
        self._captured.add(key)
        self._last = _Captured(key, graph, static, output)
        self.api.replay(graph)
        self.replays += 1
        return output.clone()

    def release(self) -> None:
        """Free the kept graph and its memory pool."""
        if self._last is not None:
            graph, self._last = self._last.graph, None
            self.api.release(graph)


_CURRENT: ContextVar[CudaGraphs | None] = ContextVar("darkroom_cuda_graphs", default=None)


class GraphedNetwork:
    """A network called through the job's graphs (the family adapters read its ``config``, as the network's)."""

    def __init__(self, network: nn.Module, graphs: CudaGraphs) -> None:
        self.network = network
        self.graphs = graphs
        self.config = getattr(network, "config", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graphs.call(self.network, args, kwargs)


def replayed(network: Any) -> Any:
    """``network`` called through the current job's CUDA graphs; itself when the job has none (or it is not a
    module: an adapter around a network wraps the network)."""
    graphs = _CURRENT.get()
    if graphs is None or not isinstance(network, nn.Module):
        return network
    return GraphedNetwork(network, graphs)


@contextmanager
def for_job(
    enabled: bool, api: GraphApi | None = None, uncapturable: weakref.WeakSet | None = None
) -> Iterator[CudaGraphs | None]:
    """The graphs of one job, current inside the block (None and nothing current when not ``enabled``);
    their memory is freed on leaving it. ``uncapturable``: see ``CudaGraphs``."""
    graphs = CudaGraphs(api, uncapturable) if enabled else None
    token = _CURRENT.set(graphs)
    try:
        yield graphs
    finally:
        _CURRENT.reset(token)
        if graphs is not None:
            graphs.release()
