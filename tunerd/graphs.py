"""Opt-in CUDA graphs for launch-bound inference of patched modules (tunerd.patch(model, cuda_graphs=True)).

A small layer or a fused block plan at small batch spends more time launching (Python, driver) than computing.
enable(module) gives a patched conv or fused block a GraphCache; its forward then goes through run(): an eval,
no-grad call on a dense CUDA input replays a CUDA graph captured for the input's signature (shape, stride,
dtype, device). The first call of a signature warms the forward up once on a side stream (compiles, fills
caches), captures it reading a static input buffer, and replays it; every call copies its input into the static
buffer, replays, and returns a clone of the static output (a module called twice in one forward keeps its first
output). Graphs bake the addresses and values the forward read: the cache is dropped when any parameter or
buffer the module reads (a fused conv's BatchNorm's too) is updated in place or moved (.to(), `param.data = `),
and when the module's training mode or options change. At most max_graphs signatures are kept (least recently
used dropped). Anything else (training, grad enabled, CPU, torch.compile, an outer capture, a capture that
raised) runs the ordinary forward; a signature whose capture raised is not tried again and its reason is kept
for stats().
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]
Key = tuple[
    tuple[int, ...], tuple[int, ...], torch.dtype, torch.device, bool
]  # shape, stride, dtype, device, inference
MAX_GRAPHS = 4  # signatures per module unless enable() is told otherwise
MAX_FAILED = 64  # signatures whose capture raised, remembered per module (not tried again)
_ATTR = "_tunerd_cuda_graphs"
_OPTIONS = ("bn_mode", "activation")  # module attributes the captured forward depends on


class Backend(Protocol):
    """How graphs are captured and replayed (CudaBackend; tests inject fakes)."""

    def supports(self, x: torch.Tensor) -> bool: ...

    def capture(self, forward: Forward, static_in: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, static output) of forward(static_in), captured."""
        ...


class CudaBackend:
    """torch.cuda.CUDAGraph: one warm-up on a side stream, then capture on it."""

    def supports(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def capture(self, forward: Forward, static_in: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
        with torch.cuda.device(static_in.device):  # torch.cuda.graph captures on the current device
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward(static_in)  # warm-up: JIT compiles and lazy allocations happen outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(static_in)
        return graph.replay, out


@dataclass
class _Entry:
    replay: Callable[[], None]
    static_in: torch.Tensor
    static_out: torch.Tensor


@dataclass
class GraphCache:
    """One module's captured graphs and their counts."""

    max_graphs: int = MAX_GRAPHS
    backend: Backend = field(default_factory=CudaBackend)
    entries: OrderedDict[Key, _Entry] = field(default_factory=OrderedDict)
    failed: dict[Key, str] = field(default_factory=dict)  # signature -> why its capture raised
    state: tuple[Any, ...] | None = None  # what the graphs were captured against (_state)
    held: list[torch.Tensor] = field(default_factory=list)  # its tensors: their memory cannot be reused meanwhile
    counts: dict[str, int] = field(
        default_factory=lambda: {"captures": 0, "replays": 0, "ordinary": 0, "invalidations": 0, "evictions": 0}
    )
    last_ordinary: str | None = None  # why the last call took the ordinary path

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphCache:
        return GraphCache(self.max_graphs, self.backend)  # a copied module captures its own graphs

    def __getstate__(self) -> dict[str, Any]:  # pickled (torch.save of a module): the settings, no graphs
        return {"max_graphs": self.max_graphs, "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(GraphCache(state["max_graphs"], state["backend"]).__dict__)

    def clear(self) -> None:
        if self.entries or self.failed:
            self.counts["invalidations"] += 1
        self.entries.clear()
        self.failed.clear()
        self.state, self.held = None, []


def check_max_graphs(max_graphs: int) -> None:
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs (cuda_graphs=N) must be an int of at least 1, got {max_graphs!r}")


def enable(module: nn.Module, max_graphs: int = MAX_GRAPHS, backend: Backend | None = None) -> GraphCache:
    """Give module (a tunerd conv or fused block) a graph cache: its eval, no-grad CUDA calls replay graphs."""
    check_max_graphs(max_graphs)
    cache = GraphCache(max_graphs, backend or CudaBackend())
    module.__dict__[_ATTR] = cache
    return cache


def disable(module: nn.Module) -> None:
    """Drop module's graph cache (its forward is the ordinary one again)."""
    module.__dict__.pop(_ATTR, None)


def cache_of(module: nn.Module) -> GraphCache | None:
    return module.__dict__.get(_ATTR)


_local = threading.local()


@contextmanager
def ordinary() -> Iterator[None]:
    """Every module runs its ordinary forward inside the block (captures and nested modules use it)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _modules(module: nn.Module) -> list[nn.Module]:
    """The modules whose tensors and modes module's forward reads: its own, and a fused conv's BatchNorm (kept
    outside its submodules)."""
    mods = [*module.modules()]
    bn = module.__dict__.get("_tunerd_bn")
    return mods if bn is None else [*mods, *bn.modules()]


def _state(mods: list[nn.Module]) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """What captured graphs depend on (each tensor's address and version, every module's mode and options), and
    the tensors."""
    tensors = [t for m in mods for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    state = (
        tuple((t.data_ptr(), t._version) for t in tensors),
        tuple((m.training, *(getattr(m, a, None) for a in _OPTIONS)) for m in mods),
    )
    return state, tensors


def _why_ordinary(mods: list[nn.Module], cache: GraphCache, x: Any) -> str | None:
    if getattr(_local, "depth", 0):
        return "inside a capture"
    if type(x) is not torch.Tensor:
        return "input is not a plain tensor"
    if any(m.training for m in mods):
        return "training mode"
    if torch.is_grad_enabled():
        return "grad enabled"
    if not cache.backend.supports(x):
        return f"input on {x.device.type}: graphs are for CUDA inputs"
    if torch.compiler.is_compiling():
        return "torch.compile tracing"
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "an outer CUDA graph capture"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "input neither contiguous nor channels-last"
    return None


def run(module: nn.Module, x: torch.Tensor, forward: Forward) -> torch.Tensor:
    """forward(x) for module: through a captured graph when module has a cache and the call qualifies (module
    docstring), else forward(x) itself."""
    cache = module.__dict__.get(_ATTR)
    if cache is None:
        return forward(x)
    mods = _modules(module)
    why = _why_ordinary(mods, cache, x)
    if why is None:
        return _replayed(mods, cache, x, forward)
    if why == "training mode":
        cache.clear()  # training updates what the graphs read; eval recaptures
    return _ordinary(cache, why, forward, x)


def _ordinary(cache: GraphCache, why: str, forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """forward(x) as it is, counted, with why it did not replay a graph."""
    cache.counts["ordinary"] += 1
    cache.last_ordinary = why
    return forward(x)


def _replayed(mods: list[nn.Module], cache: GraphCache, x: torch.Tensor, forward: Forward) -> torch.Tensor:
    try:
        state, tensors = _state(mods)
    except RuntimeError as e:  # an inference tensor has no version counter: nothing tells when it changes
        return _ordinary(cache, f"cannot track its tensors ({e})", forward, x)
    if state != cache.state:
        cache.clear()
        cache.state, cache.held = state, [t.detach() for t in tensors]
    # inference_mode's static buffers are inference tensors, which a plain no_grad call may not write
    key: Key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, torch.is_inference_mode_enabled())
    entry = cache.entries.get(key)
    if entry is None:
        if key in cache.failed:
            return _ordinary(cache, cache.failed[key], forward, x)
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        try:
            with ordinary():
                replay, static_out = cache.backend.capture(forward, static_in)
            if not isinstance(static_out, torch.Tensor):
                raise TypeError(f"the forward returned {type(static_out).__name__}, not a tensor")
        except Exception as e:  # never fail the call: remember why and run it as before
            if len(cache.failed) >= MAX_FAILED:  # bounded, oldest first, like the graphs
                del cache.failed[next(iter(cache.failed))]
            cache.failed[key] = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
            return _ordinary(cache, cache.failed[key], forward, x)
        entry = cache.entries[key] = _Entry(replay, static_in, static_out)
        cache.counts["captures"] += 1
        while len(cache.entries) > cache.max_graphs:
            cache.entries.popitem(last=False)
            cache.counts["evictions"] += 1
    else:
        cache.entries.move_to_end(key)
        entry.static_in.copy_(x)
    entry.replay()
    cache.counts["replays"] += 1
    return entry.static_out.clone()


def stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module of model with graphs enabled: its counts, graphs held, failed signatures with their reasons,
    and why its last ordinary call was ordinary."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        cache = m.__dict__.get(_ATTR)
        if cache is not None:
            out[name] = {
                **cache.counts,
                "graphs": len(cache.entries),
                "failed": dict(cache.failed),
                "last_ordinary": cache.last_ordinary,
            }
    return out
