"""DeviceLimits: the resources and rates of the device a schedule space is built and costed for.

Three sources, in `detect()` order:
- the current CUDA device (torch's properties for resources; rates from a small table of known
  parts, else scaled from the H100 by SM count),
- `DeviceLimits.h100()`: documented H100 SXM5 numbers (NVIDIA H100 datasheet, dense math),
- `DeviceLimits.interpreter()`: the Triton interpreter on CPU. It keeps the H100's resource
  limits, so the schedules emitted on a CPU box are still legal and sane for a GPU, and carries
  interpreter cost constants (seconds per program and per reduction step, fitted roughly on a
  2-core x86 box) instead of GPU rates. Its timings are a weak proxy for GPU timings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

INTERPRETER_NAME = "triton-interpreter (CPU)"


@dataclass(frozen=True)
class DeviceLimits:
    """Per-block/per-SM resources and peak rates. Rates are per second, dense (no sparsity)."""

    name: str
    sm_count: int
    smem_per_block: int  # bytes a block may opt in to
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    l2_bytes: int = 50 * 2**20
    dram_bw: float = 3.35e12
    l2_bw: float = 1.0e13
    fp16_flops: float = 989e12  # fp16/bf16 tensor cores
    tf32_flops: float = 494e12
    fp32_flops: float = 67e12  # CUDA-core FMA (fp32 tl.dot with precision 'ieee', direct kernels)
    launch_s: float = 4e-6
    wave_s: float = 1.5e-6  # fixed prologue/epilogue latency of one wave of programs
    capability: tuple[int, int] = (9, 0)
    interpreted: bool = False
    # interpreter cost constants (used only when interpreted)
    program_s: float = 2e-3
    step_s: float = 2.5e-3
    element_s: float = 1.4e-7

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def h100(cls) -> DeviceLimits:
        """NVIDIA H100 SXM5 80GB: 132 SMs, 227 KiB opt-in shared memory per block, 3.35 TB/s HBM3."""
        return cls(name="NVIDIA H100 80GB HBM3", sm_count=132, smem_per_block=232448, smem_per_sm=233472)

    @classmethod
    def interpreter(cls) -> DeviceLimits:
        """The Triton interpreter on CPU: H100 resource limits, interpreter cost constants."""
        return replace(cls.h100(), name=INTERPRETER_NAME, interpreted=True)

    @classmethod
    def from_cuda(cls, device: int | str | torch.device | None = None) -> DeviceLimits:
        """Resources of a CUDA device from torch; rates from a known-part table or scaled from H100."""
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: use DeviceLimits.interpreter() or DeviceLimits.h100()")
        idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        base = cls.h100()
        rates = _known_rates(p.name)
        if rates is None:  # unknown part: scale the H100's rates by SM count
            f = p.multi_processor_count / base.sm_count
            rates = dict(
                dram_bw=base.dram_bw * f,
                l2_bw=base.l2_bw * f,
                fp16_flops=base.fp16_flops * f,
                tf32_flops=base.tf32_flops * f,
                fp32_flops=base.fp32_flops * f,
            )
        smem_block = int(getattr(p, "shared_memory_per_block_optin", 0) or base.smem_per_block)
        smem_sm = int(getattr(p, "shared_memory_per_multiprocessor", 0) or max(smem_block, base.smem_per_sm))
        return replace(
            base,
            name=p.name,
            sm_count=p.multi_processor_count,
            smem_per_block=smem_block,
            smem_per_sm=smem_sm,
            regs_per_sm=int(getattr(p, "regs_per_multiprocessor", 0) or 65536),
            max_threads_per_sm=int(getattr(p, "max_threads_per_multi_processor", 0) or 2048),
            l2_bytes=int(getattr(p, "L2_cache_size", 0) or base.l2_bytes),
            capability=(p.major, p.minor),
            dram_bw=rates["dram_bw"],
            l2_bw=rates["l2_bw"],
            fp16_flops=rates["fp16_flops"],
            tf32_flops=rates["tf32_flops"],
            fp32_flops=rates["fp32_flops"],
        )

    @classmethod
    def detect(cls) -> DeviceLimits:
        """The device kernels run on here: the current CUDA GPU, or the interpreter profile on CPU."""
        from tunerd.kernels import runtime  # kernels first: it picks the interpreter before triton loads

        if torch.cuda.is_available() and not runtime.interpreting():
            return cls.from_cuda()
        return cls.interpreter()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# name fragment -> dense peak rates (datasheet numbers; dram_bw in B/s, flops in FLOP/s)
_RATES: list[tuple[str, dict[str, float]]] = [
    ("H200", dict(dram_bw=4.8e12, l2_bw=1.0e13, fp16_flops=989e12, tf32_flops=494e12, fp32_flops=67e12)),
    ("H100 PCIe", dict(dram_bw=2.0e12, l2_bw=7.5e12, fp16_flops=756e12, tf32_flops=378e12, fp32_flops=51e12)),
    ("H100", dict(dram_bw=3.35e12, l2_bw=1.0e13, fp16_flops=989e12, tf32_flops=494e12, fp32_flops=67e12)),
    ("A100", dict(dram_bw=2.0e12, l2_bw=5.0e12, fp16_flops=312e12, tf32_flops=156e12, fp32_flops=19.5e12)),
    ("L4", dict(dram_bw=3.0e11, l2_bw=1.5e12, fp16_flops=121e12, tf32_flops=60e12, fp32_flops=30e12)),
]


def _known_rates(name: str) -> dict[str, float] | None:
    for fragment, rates in _RATES:
        if fragment in name:
            return rates
    return None
