"""tunerd.patch(model, server=...): patch a model and take its kernels from a tunerd daemon.

The model's convolutions are swapped as by tunerd.patch, and every one of them then runs the
schedule the server tuned for this device, rendered by this process (the server's source must be
byte-identical to that rendering: kernels.trust), or the default schedule where the server has
none, is unreachable, or answers anything else. Given an example input, all of the model's specs
are fetched in one batch request before the first training step.

tunerd.patch(model, bundle=FILE) takes the kernels' schedules from a bundle file instead (or, with
server= too, where the server has none): with ed25519 keys pinned (trusted_keys=, else
$TUNERD_TRUSTED_KEYS) only a bundle signed by one of them is used; any other runs default schedules and
the report says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunerd.kernels.spec import BlockSpec

from .client import BundleAnswers, BundleLookup, Client, KeyArg, RemoteLookup, install, install_bundle
from .patching import PatchReport, kernel_sources, patch


@dataclass
class RemotePatchReport(PatchReport):
    """PatchReport plus what the server answered for the prefetched specs."""

    server: str = ""
    snapshot: str | None = None
    prefetched: int = 0
    hits: int = 0
    misses: int = 0
    borrowed: int = 0  # misses answered with a nearby shape's winner until the exact shape is tuned
    lookup: RemoteLookup | BundleLookup | None = field(default=None, repr=False, compare=False)
    bundle: BundleAnswers | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        lines = [super().__str__()]
        if self.server:
            line = f"tunerd server {self.server}" + (f" snapshot {self.snapshot}" if self.snapshot else "")
            if self.prefetched:
                line += f": {self.prefetched} specs prefetched, {self.hits} tuned, {self.misses} on default schedules"
                if self.borrowed:
                    line += f", {self.borrowed} on a nearby shape's winner until their own is tuned"
            lines.append(line)
        if self.bundle is not None:
            lines.append(self.bundle.error or f"tunerd {self.bundle!r}")
        return "\n".join(lines)


def model_specs(model: nn.Module, example_input: Any, lookup: RemoteLookup) -> list[tuple[BlockSpec, torch.device]]:
    """The (spec, device) of every tunerd kernel one step of model(example_input) launches.

    A model in training mode runs forward and backward (so the dgrad/wgrad kernels are found too),
    an eval model forward only under no_grad; all on default schedules. Nothing of the model
    changes: buffers (BatchNorm running statistics), parameter gradients and the RNG state are
    restored afterwards."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda = sorted({t.device for t in [*params, *model.buffers()] if t.device.type == "cuda"}, key=str)
    train = model.training and any(p.requires_grad for p in params)
    lookup.recording = []
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(train):
            out = model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
            if train:
                leaves = [t for t in _tensors(out) if t.requires_grad]
                if leaves:
                    torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
        return list(lookup.recording)
    finally:
        lookup.recording = None
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a forward's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def patch_remote(
    model: nn.Module,
    server: str | Client,
    snapshot: str | None = None,
    token: str | None = None,
    example_input: Any = None,
    *,
    bundle: str | os.PathLike[str] | bytes | None = None,
    trusted_keys: KeyArg = None,
    **patch_options: Any,
) -> RemotePatchReport:
    """Patch model in place (see tunerd.patch) and serve its kernels from the tunerd daemon at server.

    server: a URL or a Client. example_input: a tensor (or tuple of forward arguments) of the real
    shapes; when given, every spec of the model is looked up in one request now. bundle: a bundle file
    that answers where the server cannot (Client's bundle=, read with trusted_keys pinned).
    """
    client = (
        server if isinstance(server, Client) else Client(server, token=token, bundle=bundle, trusted_keys=trusted_keys)
    )
    hook = install(client, snapshot=snapshot)
    base = patch(model, **patch_options)
    report = RemotePatchReport(
        swapped=base.swapped,
        fused=base.fused,
        left=base.left,
        blocks=base.blocks,
        server=client.url,
        snapshot=snapshot,
        lookup=hook,
        bundle=client.bundle,
    )
    if example_input is not None:
        by_device: dict[str, list[BlockSpec]] = {}
        for spec, device in model_specs(model, example_input, hook):
            by_device.setdefault(str(device), []).append(spec)
        for name, specs in by_device.items():
            counts = hook.prefetch(specs, torch.device(name))
            report.prefetched += counts["hits"] + counts["misses"] + counts["borrowed"]
            report.hits += counts["hits"]
            report.misses += counts["misses"]
            report.borrowed += counts["borrowed"]
        report.kernels = kernel_sources(model, example_input)  # per conv and block: served winner or default
    return report


def patch_bundle(
    model: nn.Module, bundle: str | os.PathLike[str] | bytes, trusted_keys: KeyArg = None, **patch_options: Any
) -> RemotePatchReport:
    """Patch model in place (see tunerd.patch) and take its kernels' schedules from a bundle file, no server:
    read as `tunerd import` reads it, with trusted_keys pinned (None: $TUNERD_TRUSTED_KEYS). A refused
    bundle leaves every conv on its default schedule; report.bundle.error says why."""
    hook = install_bundle(bundle, trusted_keys)
    base = patch(model, **patch_options)
    return RemotePatchReport(swapped=base.swapped, fused=base.fused, left=base.left, lookup=hook, bundle=hook.answers)
