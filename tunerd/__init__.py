"""tunerd: generated, autotuned Triton kernels for convolution blocks."""
from __future__ import annotations

import kernels as _kernels  # noqa: F401  (chooses the Triton interpreter on CPU-only machines first)

from . import functional, nn
from .patch import PatchReport, unpatch
from .patch import patch as _patch_local

__version__ = "0.1.0"
__all__ = ["Client", "PatchReport", "functional", "install", "nn", "patch", "unpatch", "__version__"]


def patch(model, *, server: str | None = None, snapshot: str | None = None, token: str | None = None,
          example_input=None, **options) -> PatchReport:
    """Swap a model's torch convolutions for tunerd ones in place (see tunerd.patch.patch).

    With server=URL the kernels come from a tunerd daemon (optionally pinned to a snapshot), with
    the local store and the default schedule as fallbacks when it is unreachable.
    """
    if server is None:
        return _patch_local(model, **options)
    from .remote import patch_remote

    return patch_remote(model, server, snapshot=snapshot, token=token, example_input=example_input, **options)


def __getattr__(name: str):
    # The HTTP client needs httpx; load it only when asked for.
    if name in ("Client", "install"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'tunerd' has no attribute {name!r}")
