"""Work limits: how large a spec one request may make this process render, record, tune or measure.

Every valid BlockSpec can be generated, but a daemon answering strangers must bound what one request
costs: dgrad renders a table per stride phase (quadratic in the stride), and a measurement holds the
inputs, the output and a float64 reference in memory. `check(spec)` refuses a spec past any limit
with LimitExceeded (a SpecError naming the limit) before anything is rendered, recorded or tuned;
`check_source` bounds a rendered source. The daemon, the client and the CLI share these limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod

from .spec import BlockSpec, SpecError

GiB = 1 << 30


class LimitExceeded(SpecError):
    """A well-formed spec (or source) larger than this process agrees to work on."""

    def __init__(self, message: str, limit: str, value: int, maximum: int) -> None:
        super().__init__(message)
        self.limit, self.value, self.maximum = limit, value, maximum


@dataclass(frozen=True)
class Limits:
    """Upper bounds per spec. The defaults cover every shape suite with a wide margin (ResNet-50 at
    batch 256 holds 205M elements per tensor; RepLKNet's 31x31 is 961 taps; patch embeddings stride 16)."""

    max_tensor_elements: int = 2**31  # input, weight or output
    max_taps: int = 4096  # kernel elements per filter (31x31 = 961, 15x15x15 = 3375)
    max_stride: int = 64  # per spatial dim
    max_phases: int = 4096  # product of strides: dgrad's phase tables
    max_dilation: int = 128
    max_measure_bytes: int = 8 * GiB  # inputs, output and their float64 reference during one measurement
    max_source_bytes: int = 1 << 20  # one rendered kernel

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


DEFAULT = Limits()


def tensor_elements(spec: BlockSpec) -> dict[str, int]:
    """Elements of the input, weight and output of spec (the same tensors in every pass)."""
    return {
        "input": spec.n * spec.c * prod(spec.in_size),
        "weight": spec.k * spec.cg * spec.taps,
        "output": spec.out_pixels * spec.k,
    }


def estimated_bytes(spec: BlockSpec) -> int:
    """Memory one measurement of spec holds: the tensors in spec.dtype (a residual and save_z count as one
    more output each; channel-slice views as their wider buffers), plus the float64 reference's inputs and
    output."""
    e = tensor_elements(spec)
    x = spec.n * prod(spec.in_size) * spec.x_pix
    y_pix = spec.out_pix if spec.op == "fwd" else spec.dy_pix  # the output's buffer, or dy's for a backward pass
    out = spec.out_pixels * (y_pix + (spec.res_pix if spec.epilogue.residual else 0))
    native = (x + e["weight"] + out + e["output"] * spec.epilogue.save_z) * spec.itemsize
    return native + 8 * (e["input"] + e["weight"] + e["output"])


def check(spec: BlockSpec, limits: Limits = DEFAULT) -> None:
    """Raise LimitExceeded naming the first limit spec exceeds; cheap (no rendering)."""
    for name, n in tensor_elements(spec).items():
        _within(f"{name} elements", "max_tensor_elements", n, limits.max_tensor_elements)
    if spec.is_view:  # a channel slice addresses its whole wider buffer
        _within("elements a pixel-strided view spans", "max_tensor_elements", spec.spanned_elements,
                limits.max_tensor_elements)  # fmt: skip
    _within("kernel taps", "max_taps", spec.taps, limits.max_taps)
    _within("stride", "max_stride", max(spec.stride), limits.max_stride)
    _within("stride phases (product of strides)", "max_phases", spec.phases, limits.max_phases)
    _within("dilation", "max_dilation", max(spec.dilation), limits.max_dilation)
    _within(
        "estimated measurement memory (bytes)", "max_measure_bytes", estimated_bytes(spec), limits.max_measure_bytes
    )


def check_source(source: str, limits: Limits = DEFAULT) -> None:
    _within("rendered source size (bytes)", "max_source_bytes", len(source.encode()), limits.max_source_bytes)


def _within(what: str, limit: str, value: int, maximum: int) -> None:
    if value > maximum:
        raise LimitExceeded(f"{what} {value:,} exceeds the limit of {maximum:,} ({limit})", limit, value, maximum)
