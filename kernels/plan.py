"""Plan: a partition of a Block into kernels, the legal plans of a block, and their modelled cost.

A Step is one launch and names its kind:
  conv       one conv node and the epilogue chain it absorbs (existing single-conv kernels):
             [bn] [add 'pre'] [act] [scale] [add 'post'], in Epilogue's order
  op         one non-conv node run as torch ops (LayerNorm, SE, standalone BN/act/scale/add, split, concat)
  separable  depthwise k x k [bn] [act] -> pointwise GEMM + its epilogue chain: the depthwise tile is the
             GEMM's A operand, never written to memory
  mlp        LayerNorm over channels -> pw expand [act] -> pw project + epilogue chain, the expanded hidden
             kept on chip chunk by chunk (back-to-back GEMM)
  convnext   depthwise k x k -> the mlp step, in one launch
  inception  multi-branch depthwise over channel splits of one input (InceptionNeXt's token mixer): splits
             of one tensor, each either kept (identity) or through a stride-1 same-size depthwise conv
             [bn] [act], concatenated; one launch reads each slice once and writes each branch's channels
             of the concat in place (no split copies, no concat copy)
  expand_dw  [pointwise expand [bn] [act], recomputed on chip for every depthwise tap] -> depthwise k x k
             [bn] [act]; when its output feeds an se / eca gate it also writes per-image partial sums of that
             output (the gate's global pool), so the gate never re-reads it. Without an expand it is legal only
             for that pool
  mbconv     pointwise expand [bn] [act] -> depthwise [bn] [act] -> pointwise project + its epilogue chain in
             one launch (MBConv without attention): neither the expanded nor the depthwise tensor touches HBM
  se_pw      an se / eca gate -> pointwise GEMM + its epilogue chain: the gate's small map (SE MLP or ECA
             conv1d, torch ops on [N, C]) from the pooled sums, then the GEMM with the gate applied to its A
             operand as it is loaded (two launches; the pool is a torch mean unless an expand_dw or pw_pool
             step took it)
  pw_pool    pointwise GEMM + its epilogue chain whose output feeds an se / eca gate: it also writes per-image
             partial sums of that output (the gate's global pool), as expand_dw does (ECA-ResNet's conv3 + bn3)
  gate_ep    an se / eca gate -> the elementwise epilogue chain after it ([bn] [add] [act] [scale] [add]): the
             gate's small map once per image (torch ops on [N, C], from a pw_pool / expand_dw step's sums or a
             torch mean), then one launch y * gate + shortcut -> act (ECA-ResNet's attention, residual, act3)
  pool_pw    average pool -> pointwise GEMM + its epilogue chain (ResNet-D's shortcut AvgPool2d(2, 2, ceil_mode) ->
             1x1 -> BN; timm's AvgPool2d anti-aliasing before conv3): the GEMM's A operand is the pool, each output
             pixel's window (<= MAX_POOL_TAPS input pixels, edge windows clipped, torch's divisor) summed as it is
             loaded, so the pooled tensor never touches HBM. Per block, against op[avgpool] | conv[1x1 ...] (the pool
             a pass of its own, as an unfused or a standalone pooling kernel would be): the pooled tensor's write
             and read, 2 * N * P * Q * C elements (half the input's bytes at stride 2), and one launch fewer. When
             its output feeds an se / eca gate it also writes the gate's partial sums, as pw_pool does
  aspp       parallel convs of one input (1x1 and dilated k x k, each [bn] [act], stride 1, same size) and
             broadcasts of 1 x 1 maps (ASPP's image pooling), concatenated: one launch, one program per
             (pixel tile, branch channel tile), the channel tiles of a pixel tile adjacent so they share the
             input's reads through L2; each branch writes its slice of the concat in place
  dw_gate    gnConv's gated depthwise: [split] -> stride-1 same-size depthwise k x k [scalar] -> [splits] -> mul
             of a channel range of that value with (a slice of) an outside tensor; one launch writes the product
             and, when later steps read the depthwise value, the channels they read (the step's second output)
  pw_gate    pointwise GEMM -> [split] -> mul of its output with (a slice of) an outside tensor, the gate in the
             GEMM's epilogue (gnConv's pws[i](y) * d[i+1])
  dw_ln      depthwise k x k [+bias] -> LayerNorm over channels, the norm in the depthwise epilogue: one program
             holds every channel of its pixels (padded C <= MAX_ROW), so wide ConvNeXt blocks skip a round trip
A fused step is legal when its nodes form a chain (each feeds only the next; a residual add's other
operand already exists) and its tiles fit on chip (mlp/convnext: padded C and K <= MAX_ONCHIP).
A split is a view (eager torch.split): no bytes moved and no launch of its own in the cost model.
plans() enumerates every legal plan; rank() orders them by the cost model (bytes moved through
HBM and instruction issue on tensor/CUDA cores, plus a launch overhead per step).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .block import GATES, INPUT, Block, Node
from .spec import Epilogue, SpecError, canonical_json

FUSED = (
    "separable",
    "mlp",
    "convnext",
    "inception",
    "expand_dw",
    "mbconv",
    "se_pw",
    "aspp",
    "dw_gate",
    "pw_gate",
    "dw_ln",
    "pw_pool",
    "gate_ep",
    "pool_pw",
)
STEP_KINDS = ("conv", "op", *FUSED)
LAUNCHES = {"se_pw": 2, "gate_ep": 2}  # launches of a step kind (default 1): the gate's map before the kernel
POOLING = ("expand_dw", "pw_pool", "pool_pw")  # steps that write their output's per-image partial sums when a gate
# reads it
GATED = ("se_pw", "gate_ep")  # steps that apply a gate: its map runs on the pooled sums a POOLING step wrote
MAX_ONCHIP = 256  # padded channels of a row (and of the project GEMM's output) an mlp tile keeps on chip
MAX_ROW = 2048  # padded channels of a row a dw_ln program keeps in registers
MAX_POOL_TAPS = 16  # window elements a pool_pw step sums per output pixel (unrolled loads of its A operand)


def next_pow2(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


@dataclass(frozen=True)
class Step:
    kind: str
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": list(self.nodes)}


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    @property
    def launches(self) -> int:
        return len(self.steps)

    @property
    def fused(self) -> bool:
        return any(s.kind in FUSED for s in self.steps)

    def describe(self) -> str:
        """e.g. 'convnext[dw+ln+pw1+act+pw2+gamma+res]' or 'conv[dw] | op[ln] | conv[pw1+act] | ...'."""
        return " | ".join(f"{s.kind}[{'+'.join(s.nodes)}]" for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, block: Block, d: Any) -> Plan:
        """A plan as JSON, checked against block: every step must match its kind (see check)."""
        if not isinstance(d, dict) or set(d) != {"steps"} or not isinstance(d["steps"], list):
            raise SpecError("a plan must be a JSON object {'steps': [{'kind': ..., 'nodes': [...]}, ...]}")
        steps = []
        for s in d["steps"]:
            if not isinstance(s, dict) or set(s) != {"kind", "nodes"} or not isinstance(s["nodes"], list):
                raise SpecError(f"a plan step must be {{'kind': ..., 'nodes': [...]}}, got {s!r}")
            steps.append(Step(kind=s["kind"], nodes=tuple(s["nodes"])))
        plan = cls(steps=tuple(steps))
        check(block, plan)
        return plan


# ---- matching one step --------------------------------------------------------------------
def _chain_ok(block: Block, names: list[str]) -> bool:
    """names[i+1] reads names[i] (first input); every name but the last feeds only the next."""
    for a, b in itertools.pairwise(names):
        nb = block.node(b)
        if nb.inputs[0] != a and not (nb.op == "add" and nb.inputs[1] == a):
            return False
        if block.consumers(a) != [b]:
            return False
        if nb.op == "add" and nb.inputs[0] == nb.inputs[1]:
            return False
    return True


def _other(nd: Node, prev: str) -> str:
    """The operand of an add that is not the chain's running value."""
    return nd.inputs[1] if nd.inputs[0] == prev else nd.inputs[0]


def tail_epilogue(block: Block, names: list[str], bias: bool) -> Epilogue | None:
    """The Epilogue a chain of nodes after a conv/GEMM forms ([bn] [add pre] [act] [scale] [add post]),
    or None when they do not fit that order."""
    order = ["bn", "add_pre", "act", "scale", "add_post"]
    pos = 0
    ep: dict[str, Any] = {"bias": bias}
    for name in names:
        nd = block.node(name)
        key = nd.op if nd.op != "add" else ("add_pre" if pos <= order.index("add_pre") else "add_post")
        if key not in order[pos:]:
            return None
        pos = order.index(key) + 1
        if nd.op == "bn":
            ep["affine"] = True
        elif nd.op == "act":
            ep["activation"] = nd["fn"]
        elif nd.op == "scale":
            ep["layer_scale"] = True
        elif nd.op == "add":
            ep["residual"] = "pre" if key == "add_pre" else "post"
        else:
            return None
    return Epilogue(**ep)


def _is_depthwise(block: Block, nd: Node) -> bool:
    if nd.op != "conv":
        return False
    spec = block.conv_spec(nd)
    return spec.kind == "depthwise" and spec.k == spec.c


def _is_pointwise(block: Block, nd: Node) -> bool:
    if nd.op != "conv":
        return False
    spec = block.conv_spec(nd)
    return spec.taps == 1 and spec.groups == 1 and not spec.has_padding and all(v == 1 for v in spec.stride)


def _mlp_fits(block: Block, ln: Node, pw2: Node) -> bool:
    return next_pow2(block.shapes[ln.name].c) <= MAX_ONCHIP and next_pow2(block.shapes[pw2.name].c) <= MAX_ONCHIP


def matches(block: Block, step: Step) -> bool:
    """Whether step's nodes are a legal instance of its kind."""
    names = list(step.nodes)
    if not names or any(n not in block.shapes or n == INPUT for n in names):
        return False
    if step.kind == "inception":
        return inception_branches(block, names) is not None
    if step.kind == "aspp":
        return aspp_branches(block, names) is not None
    if step.kind in ("dw_gate", "pw_gate"):
        return gate_parts(block, names, step.kind) is not None
    if not _chain_ok(block, names):
        return False
    if step.kind in ("expand_dw", "mbconv"):
        return mbconv_parts(block, names, step.kind) is not None
    if step.kind == "se_pw":
        if len(names) < 2 or block.node(names[0]).op not in GATES or not _is_pointwise(block, block.node(names[1])):
            return False
        return tail_epilogue(block, names[2:], block.node(names[1])["bias"]) is not None
    if step.kind == "gate_ep":
        return block.node(names[0]).op in GATES and tail_epilogue(block, names[1:], False) is not None
    if step.kind == "pw_pool":  # the pool exists for the gate: the step's output must feed one
        first = block.node(names[0])
        return (
            feeds_gate(block, names[-1])
            and _is_pointwise(block, first)
            and tail_epilogue(block, names[1:], first["bias"]) is not None
        )
    if step.kind == "pool_pw":
        return pool_pw_parts(block, names) is not None
    nds = [block.node(n) for n in names]
    first = nds[0]
    if step.kind == "op":
        return len(nds) == 1 and first.op != "conv"
    if step.kind == "dw_ln":
        return (
            len(nds) == 2
            and _is_depthwise(block, first)
            and nds[1].op == "ln"
            and next_pow2(block.shapes[first.name].c) <= MAX_ROW
        )
    if step.kind == "conv":
        return first.op == "conv" and tail_epilogue(block, names[1:], first["bias"]) is not None
    if step.kind == "separable":
        if not _is_depthwise(block, first):
            return False
        i = 1
        while i < len(nds) and nds[i].op in ("bn", "act") and (nds[i].op != "bn" or i == 1):
            i += 1
        if i >= len(nds) or not _is_pointwise(block, nds[i]):
            return False
        head = dw_epilogue(block, names[:i])
        return head is not None and tail_epilogue(block, names[i + 1 :], nds[i]["bias"]) is not None
    if step.kind in ("mlp", "convnext"):
        if step.kind == "convnext":
            if not _is_depthwise(block, first):
                return False
            nds, names = nds[1:], names[1:]
        if len(nds) < 4 or nds[0].op != "ln" or not _is_pointwise(block, nds[1]) or nds[2].op != "act":
            return False
        if not _is_pointwise(block, nds[3]) or not _mlp_fits(block, nds[0], nds[3]):
            return False
        return tail_epilogue(block, names[4:], nds[3]["bias"]) is not None
    return False


def feeds_gate(block: Block, name: str) -> bool:
    """Whether name's only reader is an se / eca gate (a pooling step then writes its partial sums)."""
    return [block.node(c).op for c in block.consumers(name)] in (["se"], ["eca"])


def pool_pw_parts(block: Block, names: list[str]) -> tuple[Node, Node, Epilogue] | None:
    """A pool_pw step's average pool, its pointwise conv and the conv's tail Epilogue, or None unless names (a
    chain) are avgpool -> pointwise conv [epilogue chain] with a window of <= MAX_POOL_TAPS elements."""
    if len(names) < 2:
        return None
    pool, pw = block.node(names[0]), block.node(names[1])
    if pool.op != "avgpool" or pool["kernel"] ** 2 > MAX_POOL_TAPS or not _is_pointwise(block, pw):
        return None
    tail = tail_epilogue(block, names[2:], pw["bias"])
    return None if tail is None else (pool, pw, tail)


def dw_epilogue(block: Block, names: list[str]) -> Epilogue | None:
    """The depthwise part of a separable step: dw conv [bn] [act]."""
    ep = tail_epilogue(block, names[1:], block.node(names[0])["bias"])
    if ep is None or ep.residual or ep.layer_scale:
        return None
    return ep


def _conv_run(block: Block, names: list[str], i: int) -> int:
    """End of the [bn] [act] run after the conv at names[i] (bn only first)."""
    j = i + 1
    while (
        j < len(names) and block.node(names[j]).op in ("bn", "act") and (block.node(names[j]).op != "bn" or j == i + 1)
    ):
        j += 1
    return j


def mbconv_parts(block: Block, names: list[str], kind: str) -> dict[str, Any] | None:
    """Anatomy of an expand_dw / mbconv step: expand (pointwise node or None) with its [bn] [act] Epilogue and
    nodes, dw with its Epilogue and nodes, and for mbconv the project node, its tail Epilogue and tail nodes;
    None unless names (a chain) are one."""
    out: dict[str, Any] = {"expand": None, "expand_ep": None, "expand_nodes": []}
    i = 0
    if names and _is_pointwise(block, block.node(names[0])):
        j = _conv_run(block, names, 0)
        out.update(expand=block.node(names[0]), expand_ep=dw_epilogue(block, names[:j]), expand_nodes=names[1:j])
        if out["expand_ep"] is None:
            return None
        i = j
    if i >= len(names) or not _is_depthwise(block, block.node(names[i])):
        return None
    j = _conv_run(block, names, i)
    out.update(dw=block.node(names[i]), dw_ep=dw_epilogue(block, names[i:j]), dw_nodes=names[i + 1 : j])
    if out["dw_ep"] is None:
        return None
    if kind == "expand_dw":
        # without an expand the step exists for the gate's pool; its output must feed a gate
        return out if j == len(names) and (out["expand"] is not None or feeds_gate(block, names[-1])) else None
    if out["expand"] is None or j >= len(names) or not _is_pointwise(block, block.node(names[j])):
        return None
    pw = block.node(names[j])
    out.update(pw=pw, tail=tail_epilogue(block, names[j + 1 :], pw["bias"]), tail_nodes=names[j + 1 :])
    return out if out["tail"] is not None else None


@dataclass(frozen=True)
class AsppBranch:
    """One branch of an aspp step: a conv of the shared source with its [bn] [act] nodes, or a broadcast of a
    1 x 1 map computed before the step; written to channels [out_start, out_start + size) of the concat."""

    head: str  # the conv or broadcast node
    conv: bool
    tail: tuple[str, ...]
    size: int
    out_start: int


def aspp_branches(block: Block, names: list[str]) -> list[AsppBranch] | None:
    """Branches of an aspp step in concat order, or None unless names are: chains each a stride-1 same-size
    dense conv (groups 1) of one shared source [bn] [act] or a broadcast of an outside 1 x 1 map, then one
    concat of every chain's last node (at least two conv chains); nothing inside feeds anything outside."""
    if len(names) < 3 or block.node(names[-1]).op != "concat":
        return None
    inside = set(names)
    chains: list[list[str]] = []
    for name in names[:-1]:
        nd = block.node(name)
        if nd.op in ("conv", "broadcast") and nd.inputs[0] not in inside:
            chains.append([name])
        elif not chains or nd.inputs[0] != chains[-1][-1] or block.node(chains[-1][0]).op != "conv":
            return None
        else:
            chains[-1].append(name)
        if not set(block.consumers(name)) <= inside:
            return None
    convs = [c for c in chains if block.node(c[0]).op == "conv"]
    if len(convs) < 2 or len({block.node(c[0]).inputs[0] for c in convs}) != 1:
        return None
    cat = block.node(names[-1])
    tails = {c[-1]: c for c in chains}
    if len(cat.inputs) != len(chains) or set(cat.inputs) != set(tails):
        return None
    out: list[AsppBranch] = []
    offset = 0
    for t in cat.inputs:
        chain = tails[t]
        head = block.node(chain[0])
        if head.op == "conv":
            spec = block.conv_spec(head)
            same = all(v == 1 for v in spec.stride) and tuple(spec.out_size) == tuple(spec.in_size)
            if (
                spec.groups != 1
                or not same
                or dw_epilogue(block, chain) is None
                or _conv_run(block, chain, 0) != len(chain)
            ):
                return None
        out.append(
            AsppBranch(
                head=head.name, conv=head.op == "conv", tail=tuple(chain[1:]), size=block.shapes[t].c, out_start=offset
            )
        )
        offset += block.shapes[t].c
    return out


@dataclass(frozen=True)
class GateParts:
    """A dw_gate / pw_gate step: conv reads channels [src_start, src_start + conv input channels) of src (outside
    the step); value is the conv or, for dw_gate, its scalar node (times scale); the step's mul multiplies value's
    channels [start, start + size) by channels [partner_start, partner_start + size) of partner (outside).
    written: value's channels [lo, hi) that readers outside the step need (dw_gate's second output), or None."""

    conv: str
    src: str
    src_start: int
    value: str
    scale: float
    start: int
    size: int
    partner: str
    partner_start: int
    written: tuple[int, int] | None


def _slice_of(block: Block, name: str, inside: set[str]) -> tuple[str, int]:
    """(tensor, channel offset) that name reads: through a split inside the step, or name itself."""
    nd = block.node(name) if name != INPUT else None
    if nd is not None and name in inside and nd.op == "split":
        return nd.inputs[0], nd["start"]
    return name, 0


def gate_parts(block: Block, names: list[str], kind: str) -> GateParts | None:
    """Anatomy of a dw_gate / pw_gate step, or None unless names are: [split] -> conv (dw_gate: stride-1 same-size
    depthwise, its input optionally a split inside; pw_gate: pointwise) [scalar (dw_gate)] -> splits -> mul of
    (a slice of) the conv's value and (a slice of) a tensor computed before the step. Nothing inside feeds
    anything outside but the mul and (dw_gate) the value."""
    if len(names) < 2 or block.node(names[-1]).op != "mul":
        return None
    inside = set(names)
    convs = [i for i, n in enumerate(names) if block.node(n).op == "conv"]
    if len(convs) != 1:
        return None
    i = convs[0]
    conv = block.node(names[i])
    if kind == "dw_gate" and not _same_size_depthwise(block, conv):
        return None
    if kind == "pw_gate" and (not _is_pointwise(block, conv) or i != 0):
        return None
    if i > 1 or (i == 1 and (block.node(names[0]).op != "split" or conv.inputs[0] != names[0])):
        return None
    if i == 1 and block.consumers(names[0]) != [conv.name]:
        return None
    value, scale, j = conv.name, 1.0, i + 1
    if kind == "dw_gate" and j < len(names) - 1 and block.node(names[j]).op == "scalar":
        if block.consumers(conv.name) != [names[j]]:
            return None
        value, scale, j = names[j], block.node(names[j])["value"], j + 1
    mul = block.node(names[-1])
    mids = names[j:-1]
    if len(mids) > 2 or mul.inputs[0] == mul.inputs[1]:
        return None
    for m in mids:
        nd = block.node(m)
        if nd.op != "split" or block.consumers(m) != [mul.name] or m not in mul.inputs:
            return None
        if nd.inputs[0] in inside and nd.inputs[0] != value:
            return None
    ops = [_slice_of(block, a, inside) for a in mul.inputs]
    mine = [k for k, (t, _) in enumerate(ops) if t == value]
    if len(mine) != 1 or ops[1 - mine[0]][0] in inside:
        return None
    (_, start), (partner, pstart) = ops[mine[0]], ops[1 - mine[0]]
    outside = [c for c in block.consumers(value) if c not in inside]
    written = None
    if outside:
        if kind != "dw_gate":
            return None
        if all(block.node(c).op == "split" for c in outside):
            lo = min(block.node(c)["start"] for c in outside)
            written = (lo, max(block.node(c)["start"] + block.node(c)["size"] for c in outside))
        else:
            written = (0, block.shapes[value].c)
    src, src_start = _slice_of(block, conv.inputs[0], inside)
    return GateParts(
        conv=conv.name,
        src=src,
        src_start=src_start,
        value=value,
        scale=scale,
        start=start,
        size=block.shapes[mul.name].c,
        partner=partner,
        partner_start=pstart,
        written=written,
    )


def step_outputs(block: Block, step: Step) -> tuple[str, ...]:
    """The nodes a step writes to memory: its last node, after a dw_gate step's depthwise value when later steps
    read it."""
    if step.kind == "dw_gate":
        g = gate_parts(block, list(step.nodes), step.kind)
        if g is not None and g.written is not None:
            return (g.value, step.nodes[-1])
    return (step.nodes[-1],)


@dataclass(frozen=True)
class Branch:
    """One branch of an inception step: input channels [start, start + size) of the shared source, an optional
    depthwise conv node with its [bn] [act] tail, written to channels [out_start, out_start + size) of the concat."""

    split: str
    conv: str | None
    tail: tuple[str, ...]
    start: int
    size: int
    out_start: int


def _same_size_depthwise(block: Block, nd: Node) -> bool:
    """groups == in == out channels (multiplier 1, any count), stride 1, output size == input size."""
    if nd.op != "conv":
        return False
    spec = block.conv_spec(nd)
    return (
        spec.groups == spec.c == spec.k
        and all(v == 1 for v in spec.stride)
        and tuple(spec.out_size) == tuple(spec.in_size)
    )


def inception_branches(block: Block, names: list[str]) -> list[Branch] | None:
    """The branches of an inception step (in concat order), or None unless names are: splits of one source,
    each followed by nothing (identity) or a same-size depthwise conv [bn] [act] chain, then one concat of
    every branch's last node; nothing inside feeds anything outside but the concat."""
    if len(names) < 3 or block.node(names[-1]).op != "concat":
        return None
    inside = set(names)
    chains: list[list[str]] = []
    for name in names[:-1]:
        nd = block.node(name)
        if nd.op == "split":
            chains.append([name])
        elif not chains or nd.inputs[0] != chains[-1][-1]:
            return None
        else:
            chains[-1].append(name)
        if not set(block.consumers(name)) <= inside:
            return None
    if len({block.node(c[0]).inputs[0] for c in chains}) != 1:
        return None
    cat = block.node(names[-1])
    tails = {c[-1]: c for c in chains}
    if len(cat.inputs) != len(chains) or set(cat.inputs) != set(tails):
        return None
    out: list[Branch] = []
    offset = 0
    for t in cat.inputs:
        chain = tails[t]
        for a, b in itertools.pairwise(chain):
            if block.consumers(a) != [b]:
                return None
        split = block.node(chain[0])
        conv = None
        if len(chain) > 1:
            nd = block.node(chain[1])
            if not _same_size_depthwise(block, nd) or dw_epilogue(block, chain[1:]) is None:
                return None
            conv = nd.name
        out.append(
            Branch(
                split=split.name,
                conv=conv,
                tail=tuple(chain[2:]),
                start=split["start"],
                size=split["size"],
                out_start=offset,
            )
        )
        offset += split["size"]
    return out


def check(block: Block, plan: Plan) -> None:
    """SpecError unless plan covers block's nodes once each, in order, with legal steps (a legal pair is
    remembered: patched blocks check their plan on every call)."""
    _check(block, plan)


@lru_cache(maxsize=1024)
def _check(block: Block, plan: Plan) -> None:
    flat = [n for s in plan.steps for n in s.nodes]
    if flat != [nd.name for nd in block.nodes]:
        raise SpecError(f"plan steps must cover the block's nodes once each in order: got {flat}")
    for s in plan.steps:
        if s.kind not in STEP_KINDS:
            raise SpecError(f"unknown step kind {s.kind!r}; expected one of {STEP_KINDS}")
        if not matches(block, s):
            raise SpecError(f"step {s.kind}[{'+'.join(s.nodes)}] is not a legal {s.kind} kernel for this block")


# ---- enumeration ---------------------------------------------------------------------------
def _steps_at(block: Block, i: int) -> Iterator[Step]:
    names = [nd.name for nd in block.nodes]
    for kind in STEP_KINDS:
        for j in range(i + 1, len(names) + 1):
            step = Step(kind, tuple(names[i:j]))
            if matches(block, step):
                yield step


def plans(block: Block) -> list[Plan]:
    """Every legal plan of block (memoised partitions of the node sequence into matching steps)."""
    n = len(block.nodes)
    memo: dict[int, list[tuple[Step, ...]]] = {n: [()]}
    for i in range(n - 1, -1, -1):
        out = []
        for step in _steps_at(block, i):
            for rest in memo[i + len(step.nodes)]:
                out.append((step,) + rest)
        memo[i] = out
    if not memo[0]:
        raise SpecError(f"no legal plan for {block.describe()}")
    return [Plan(steps=p) for p in memo[0]]


def unfused(block: Block) -> Plan:
    """Each node its own launch (a conv with only its bias): the eager baseline."""
    return Plan(steps=tuple(Step("conv" if nd.op == "conv" else "op", (nd.name,)) for nd in block.nodes))


# ---- cost model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    """Device rates the plan cost model needs (H100 SXM defaults; schedules.blocks passes DeviceLimits')."""

    dram_bw: float = 3.35e12
    mma_flops: float = 989e12  # fp16/bf16 tensor cores
    fp32_mma_flops: float = 67e12  # fp32 'ieee' dots run on CUDA cores
    fp32_flops: float = 67e12
    launch_s: float = 4e-6


@dataclass(frozen=True)
class StepCost:
    step: Step
    bytes: int  # HBM traffic: external inputs + parameters read, output written
    mma_flops: float  # GEMM work (tensor cores for 16-bit inputs)
    flops: float  # CUDA-core work: direct depthwise taps, norms, activations, SE
    seconds: float
    launch: int = 1  # kernel launches: 0 for a split (a view), 2 for se_pw (the gate's map, then the GEMM)


@dataclass(frozen=True)
class PlanCost:
    plan: Plan
    steps: tuple[StepCost, ...]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def launches(self) -> int:
        """Kernel launches (split steps are views and launch nothing)."""
        return sum(s.launch for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.describe(), "launches": self.launches, "bytes": self.bytes, "seconds": self.seconds}


_ELEM_FLOPS = {"bn": 2, "act": 8, "scale": 1, "scalar": 1, "add": 1, "mul": 1, "ln": 8, "split": 0, "concat": 0}


def _elems(block: Block, name: str) -> int:
    s = block.shapes[name]
    return block.n * s.c * s.size[0] * s.size[1]


ONCHIP_TILE = {"separable": 128, "mbconv": 128, "expand_dw": 64}  # output channels per program the model assumes


def step_cost(block: Block, step: Step, rates: Rates = Rates(), pooled: bool = False) -> StepCost:
    """Modelled HBM bytes and issue time of one step (pooled: an se_pw / gate_ep step's gate input arrives with
    its per-image sums, taken by the expand_dw / pw_pool step that wrote it)."""
    if step.kind == "op" and block.node(step.nodes[0]).op == "split":
        return StepCost(step=step, bytes=0, mma_flops=0.0, flops=0.0, seconds=0.0, launch=0)
    item = block.itemsize
    inside = set(step.nodes)
    external: set[str] = set()
    params = 0
    mma = flops = 0.0
    recompute = 1
    shapes = block.param_shapes()
    for name in step.nodes:
        nd = block.node(name)
        external.update(i for i in nd.inputs if i not in inside)
        if nd.op == "conv":
            spec = block.conv_spec(nd)
            params += spec.k * spec.cg * spec.taps * item + (spec.k * 4 if nd["bias"] else 0)
            if spec.kind == "depthwise":
                flops += spec.flops
            else:
                mma += spec.flops
        else:
            params += sum(_prod(shape) for key, shape in shapes.items() if key.startswith(name + ".")) * 4
            e = _elems(block, name)
            flops += _ELEM_FLOPS.get(nd.op, 0) * e
            if nd.op == "se":
                flops += 3 * e + 4 * block.n * nd["hidden"] * block.shapes[name].c
            elif nd.op == "eca":
                flops += 3 * e + 2 * block.n * nd["kernel"] * block.shapes[name].c
            elif nd.op == "avgpool":
                flops += nd["kernel"] ** 2 * e
    first = block.node(step.nodes[0])
    read = sum(_read_elems(block, n, inside) for n in external)
    extra = 0  # bytes beyond activations and parameters (pool partial sums, gates)
    if step.kind in ("separable", "mbconv", "expand_dw"):
        # each program's output-channel tile recomputes its on-chip inputs: the step's input is re-read per tile
        # (through L2 mostly, halo ignored); mbconv/expand_dw recompute the expand GEMM once per depthwise tap
        parts = (mbconv_parts(block, list(step.nodes), step.kind) if step.kind != "separable" else None) or {}
        last_conv = next(block.node(n) for n in reversed(step.nodes) if block.node(n).op == "conv")
        recompute = -(-block.shapes[last_conv.name].c // ONCHIP_TILE[step.kind])
        dw_node = parts.get("dw") or first
        dw = block.conv_spec(dw_node)
        flops += (recompute - 1) * dw.flops
        if parts.get("expand") is not None:
            ex = block.conv_spec(parts["expand"])
            mma += ex.flops * (dw.taps * _prod(dw.out_size) / _prod(dw.in_size) * recompute - 1)
        read += (recompute - 1) * _elems(block, first.inputs[0])
        if step.kind == "expand_dw" and any(block.node(c).op in GATES for c in block.consumers(step.nodes[-1])):
            extra += _pool_bytes(block, step.nodes[-1])
    if step.kind == "pw_pool" or (step.kind == "pool_pw" and feeds_gate(block, step.nodes[-1])):
        extra += _pool_bytes(block, step.nodes[-1])
    if step.kind == "dw_gate":  # the depthwise value's channels that later steps read: a second output
        g = gate_parts(block, list(step.nodes), step.kind)
        if g is not None and g.written is not None:
            h, w = block.shapes[g.value].size
            extra += block.n * h * w * (g.written[1] - g.written[0]) * item
    if step.kind == "op" and first.op in GATES:
        read *= 2  # pool, then scale: two passes over the input
    if step.kind in GATED:
        c = block.shapes[first.name].c
        extra += 2 * block.n * c * 4  # the gate, written by its map and read by the kernel's programs
        if not pooled:
            read += _elems(block, first.inputs[0])  # the pool: a pass of its own over the gate's input
    out = _elems(block, step.nodes[-1])
    nbytes = (read + out) * item + params + extra
    mma_rate = rates.fp32_mma_flops if block.dtype == "float32" else rates.mma_flops
    launches = LAUNCHES.get(step.kind, 1)
    t = max(nbytes / rates.dram_bw, mma / mma_rate + flops / rates.fp32_flops) + launches * rates.launch_s
    return StepCost(step=step, bytes=int(nbytes), mma_flops=mma, flops=flops, seconds=t, launch=launches)


def _pool_bytes(block: Block, name: str) -> int:
    """The per-image partial sums (64-pixel tiles, fp32) a pooling step writes beside its output name."""
    s = block.shapes[name]
    return block.n * -(-_prod(s.size) // 64) * s.c * 4


def _read_elems(block: Block, name: str, inside: set[str]) -> int:
    """Elements a step reads of an external tensor: only the channel slices when every reader inside is a split."""
    users = [block.node(u) for u in block.consumers(name) if u in inside]
    if users and all(u.op == "split" for u in users):
        return sum(_elems(block, u.name) for u in users)
    return _elems(block, name)


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


def pooled_by(plan: Plan) -> set[str]:
    """Nodes whose per-image sums a step of plan takes as it writes them (expand_dw / pw_pool / pool_pw outputs)."""
    return {s.nodes[-1] for s in plan.steps if s.kind in POOLING}


def cost(
    block: Block, plan: Plan, rates: Rates = Rates(), memo: dict[tuple[Step, bool], StepCost] | None = None
) -> PlanCost:
    """plan's modelled cost; memo (step, pooled) -> StepCost shares step costs between the plans of one block."""
    pooled = pooled_by(plan)
    memo = {} if memo is None else memo
    steps = []
    for s in plan.steps:
        key = (s, s.kind in GATED and block.node(s.nodes[0]).inputs[0] in pooled)
        if key not in memo:
            memo[key] = step_cost(block, s, rates, pooled=key[1])
        steps.append(memo[key])
    return PlanCost(plan=plan, steps=tuple(steps))


def rank(block: Block, rates: Rates = Rates(), candidates: list[Plan] | None = None) -> list[PlanCost]:
    """Legal plans (or candidates), cheapest modelled time first; ties go to fewer bytes, then fewer launches."""
    cands = candidates if candidates is not None else plans(block)
    memo: dict[tuple[Step, bool], StepCost] = {}
    costs = [cost(block, p, rates, memo) for p in cands]
    return sorted(costs, key=lambda c: (c.seconds, c.bytes, c.launches, c.plan.describe()))


def best(block: Block, rates: Rates = Rates()) -> Plan:
    return rank(block, rates)[0].plan
