"""Capture safety: find what a CUDA graph capture (torch.cuda.graph, torch.compile's "reduce-overhead") cannot hold.

A captured region must not read device values on the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`), make
outputs whose shape depends on values (`nonzero`, boolean-mask indexing, `unique`), or copy between host and
device (D2H reads, and H2D copies of host data, which synchronize). `no_host_sync()` runs a block under a guard
that raises HostSyncError at the first such operation with what it was, so tests can run patched models on the
interpreter (CPU) and prove the CUDA launch path clean: the guard sees torch ops by value and device, and Python
calls that move data to the host whatever the device (`.cpu()`, `.numpy()`, `.tolist()`).

`allow_host_sync(reason)` exempts one narrow, explicit region (a check that runs on CPU tensors only, by
construction); the guard counts what each reason exempted.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

aten = torch.ops.aten

# ops that read a value on the host, or whose output shape depends on values (a sync to size it)
_VALUE_OPS = {
    aten._local_scalar_dense.default: "reads a tensor value on the host (.item(), int(), float(), bool())",
    aten.item.default: "reads a tensor value on the host (.item())",
    aten.is_nonzero.default: "reads a tensor value on the host (bool(tensor))",
    aten.equal.default: "torch.equal reads its answer on the host",
    aten.nonzero.default: "nonzero: output shape depends on values",
    aten.masked_select.default: "masked_select: output shape depends on values",
    aten._unique2.default: "unique: output shape depends on values",
    aten.unique_dim.default: "unique: output shape depends on values",
    aten.unique_consecutive.default: "unique_consecutive: output shape depends on values",
    aten.bincount.default: "bincount: output shape depends on values",
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Python calls that move data to the host: a D2H copy and sync on the CUDA path even where the tensor is on CPU
_HOST_METHODS = {
    torch.Tensor.cpu: ".cpu()",
    torch.Tensor.numpy: ".numpy()",
    torch.Tensor.tolist: ".tolist()",
    torch.Tensor.__array__: "numpy conversion",
}
_FROM_HOST = (torch.tensor, torch.as_tensor)

_allowed = threading.local()


class HostSyncError(RuntimeError):
    """An operation inside no_host_sync() that a CUDA graph capture cannot hold."""


@contextlib.contextmanager
def allow_host_sync(reason: str) -> Iterator[None]:
    """Exempt the block from no_host_sync() guards; reason names why it never runs on the CUDA path."""
    stack: list[str] = _allowed.__dict__.setdefault("reasons", [])
    stack.append(reason)
    try:
        yield
    finally:
        stack.pop()


def _exempted() -> str | None:
    stack = _allowed.__dict__.get("reasons")
    return stack[-1] if stack else None


def _devices(t: Any) -> set[str]:
    return {t.device.type} if isinstance(t, torch.Tensor) else set()


def _op_finding(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why the aten op func(*args, **kwargs) cannot be captured, or None."""
    if func in _VALUE_OPS:
        return _VALUE_OPS[func]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size: output shape depends on values"
    if func in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return "boolean-mask indexing: output shape depends on values (nonzero)"
    if func is aten._to_copy.default:
        src, dst = args[0].device, kwargs.get("device") or args[0].device
        if (src.type == "cpu") != (torch.device(dst).type == "cpu"):
            return f"copies between host and device ({src} -> {dst}): a synchronizing transfer"
    if func in (aten.copy_.default, aten.copy.default):
        if len(_devices(args[0]) | _devices(args[1])) > 1 and "cpu" in _devices(args[0]) | _devices(args[1]):
            return f"copies between host and device ({args[1].device} -> {args[0].device}): a synchronizing transfer"
    return None


def _call_finding(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why the Python call func(*args, **kwargs) moves data to or from the host, or None."""
    if func in _HOST_METHODS:
        return f"{_HOST_METHODS[func]} copies to the host"
    if func in _FROM_HOST and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
        return "a tensor made from host data on a device: a synchronizing H2D copy (make it once, outside)"
    return None


class HostSyncGuard(TorchDispatchMode):
    """The dispatch half of no_host_sync(): raises (or records, record=True) on every op that cannot be captured.
    Custom ops (tunerd::*) run their implementation with the guard still active, so their inside is checked too."""

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.record = record
        self.found: list[str] = []
        self.exempted: Counter[str] = Counter()

    def note(self, finding: str | None) -> None:
        if finding is None:
            return
        reason = _exempted()
        if reason is not None:
            self.exempted[reason] += 1
        elif self.record:
            self.found.append(finding)
        else:
            raise HostSyncError(f"not capturable in a CUDA graph: {finding}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.note(_op_finding(func, args, kwargs))
        if func.namespace not in ("aten", "prims", "prim") and torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeExplicitAutograd"
        ):
            with self:  # re-entered around the op's own kernel: the ops it runs come back here
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        return func(*args, **kwargs)


class _HostCallGuard(TorchFunctionMode):
    """The Python-call half of no_host_sync(): host moves that the dispatcher does not see on CPU tensors."""

    def __init__(self, guard: HostSyncGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.guard.note(_call_finding(func, args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(record: bool = False) -> Iterator[HostSyncGuard]:
    """Run the block under a guard that raises HostSyncError at the first operation a CUDA graph capture cannot
    hold (record=True: collect them in guard.found instead). Forward and backward alike (autograd runs the
    backward of a CPU graph in the calling thread; CUDA backward threads inherit the modes)."""
    guard = HostSyncGuard(record)
    with _HostCallGuard(guard), guard:
        yield guard


def only_guards_active() -> bool:
    """Whether every active Python dispatch and torch-function mode is a no_host_sync() guard: modes that only
    observe, so code that takes a faster path without modes (kernels.autograd's eager call) may still take it."""
    from torch.overrides import _get_current_function_mode_stack

    modes = [*_get_current_dispatch_mode_stack(), *_get_current_function_mode_stack()]
    return all(isinstance(m, (HostSyncGuard, _HostCallGuard)) for m in modes)
