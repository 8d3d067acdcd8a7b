"""Block: a small graph of conv, norm, activation, SE, scale, residual and split/concat nodes.

Frozen, hashable, canonical JSON (the store's key for block winners), strict like BlockSpec:
unknown fields, illegal graphs and shape mismatches raise SpecError naming the node. Tensors
are NCHW-shaped at the surface and channels-last in memory, like single convs.

Node ops (every node has one output; `inputs` name earlier nodes or "x", the block input):
  conv    out, kernel, stride, padding, dilation, groups, bias  -- any family conv_spec builds
  bn      folded BatchNorm: y = x * scale + shift per channel (params scale, shift)
  ln      LayerNorm over channels at each pixel, eps (params weight, bias)
  act     fn: one of spec.ACTIVATIONS
  se      squeeze-excite: x * sigmoid(W2 act(W1 mean_hw(x) + b1) + b2), hidden, act (params w1, b1, w2, b2)
  eca     efficient channel attention: x * sigmoid(conv1d_k(mean_hw(x)) over channels), kernel k odd, zero
          padding (k-1)/2, no bias (param weight [k])
  gap     global average pool to 1 x 1
  avgpool average pool (nn.AvgPool2d): kernel, stride, padding (square ints), ceil_mode, count_include_pad;
          output sizes and window divisors exactly as torch's (ceil_mode edge windows may hold fewer elements;
          count_include_pad False divides by the elements inside the input). timm's ResNet-D shortcut pools
          AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): 7 x 7 -> 4 x 4, edge windows of 1 or 2
  broadcast  a 1 x 1 map repeated to size [H, W] (bilinear upsampling of a 1 x 1 map, as DeepLab's ASPP pooling)
  scale   layer scale: x * gamma per channel (param gamma)
  scalar  x * value, one constant float for every element (gnConv's depthwise scale s)
  add     residual: inputs[0] + inputs[1], same shape
  mul     elementwise gate: inputs[0] * inputs[1], same shape (gnConv's recursive gating)
  split   channel slice [start, start + size) of its input
  concat  channel concatenation of its inputs, same spatial size
The last node is the block's output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .spec import ACTIVATIONS, DTYPES, BlockSpec, Canonical, Epilogue, SpecError, _ints, conv_spec

INPUT = "x"

# op -> {attribute: default}; an attribute without a default (None marker) is required.
_REQUIRED = object()
ATTRS: dict[str, dict[str, Any]] = {
    "conv": {
        "out": _REQUIRED,
        "kernel": _REQUIRED,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "bias": False,
    },
    "bn": {},
    "ln": {"eps": 1e-6},
    "act": {"fn": _REQUIRED},
    "se": {"hidden": _REQUIRED, "act": "relu"},
    "eca": {"kernel": _REQUIRED},
    "gap": {},
    "avgpool": {"kernel": _REQUIRED, "stride": _REQUIRED, "padding": 0, "ceil_mode": False, "count_include_pad": True},
    "broadcast": {"size": _REQUIRED},
    "scale": {},
    "scalar": {"value": _REQUIRED},
    "add": {},
    "mul": {},
    "split": {"start": _REQUIRED, "size": _REQUIRED},
    "concat": {},
}
ARITY = {"add": 2, "mul": 2}  # exact input counts; concat takes >= 2, everything else 1
PARAMS = {"bn": ("scale", "shift"), "ln": ("weight", "bias"), "se": ("w1", "b1", "w2", "b2"), "scale": ("gamma",)}
GATES = ("se", "eca")  # channel attention: a global pool of the input, a small map to one gate per channel, a scale
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True)
class Node:
    """One graph node: name, op, input names and its attributes (sorted (key, value) pairs)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or set(self.name) - _NAME_CHARS or self.name == INPUT:
            raise SpecError(f"node name {self.name!r} must be a non-empty lower-case identifier other than {INPUT!r}")
        if self.op not in ATTRS:
            raise SpecError(f"node {self.name!r}: unknown op {self.op!r}; expected one of {sorted(ATTRS)}")
        if not isinstance(self.inputs, (tuple, list)) or not all(isinstance(i, str) for i in self.inputs):
            raise SpecError(f"node {self.name!r}: inputs must be a list of node names")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        want = ARITY.get(self.op, 1)
        if self.op == "concat" and len(self.inputs) < 2:
            raise SpecError(f"node {self.name!r}: concat needs at least 2 inputs, got {len(self.inputs)}")
        if self.op != "concat" and len(self.inputs) != want:
            raise SpecError(f"node {self.name!r}: {self.op} takes {want} input(s), got {len(self.inputs)}")
        given = dict(self.attrs)
        spec = ATTRS[self.op]
        unknown = set(given) - set(spec)
        if unknown:
            raise SpecError(f"node {self.name!r}: unknown {self.op} fields {sorted(unknown)}")
        full = {}
        for k, default in spec.items():
            if k not in given:
                if default is _REQUIRED:
                    raise SpecError(f"node {self.name!r}: {self.op} needs field {k!r}")
                full[k] = default
            else:
                full[k] = _canon(given[k])
        _check_attrs(self.name, self.op, full)
        object.__setattr__(self, "attrs", tuple(sorted(full.items())))

    def __getitem__(self, key: str) -> Any:
        return dict(self.attrs)[key]

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "op": self.op, "inputs": list(self.inputs)}
        d.update({k: _jsonable(v) for k, v in self.attrs})
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Node:
        if not isinstance(d, dict):
            raise SpecError(f"a node must be a JSON object, got {type(d).__name__}")
        missing = {"name", "op", "inputs"} - set(d)
        if missing:
            raise SpecError(f"node {d.get('name', '?')!r}: missing fields {sorted(missing)}")
        attrs = {k: v for k, v in d.items() if k not in ("name", "op", "inputs")}
        return cls(
            name=d["name"],
            op=d["op"],
            inputs=tuple(d["inputs"]) if isinstance(d["inputs"], list) else d["inputs"],
            attrs=tuple(attrs.items()),
        )


def _canon(v: Any) -> Any:
    """Lists (from JSON) -> tuples, recursively, so nodes hash."""
    if isinstance(v, list):
        return tuple(_canon(x) for x in v)
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _pos_int(node: str, name: str, v: Any, lo: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise SpecError(f"node {node!r}: {name} must be an int >= {lo}, got {v!r}")


def _check_attrs(node: str, op: str, a: dict[str, Any]) -> None:
    if op == "conv":
        _pos_int(node, "out", a["out"])
        _pos_int(node, "groups", a["groups"])
        if not isinstance(a["bias"], bool):
            raise SpecError(f"node {node!r}: bias must be a bool")
    elif op == "ln":
        if not isinstance(a["eps"], float) or not 0.0 < a["eps"] < 1.0:
            raise SpecError(f"node {node!r}: eps must be a float in (0, 1), got {a['eps']!r}")
    elif op == "act":
        if a["fn"] not in ACTIVATIONS or a["fn"] == "starrelu":
            raise SpecError(f"node {node!r}: activation {a['fn']!r} is not one of {ACTIVATIONS[:-1]}")
    elif op == "se":
        _pos_int(node, "hidden", a["hidden"])
        if a["act"] not in ("relu", "silu", "gelu", "hardswish"):
            raise SpecError(f"node {node!r}: se act must be relu, silu, gelu or hardswish, got {a['act']!r}")
    elif op == "eca":
        _pos_int(node, "kernel", a["kernel"])
        if a["kernel"] % 2 == 0:
            raise SpecError(f"node {node!r}: eca kernel must be odd (same-size conv1d), got {a['kernel']}")
    elif op == "avgpool":
        _pos_int(node, "kernel", a["kernel"])
        _pos_int(node, "stride", a["stride"])
        _pos_int(node, "padding", a["padding"], 0)
        if a["padding"] > a["kernel"] // 2:
            raise SpecError(f"node {node!r}: avgpool padding {a['padding']} exceeds half the kernel {a['kernel']}")
        for flag in ("ceil_mode", "count_include_pad"):
            if not isinstance(a[flag], bool):
                raise SpecError(f"node {node!r}: {flag} must be a bool, got {a[flag]!r}")
    elif op == "broadcast":
        if not isinstance(a["size"], tuple) or len(a["size"]) != 2:
            raise SpecError(f"node {node!r}: broadcast size must be [H, W], got {a['size']!r}")
        for v in a["size"]:
            _pos_int(node, "size", v)
    elif op == "scalar":
        if not isinstance(a["value"], float) or not math.isfinite(a["value"]):
            raise SpecError(f"node {node!r}: scalar value must be a finite float, got {a['value']!r}")
    elif op == "split":
        _pos_int(node, "start", a["start"], 0)
        _pos_int(node, "size", a["size"])


@dataclass(frozen=True)
class Shape:
    """A node's output: channels and spatial size."""

    c: int
    size: tuple[int, ...]


@dataclass(frozen=True)
class Block(Canonical):
    """A block instance: input [n, c, *in_size] of dtype, then `nodes` in topological order."""

    n: int
    c: int
    in_size: tuple[int, ...]
    nodes: tuple[Node, ...]
    dtype: str = "float32"
    shapes: dict[str, Shape] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("n", "c"):
            _pos_int("block", name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.in_size, (tuple, list)) or len(self.in_size) != 2:
            raise SpecError(f"blocks are 2-D: in_size must be [H, W], got {self.in_size!r}")
        object.__setattr__(self, "in_size", _ints("in_size", self.in_size, 2))
        if min(self.in_size) < 1:
            raise SpecError(f"in_size must be positive, got {self.in_size}")
        if not isinstance(self.nodes, (tuple, list)) or not self.nodes:
            raise SpecError("a block needs at least one node")
        if not all(isinstance(nd, Node) for nd in self.nodes):
            raise SpecError("nodes must be Node objects")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        shapes: dict[str, Shape] = {INPUT: Shape(self.c, self.in_size)}
        for nd in self.nodes:
            if nd.name in shapes:
                raise SpecError(f"duplicate node name {nd.name!r}")
            for i in nd.inputs:
                if i not in shapes:
                    raise SpecError(f"node {nd.name!r} reads {i!r}, which is not an earlier node or {INPUT!r}")
            shapes[nd.name] = self._infer(nd, [shapes[i] for i in nd.inputs])
        used = {i for nd in self.nodes for i in nd.inputs}
        dead = [nd.name for nd in self.nodes[:-1] if nd.name not in used]
        if dead:
            raise SpecError(f"nodes {dead} are never used: every node but the last must feed another")
        object.__setattr__(self, "shapes", shapes)

    def _infer(self, nd: Node, ins: list[Shape]) -> Shape:
        a = dict(nd.attrs)
        s = ins[0]
        if nd.op == "conv":
            spec = self.conv_spec(nd, s)
            return Shape(spec.k, spec.out_size)
        if nd.op in ("bn", "ln", "act", "scale", "scalar"):
            return s
        if nd.op in GATES:
            return s
        if nd.op == "gap":
            return Shape(s.c, (1, 1))
        if nd.op == "avgpool":
            size = tuple(pool_out(v, a["kernel"], a["stride"], a["padding"], a["ceil_mode"]) for v in s.size)
            if min(size) < 1:
                raise SpecError(f"node {nd.name!r}: avgpool {a['kernel']}/{a['stride']} of a {s.size} input is empty")
            return Shape(s.c, size)
        if nd.op == "broadcast":
            if s.size != (1, 1):
                raise SpecError(f"node {nd.name!r}: broadcast needs a 1 x 1 input, got {s.size}")
            return Shape(s.c, tuple(a["size"]))
        if nd.op in ("add", "mul"):
            if ins[0] != ins[1]:
                u, w = ins
                raise SpecError(f"node {nd.name!r}: {nd.op} of mismatched shapes {u.c}x{u.size} and {w.c}x{w.size}")
            return s
        if nd.op == "split":
            if a["start"] + a["size"] > s.c:
                raise SpecError(
                    f"node {nd.name!r}: channels [{a['start']}, {a['start'] + a['size']}) exceed the input's {s.c}"
                )
            return Shape(a["size"], s.size)
        if any(i.size != s.size for i in ins):  # concat
            raise SpecError(f"node {nd.name!r}: concat of different spatial sizes {[i.size for i in ins]}")
        return Shape(sum(i.c for i in ins), s.size)

    def conv_spec(self, nd: Node, s: Shape | None = None, epilogue: Epilogue | None = None) -> BlockSpec:
        """The single-conv BlockSpec of a conv node (its bias in the epilogue unless one is given)."""
        s = s or self.shapes[nd.inputs[0]]
        a = dict(nd.attrs)
        try:
            return conv_spec(
                n=self.n,
                c=s.c,
                k=a["out"],
                in_size=s.size,
                kernel=_canon(a["kernel"]),
                stride=_canon(a["stride"]),
                padding=_canon(a["padding"]),
                dilation=_canon(a["dilation"]),
                groups=a["groups"],
                dtype=self.dtype,
                epilogue=epilogue or Epilogue(bias=a["bias"]),
            )
        except SpecError as e:
            raise SpecError(f"node {nd.name!r}: {e}") from None

    # ---- graph queries ----------------------------------------------------------------
    def node(self, name: str) -> Node:
        for nd in self.nodes:
            if nd.name == name:
                return nd
        raise KeyError(name)

    def consumers(self, name: str) -> list[str]:
        return [nd.name for nd in self.nodes if name in nd.inputs]

    @property
    def output(self) -> Shape:
        return self.shapes[self.nodes[-1].name]

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter tensor the block reads, '<node>.<param>' -> shape (fp32 vectors, weights in dtype)."""
        out: dict[str, tuple[int, ...]] = {}
        for nd in self.nodes:
            s = self.shapes[nd.inputs[0]]
            if nd.op == "conv":
                spec = self.conv_spec(nd)
                out[f"{nd.name}.weight"] = (spec.k, spec.cg, *spec.kernel)
                if nd["bias"]:
                    out[f"{nd.name}.bias"] = (spec.k,)
            elif nd.op == "se":
                h = nd["hidden"]
                out.update(
                    {
                        f"{nd.name}.w1": (h, s.c),
                        f"{nd.name}.b1": (h,),
                        f"{nd.name}.w2": (s.c, h),
                        f"{nd.name}.b2": (s.c,),
                    }
                )
            elif nd.op == "eca":
                out[f"{nd.name}.weight"] = (nd["kernel"],)
            else:
                for p in PARAMS.get(nd.op, ()):
                    out[f"{nd.name}.{p}"] = (s.c,)
        return out

    # ---- identity ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "block",
            "n": self.n,
            "c": self.c,
            "in_size": list(self.in_size),
            "dtype": self.dtype,
            "nodes": [nd.to_dict() for nd in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Block:
        if not isinstance(d, dict):
            raise SpecError(f"a block must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"kind", "n", "c", "in_size", "dtype", "nodes"}
        if unknown:
            raise SpecError(f"unknown block fields: {sorted(unknown)}")
        missing = {"n", "c", "in_size", "nodes"} - set(d)
        if missing:
            raise SpecError(f"missing block fields: {sorted(missing)}")
        if d.get("kind", "block") != "block":
            raise SpecError(f"kind must be 'block', got {d.get('kind')!r}")
        if not isinstance(d["nodes"], list):
            raise SpecError("nodes must be a list")
        return cls(
            n=d["n"],
            c=d["c"],
            in_size=tuple(d["in_size"]) if isinstance(d["in_size"], list) else d["in_size"],
            dtype=d.get("dtype", "float32"),
            nodes=tuple(Node.from_dict(nd) for nd in d["nodes"]),
        )

    @classmethod
    def from_json(cls, text: str) -> Block:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"block is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        ops = "-".join(
            nd.op
            if nd.op != "conv"
            else ("dw" if self.conv_spec(nd).kind == "depthwise" else "pw" if self.conv_spec(nd).taps == 1 else "conv")
            for nd in self.nodes
        )
        return f"block n{self.n} c{self.c}->{self.output.c} @{self.in_size[0]}x{self.in_size[1]} {ops} {self.dtype}"


def pool_out(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of an average pool along one dimension, as torch computes it (a ceil_mode window must start
    inside the input or its left padding)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def node(name: str, op: str, inputs: list[str] | tuple[str, ...], **attrs: Any) -> Node:
    return Node(name=name, op=op, inputs=tuple(inputs), attrs=tuple(attrs.items()))


# ---- seed blocks ------------------------------------------------------------------------
def separable(
    *,
    n: int,
    c: int,
    k: int,
    in_size: tuple[int, int],
    kernel: int = 3,
    stride: int = 1,
    act: str | None = "relu",
    pw_act: str | None = "relu",
    residual: bool = False,
    dtype: str = "float32",
) -> Block:
    """MobileNet / timm DepthwiseSeparableConv: dw k x k (s) -> BN -> act -> pw -> BN [-> act] [+ x]."""
    nodes = [
        node("dw", "conv", ["x"], out=c, kernel=kernel, stride=stride, padding=kernel // 2, groups=c),
        node("dw_bn", "bn", ["dw"]),
    ]
    if act:
        nodes.append(node("dw_act", "act", ["dw_bn"], fn=act))
    nodes += [node("pw", "conv", [nodes[-1].name], out=k, kernel=1), node("pw_bn", "bn", ["pw"])]
    if pw_act:
        nodes.append(node("pw_act", "act", ["pw_bn"], fn=pw_act))
    if residual:
        nodes.append(node("res", "add", [nodes[-1].name, "x"]))
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def convnext(
    *,
    n: int,
    c: int,
    in_size: tuple[int, int],
    kernel: int = 7,
    expansion: int = 4,
    eps: float = 1e-6,
    layer_scale: bool = True,
    dtype: str = "float32",
) -> Block:
    """ConvNeXt block: x + gamma * PW2(GELU(PW1(LN(DW7(x))))), PW1: C -> expansion * C."""
    nodes = [
        node("dw", "conv", ["x"], out=c, kernel=kernel, padding=kernel // 2, groups=c, bias=True),
        node("ln", "ln", ["dw"], eps=eps),
        node("pw1", "conv", ["ln"], out=expansion * c, kernel=1, bias=True),
        node("act", "act", ["pw1"], fn="gelu"),
        node("pw2", "conv", ["act"], out=c, kernel=1, bias=True),
    ]
    if layer_scale:
        nodes.append(node("gamma", "scale", ["pw2"]))
    nodes.append(node("res", "add", [nodes[-1].name, "x"]))
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def mbconv(
    *,
    n: int,
    c: int,
    k: int,
    in_size: tuple[int, int],
    expansion: int = 6,
    kernel: int = 3,
    stride: int = 1,
    se_ratio: float | None = 0.25,
    act: str = "silu",
    dtype: str = "float32",
    attention: str | None = "se",
    eca_kernel: int | None = None,
) -> Block:
    """MBConv (MobileNetV2 with se_ratio=None, act='relu6'; EfficientNet): [pw expand -> BN -> act] ->
    dw (s) -> BN -> act [-> SE | ECA] -> pw project -> BN [+ x when stride 1 and c == k].
    SE hidden = max(1, int(c * se_ratio)) of the block's input channels, as EfficientNet sizes it.
    attention='eca' puts ECA there instead (kernel eca_kernel, or ECA-Net's adaptive size of the hidden)."""
    if attention not in ("se", "eca", None):
        raise SpecError(f"attention must be 'se', 'eca' or None, got {attention!r}")
    if not isinstance(expansion, int) or expansion < 1:
        raise SpecError(f"expansion must be an int >= 1, got {expansion!r}")
    hid = c * expansion
    nodes: list[Node] = []
    src = "x"
    if expansion != 1:
        nodes += [
            node("expand", "conv", ["x"], out=hid, kernel=1),
            node("expand_bn", "bn", ["expand"]),
            node("expand_act", "act", ["expand_bn"], fn=act),
        ]
        src = "expand_act"
    nodes += [
        node("dw", "conv", [src], out=hid, kernel=kernel, stride=stride, padding=kernel // 2, groups=hid),
        node("dw_bn", "bn", ["dw"]),
        node("dw_act", "act", ["dw_bn"], fn=act),
    ]
    src = "dw_act"
    if attention == "se" and se_ratio:
        nodes.append(node("se", "se", [src], hidden=max(1, int(c * se_ratio)), act=act if act != "relu6" else "relu"))
        src = "se"
    elif attention == "eca":
        nodes.append(node("eca", "eca", [src], kernel=eca_kernel or adaptive_eca_kernel(hid)))
        src = "eca"
    nodes += [node("project", "conv", [src], out=k, kernel=1), node("project_bn", "bn", ["project"])]
    if stride == 1 and c == k:
        nodes.append(node("res", "add", ["project_bn", "x"]))
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def bottleneck(
    *,
    n: int,
    c: int,
    k: int,
    in_size: tuple[int, int],
    width: int,
    stride: int = 1,
    groups: int = 1,
    act: str = "relu",
    attention: str | None = "eca",
    eca_kernel: int | None = None,
    se_hidden: int | None = None,
    downsample: bool | None = None,
    avg_down: bool = False,
    dtype: str = "float32",
) -> Block:
    """ResNet bottleneck (timm Bottleneck; ECA-ResNet with attention='eca', SE-ResNet with 'se'): [downsample 1x1
    (s) -> BN] then conv1 1x1 -> BN -> act -> conv2 3x3 (s, groups) -> BN -> act -> conv3 1x1 -> BN [-> ECA | SE]
    -> + shortcut -> act. The downsample chain (default: when stride > 1 or c != k) comes first in node order, so
    the gate, the residual add and the last act are consecutive (one gate_ep step). avg_down: ResNet-D's shortcut
    (timm downsample_avg), AvgPool2d(2, s, ceil_mode=True, count_include_pad=False) when s > 1 -> 1x1 -> BN. ECA's
    kernel defaults to ECA-Net's adaptive size of k; SE's hidden to k // 16 (timm SEModule)."""
    if attention not in ("se", "eca", None):
        raise SpecError(f"attention must be 'se', 'eca' or None, got {attention!r}")
    downsample = stride != 1 or c != k if downsample is None else downsample
    if not downsample and (stride != 1 or c != k):
        raise SpecError(f"a bottleneck of stride {stride} from {c} to {k} channels needs a downsample shortcut")
    nodes: list[Node] = []
    shortcut = INPUT
    if downsample:
        src, conv_stride = "x", stride
        if avg_down and stride > 1:
            nodes.append(node("down_pool", "avgpool", ["x"], kernel=2, stride=stride, ceil_mode=True,
                              count_include_pad=False))  # fmt: skip
            src, conv_stride = "down_pool", 1
        nodes += [
            node("downsample", "conv", [src], out=k, kernel=1, stride=conv_stride),
            node("downsample_bn", "bn", ["downsample"]),
        ]
        shortcut = "downsample_bn"
    nodes += [
        node("conv1", "conv", ["x"], out=width, kernel=1),
        node("bn1", "bn", ["conv1"]),
        node("act1", "act", ["bn1"], fn=act),
        node("conv2", "conv", ["act1"], out=width, kernel=3, stride=stride, padding=1, groups=groups),
        node("bn2", "bn", ["conv2"]),
        node("act2", "act", ["bn2"], fn=act),
        node("conv3", "conv", ["act2"], out=k, kernel=1),
        node("bn3", "bn", ["conv3"]),
    ]
    src = "bn3"
    if attention == "eca":
        nodes.append(node("attn", "eca", [src], kernel=eca_kernel or adaptive_eca_kernel(k)))
        src = "attn"
    elif attention == "se":
        nodes.append(node("attn", "se", [src], hidden=se_hidden or max(1, k // 16)))
        src = "attn"
    nodes += [node("add", "add", [src, shortcut]), node("act3", "act", ["add"], fn=act)]
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def inception_dw(
    *,
    n: int,
    c: int,
    in_size: tuple[int, int],
    square_kernel: int = 3,
    band_kernel: int = 11,
    branch_ratio: float = 0.125,
    dtype: str = "float32",
) -> Block:
    """InceptionNeXt token mixer (timm InceptionDWConv2d): gc = int(c * branch_ratio) channels each through a
    square dw k x k, a 1 x band and a band x 1 depthwise conv (all with bias), the first c - 3 gc channels
    kept: concat(x_id, dwconv_hw(x_hw), dwconv_w(x_w), dwconv_h(x_h)). Conv node names are timm's."""
    if not isinstance(branch_ratio, float) or not 0.0 < branch_ratio <= 1 / 3:
        raise SpecError(f"branch_ratio must be a float in (0, 1/3], got {branch_ratio!r}")
    for name, k in (("square_kernel", square_kernel), ("band_kernel", band_kernel)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise SpecError(f"{name} must be an odd int >= 1 (same-size output), got {k!r}")
    gc = int(c * branch_ratio)
    if gc < 1:
        raise SpecError(f"c={c} x branch_ratio={branch_ratio} leaves no channels for the conv branches")
    cid = c - 3 * gc
    nodes: list[Node] = []
    cat: list[str] = []
    if cid:
        nodes.append(node("x_id", "split", ["x"], start=0, size=cid))
        cat.append("x_id")
    sq, band = square_kernel // 2, band_kernel // 2
    branches = (("hw", square_kernel, sq), ("w", (1, band_kernel), (0, band)), ("h", (band_kernel, 1), (band, 0)))
    for i, (tag, kernel, pad) in enumerate(branches):
        nodes += [
            node(f"x_{tag}", "split", ["x"], start=cid + i * gc, size=gc),
            node(f"dwconv_{tag}", "conv", [f"x_{tag}"], out=gc, kernel=kernel, padding=pad, groups=gc, bias=True),
        ]
        cat.append(f"dwconv_{tag}")
    nodes.append(node("cat", "concat", cat))
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def adaptive_eca_kernel(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """ECA-Net's kernel size for a channel count (timm EcaModule's formula): odd, >= 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def aspp(
    *,
    n: int,
    c: int,
    in_size: tuple[int, int],
    k: int = 256,
    rates: tuple[int, ...] = (6, 12, 18),
    pooling: bool = True,
    project: bool = True,
    act: str = "relu",
    dtype: str = "float32",
) -> Block:
    """DeepLabV3 ASPP (torchvision ASPP): concat of a 1x1 conv, one dilated 3x3 conv per rate (padding = rate)
    and image pooling (global mean -> 1x1 conv -> broadcast), each conv -> BN -> act, all to k channels; then
    [1x1 project -> BN -> act]. The pooling chain comes first in node order so the branches that share the
    input's reads are consecutive."""
    if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
        raise SpecError(f"rates must be ints >= 1, got {rates!r}")
    nodes: list[Node] = []
    cat: list[str] = []

    def branch(name: str, src: str, **conv: Any) -> str:
        nodes.extend(
            [
                node(name, "conv", [src], out=k, **conv),
                node(f"{name}_bn", "bn", [name]),
                node(f"{name}_act", "act", [f"{name}_bn"], fn=act),
            ]
        )
        return f"{name}_act"

    if pooling:
        nodes.append(node("pool", "gap", ["x"]))
        pooled = branch("pool_conv", "pool", kernel=1)
    cat.append(branch("b0", "x", kernel=1))
    for i, r in enumerate(rates, 1):
        cat.append(branch(f"b{i}", "x", kernel=3, padding=r, dilation=r))
    if pooling:
        nodes.append(node("pool_up", "broadcast", [pooled], size=tuple(in_size)))
        cat.append("pool_up")
    nodes.append(node("cat", "concat", cat))
    if project:
        branch("project", "cat", kernel=1)
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)


def gnconv(
    *,
    n: int,
    c: int,
    in_size: tuple[int, int],
    order: int = 3,
    kernel: int = 7,
    scale: float | None = 1.0,
    dtype: str = "float32",
) -> Block:
    """HorNet's recursive gated convolution (gnConv, official code): dims = [c / 2^(order-1), ..., c / 2, c];
    proj_in 1x1 (c -> 2c, bias) split into pwa (dims[0]) and abc (sum(dims)); abc through a k x k depthwise conv
    (bias) [times scale], split by dims into d_0..d_{order-1}; y = pwa * d_0, then y = pws_i(y) * d_{i+1} (1x1
    dims[i] -> dims[i+1], bias); proj_out 1x1 (c -> c, bias). Node order is that of the traced module."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise SpecError(f"order must be an int >= 1, got {order!r}")
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise SpecError(f"kernel must be an odd int >= 1 (same-size output), got {kernel!r}")
    if not isinstance(c, int) or c < 1 or c % 2 ** (order - 1):
        raise SpecError(f"c={c!r} must be a positive multiple of 2^(order-1) = {2 ** (order - 1)}")
    dims = [c // 2**i for i in range(order)][::-1]
    total = sum(dims)
    nodes = [
        node("proj_in", "conv", ["x"], out=2 * c, kernel=1, bias=True),
        node("abc", "split", ["proj_in"], start=dims[0], size=total),
        node("dwconv", "conv", ["abc"], out=total, kernel=kernel, padding=kernel // 2, groups=total, bias=True),
    ]
    dw = "dwconv"
    if scale is not None:
        nodes.append(node("dw_scale", "scalar", ["dwconv"], value=float(scale)))
        dw = "dw_scale"
    nodes += [
        node("pwa", "split", ["proj_in"], start=0, size=dims[0]),
        node("dw0", "split", [dw], start=0, size=dims[0]),
        node("gate0", "mul", ["pwa", "dw0"]),
    ]
    for i in range(order - 1):
        nodes += [
            node(f"pws{i}", "conv", [f"gate{i}"], out=dims[i + 1], kernel=1, bias=True),
            node(f"dw{i + 1}", "split", [dw], start=sum(dims[: i + 1]), size=dims[i + 1]),
            node(f"gate{i + 1}", "mul", [f"pws{i}", f"dw{i + 1}"]),
        ]
    nodes.append(node("proj_out", "conv", [f"gate{order - 1}"], out=c, kernel=1, bias=True))
    return Block(n=n, c=c, in_size=tuple(in_size), nodes=tuple(nodes), dtype=dtype)
