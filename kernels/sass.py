"""SASS reading: the instruction mix of a compiled kernel's main loop, from its cubin (no GPU needed).

`cuobjdump -sass` (shipped with Triton) lists one instruction per line with its address. A loop is a
backward branch; the *main loop* is the innermost loop (no loop inside it) with the most math
instructions (tensor-core MMAs, then fused multiply-adds), which is the k-step of an implicit GEMM
and the kernel-row or tap loop of a direct depthwise conv. Its body size is the issue cost of one
iteration; the FMA and MMA shares say how much of that issue is arithmetic. Runtime integer
divisions show up as I2F.U32.RP (the reciprocal-based sequence); divisions by constants as
IMAD.HI.U32 (multiply-high by a magic number). TMA loads are UTMALDG.

A reduction with a small constant trip count may be unrolled whole (Triton 3.6 does so with a 3x3 64-channel
dgrad's nine steps): no loop is left. Given the variant's step count, mix() then measures one step as the
distance between the first math instruction of consecutive steps (loop_unrolled: True).
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")
MMA = ("HGMMA", "HMMA", "IMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")
FMA = ("FFMA", "HFMA2", "DFMA")
BRANCHES = ("BRA", "BRX", "JMP")


@dataclass(frozen=True)
class Instruction:
    addr: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x64x16.F32.BF16" keeps its base "HGMMA"
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


def parse(sass: str) -> list[Instruction]:
    """The instructions of the first kernel in `cuobjdump -sass` output, in address order."""
    out: list[Instruction] = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
    return out


def disassemble(cubin: bytes, tool: Path | None = None) -> list[Instruction]:
    """Run cuobjdump -sass on a cubin; [] when the tool is missing."""
    if tool is None:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, timeout=120)
    return parse(res.stdout) if res.returncode == 0 else []


def loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's loop (self-branches excluded)."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    found: list[tuple[int, int]] = []
    for i, ins in enumerate(code):
        if ins.base in BRANCHES:
            m = _TARGET.search(ins.operands)
            if m is not None:
                start = index.get(int(m.group(1), 16))
                if start is not None and start < i:
                    found.append((start, i))
    return found


def _count(body: list[Instruction], kinds: tuple[str, ...]) -> int:
    return sum(ins.base in kinds for ins in body)


def main_loop(code: list[Instruction]) -> tuple[int, int] | None:
    """The innermost loop with the most MMAs, then FMAs (see the module doc); None without loops."""
    spans = loops(code)
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]

    def work(s: tuple[int, int]) -> tuple[int, int, int]:
        body = code[s[0] : s[1] + 1]
        return _count(body, MMA), _count(body, FMA), len(body)

    return max(inner, key=work, default=None)


def unrolled(code: list[Instruction], steps: int) -> tuple[int, int] | None:
    """(first, end) indices spanning steps - 1 whole steps of a fully unrolled reduction: from the first
    math instruction (MMA, else FMA) of the first step to that of the last, when the math splits evenly
    into `steps` groups; None otherwise."""
    kinds = MMA if _count(code, MMA) else FMA
    idx = [i for i, ins in enumerate(code) if ins.base in kinds]
    if steps < 2 or not idx or len(idx) % steps:
        return None
    return idx[0], idx[len(idx) - len(idx) // steps]


def mix(code: list[Instruction], steps: int | None = None) -> dict[str, Any]:
    """Main-loop figures of a kernel: loop_sass (instructions per iteration), loop_mma, loop_fma and
    their shares, loop_idiv (runtime integer divisions), loop_mulhi (divisions by constants), and over
    the whole kernel sass (instruction count) and tma (TMA loads). Without a loop and with the reduction's
    step count, the same figures per step of the unrolled reduction (see unrolled)."""
    out: dict[str, Any] = {"sass": len(code), "tma": _count(code, ("UTMALDG",))}
    span, per = main_loop(code), 1
    if span is None and steps is not None:
        whole = unrolled(code, steps)
        if whole is not None:
            span, per = (whole[0], whole[1] - 1), steps - 1
            out["loop_unrolled"] = True
    if span is None:
        return out | {"loop_sass": None}
    body = code[span[0] : span[1] + 1]
    n = len(body)
    mma, fma = _count(body, MMA), _count(body, FMA)
    return out | {
        "loop_sass": round(n / per),
        "loop_mma": round(mma / per),
        "loop_fma": round(fma / per),
        "loop_mma_share": round(mma / n, 3),
        "loop_fma_share": round(fma / n, 3),
        "loop_idiv": math.ceil(sum(ins.opcode.startswith("I2F.U32.RP") for ins in body) / per),
        "loop_mulhi": math.ceil(sum(ins.opcode.startswith("IMAD.HI") for ins in body) / per),
    }
