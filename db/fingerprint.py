"""DeviceFingerprint: which machine a timing was measured on. Its canonical JSON is the device key.

Lookups match the exact key, so a new driver, torch, Triton or generator version is a new device,
and interpreter timings (CPU boxes) can never answer a GPU client.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from .errors import InvalidRecord, field_mismatch

INTERPRETER_NAME = "triton-interpreter (CPU)"
_NVRM = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class DeviceFingerprint:
    """What determines how fast a generated kernel runs: hardware, software stack, generator."""

    name: str
    compute_capability: str | None  # "9.0"; None for the interpreter
    sm_count: int
    memory_bytes: int
    driver: str | None
    cuda: str | None
    triton: str
    torch: str
    generator_version: str
    interpreter: bool

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "interpreter":
                ok = isinstance(v, bool)
            elif f.name in ("sm_count", "memory_bytes"):
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
            elif f.name in ("compute_capability", "driver", "cuda"):
                ok = v is None or isinstance(v, str)
            else:
                ok = isinstance(v, str) and v != ""
            if not ok:
                raise InvalidRecord(f"device fingerprint field {f.name}={v!r} has the wrong type or is empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DeviceFingerprint:
        if not isinstance(d, dict):
            raise InvalidRecord(f"a device fingerprint must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise InvalidRecord(field_mismatch("device fingerprint", names, d))
        return cls(**d)

    @classmethod
    def from_key(cls, key: str) -> DeviceFingerprint:
        try:
            return cls.from_dict(json.loads(key))
        except json.JSONDecodeError as e:
            raise InvalidRecord(f"device key is not valid JSON: {e}") from None

    @cached_property
    def key(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal fingerprints give equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.interpreter:
            return f"{self.name} triton {self.triton} torch {self.torch} gen {self.generator_version}"
        return (
            f"{self.name} sm_{(self.compute_capability or '?').replace('.', '')} {self.sm_count} SMs "
            f"driver {self.driver} cuda {self.cuda} triton {self.triton} gen {self.generator_version}"
        )


def current(device: Any = None) -> DeviceFingerprint:
    """The fingerprint of the device kernels run on in this process.

    device: a CUDA index, "cuda:N" or torch.device; None means the current CUDA device. When this
    process interprets Triton (no CUDA, TRITON_INTERPRET=1, or device "cpu") it is the interpreter.
    Memoised per device: conv calls ask on every launch, and on a GPU it reads driver files.
    """
    import torch

    from tunerd.kernels.runtime import interpreting

    dev = torch.device(device) if isinstance(device, (str, int)) else device
    if (isinstance(dev, torch.device) and dev.type == "cpu") or interpreting() or not torch.cuda.is_available():
        return _fingerprint(None)
    return _fingerprint(torch.cuda.current_device() if dev is None or dev.index is None else dev.index)


@cache
def _fingerprint(cuda_index: int | None) -> DeviceFingerprint:
    """The interpreter's fingerprint (None) or that of one CUDA device."""
    import torch
    import triton

    from tunerd.kernels import GENERATOR_VERSION

    common = dict(triton=triton.__version__, torch=torch.__version__, generator_version=GENERATOR_VERSION)
    if cuda_index is None:
        return DeviceFingerprint(
            name=INTERPRETER_NAME,
            compute_capability=None,
            sm_count=0,
            memory_bytes=0,
            driver=None,
            cuda=None,
            interpreter=True,
            **common,
        )
    props = torch.cuda.get_device_properties(cuda_index)
    cuda = torch.version.cuda or (f"hip {torch.version.hip}" if getattr(torch.version, "hip", None) else None)
    return DeviceFingerprint(
        name=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=int(props.multi_processor_count),
        memory_bytes=int(props.total_memory),
        driver=driver_version(),
        cuda=cuda,
        interpreter=False,
        **common,
    )


def driver_version() -> str | None:
    """The NVIDIA kernel driver version ("550.54.15"), else the CUDA driver API version, else None."""
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", _NVRM.read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"cuda-api {v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None
