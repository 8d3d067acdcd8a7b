"""Timing: one loop for every contender, and the device's peak rates measured with it.

`compare` warms each contender up, then times them in alternating rounds (the order rotates every
round) so that clock and thermal drift hit all alike. Each timed call gets a fresh input set
(several buffers cycled) and, on CUDA, an L2 flush before it; CUDA events time the device work.
On CPU (Triton's interpreter) a wall clock times each call and nothing is flushed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tunerd.schedules.sandbox import L2_FLUSH_BYTES

Contender = Callable[[int], Any]  # called with the index of the input set to use


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 3  # untimed calls per contender before the timed rounds
    reps: int = 10  # timed calls per contender per round
    rounds: int = 5  # alternation rounds
    flush_bytes: int = L2_FLUSH_BYTES  # written before every timed call (CUDA only), as the tuner's harness does

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_args(p: argparse.ArgumentParser) -> None:
    """The timing and torch.compile flags every benchmark command shares."""
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile contender (auto: on with CUDA, off on the interpreter)",
    )
    p.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode (benchmarks/README.md: why not plain max-autotune)",
    )
    p.add_argument("--reps", type=int, help="timed calls per contender per round")
    p.add_argument("--rounds", type=int, help="alternation rounds")
    p.add_argument("--warmup", type=int, help="untimed calls per contender")
    p.add_argument("--inputs", type=int, help="rotated input sets per case")


def config_from_args(a: argparse.Namespace, cuda: bool, warmup: int, reps: int, rounds: int) -> TimingConfig:
    """add_args' timing flags over a command's defaults (the L2 flush on CUDA only)."""
    return TimingConfig(
        warmup=a.warmup if a.warmup is not None else warmup,
        reps=a.reps or reps,
        rounds=a.rounds or rounds,
        flush_bytes=TimingConfig.flush_bytes if cuda else 0,
    )


def csv(s: str | None) -> list[str] | None:
    """A comma list flag's values (None when not given)."""
    return [v.strip() for v in s.split(",") if v.strip()] if s else None


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    samples: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        s = sorted(samples_ms)
        q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
        return cls(median_ms=statistics.median(s), p20_ms=q[0], p80_ms=q[3], min_ms=s[0], samples=len(s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """A contender that could not be timed: it raised (or, for tunerd_tuned, tuning found nothing)."""

    stage: str  # "setup", "tune", "warmup" or "timing"
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"status": "error", "stage": self.stage, "error": self.error}


def describe_error(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


_flush_buffers: dict[tuple[str, int], torch.Tensor] = {}


def flush_l2(device: torch.device, nbytes: int) -> None:
    """Overwrite a buffer larger than the L2 cache (CUDA); a no-op on CPU or with nbytes == 0."""
    if device.type != "cuda" or nbytes <= 0:
        return
    key = (str(device), nbytes)
    buf = _flush_buffers.get(key)
    if buf is None:
        buf = _flush_buffers[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    buf.zero_()


def _sample(fn: Contender, start: int, n_inputs: int, reps: int, device: torch.device, flush_bytes: int) -> list[float]:
    """reps timed calls of fn, cycling through the input sets from `start`; milliseconds each."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (begin, end) in enumerate(events):
            flush_l2(device, flush_bytes)
            begin.record()
            fn((start + i) % n_inputs)
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) for begin, end in events]
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn((start + i) % n_inputs)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    contenders: dict[str, Contender], n_inputs: int, device: torch.device, cfg: TimingConfig
) -> dict[str, Timing | Failure]:
    """Time every contender side by side; a contender that raises is reported, never fatal."""
    results: dict[str, Timing | Failure] = {}
    live: dict[str, Contender] = {}
    for name, fn in contenders.items():
        try:
            for i in range(cfg.warmup):
                fn(i % n_inputs)
            synchronize(device)
            live[name] = fn
        except Exception as e:  # a contender's failure (e.g. torch.compile raising) is data, not a crash
            results[name] = Failure("warmup", describe_error(e))
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(cfg.rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            if name in results:
                continue
            try:
                samples[name] += _sample(live[name], r * cfg.reps, n_inputs, cfg.reps, device, cfg.flush_bytes)
            except Exception as e:
                results[name] = Failure("timing", describe_error(e))
    for name in names:
        if name not in results:
            results[name] = Timing.of(samples[name])
    return {name: results[name] for name in contenders}


# ---- the device's peak rates (the roofline's two ceilings) --------------------------------------
def copy_bandwidth_gbps(device: torch.device, cfg: TimingConfig, nbytes: int) -> float:
    """Device-to-device copy rate in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = compare({"copy": lambda i: dst.copy_(src)}, 1, device, cfg)["copy"]
    if isinstance(t, Failure):
        raise RuntimeError(f"copy bandwidth measurement failed: {t.error}")
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, cfg: TimingConfig, size: int) -> float:
    """Dense size x size x size matmul rate in TFLOP/s (fp32 without TF32, as the 'ieee' kernels run)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = compare({"mm": lambda i: torch.mm(a, b)}, 1, device, cfg)["mm"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if isinstance(t, Failure):
        raise RuntimeError(f"matmul measurement failed: {t.error}")
    return 2 * size**3 / (t.median_ms * 1e-3) / 1e12


def device_peaks(
    device: torch.device, dtypes: list[torch.dtype], cfg: TimingConfig, *, copy_bytes: int, matmul_size: int
) -> dict[str, Any]:
    """Copy bandwidth and matmul rate (bf16 always, plus each benchmarked dtype) of this device."""
    rates = {}
    for dt in dict.fromkeys([torch.bfloat16, *dtypes]):
        rates[str(dt).removeprefix("torch.")] = matmul_tflops(device, dt, cfg, matmul_size)
    return {
        "copy_gbps": copy_bandwidth_gbps(device, cfg, copy_bytes),
        "matmul_tflops": rates,
        "copy_bytes": copy_bytes,
        "matmul_size": matmul_size,
    }
