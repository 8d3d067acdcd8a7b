"""tunerd: generated, autotuned Triton kernels for convolution blocks.

The distribution installs only this name: the repository's top-level `kernels/`, `schedules/` and
`db/` folders are its subpackages `tunerd.kernels`, `tunerd.schedules` and `tunerd.db`.
Importing anything under `tunerd` first runs `tunerd.kernels`, which is the one place that
chooses Triton's interpreter on a CPU-only machine (it must happen before triton is imported).
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING

# A source checkout used without `pip install` (PYTHONPATH=. on a bare GPU box): map the
# top-level folders in as the installed wheel does. An installed tunerd has them inside already.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's own __path__)

from . import kernels as _kernels  # noqa: E402,F401  (interpreter choice before anything imports triton)

__version__ = "0.1.0"
__all__ = ["Client", "PatchReport", "functional", "install", "nn", "patch", "unpatch", "__version__"]


def patch(
    model,
    *,
    server: str | None = None,
    snapshot: str | None = None,
    token: str | None = None,
    example_input=None,
    bundle=None,
    trusted_keys=None,
    **options,
) -> PatchReport:
    """Swap a model's torch convolutions for tunerd ones in place (see tunerd.patching.patch).

    With server=URL the kernels come from a tunerd daemon (optionally pinned to a snapshot), with
    the local store and the default schedule as fallbacks when it is unreachable. With bundle=FILE
    they come from a bundle file (alone, or where the server has none); with ed25519 keys pinned
    (trusted_keys=[key files], else $TUNERD_TRUSTED_KEYS) only a bundle signed by one is used.
    """
    if server is None and bundle is None:
        from .patching import patch as patch_local

        return patch_local(model, **options)
    from .remote import patch_bundle, patch_remote

    if server is None:
        return patch_bundle(model, bundle, trusted_keys, **options)
    return patch_remote(
        model,
        server,
        snapshot=snapshot,
        token=token,
        example_input=example_input,
        bundle=bundle,
        trusted_keys=trusted_keys,
        **options,
    )


_LAZY = {
    "functional": None,
    "nn": None,
    "PatchReport": "patching",
    "unpatch": "patching",
    "Client": "client",
    "install": "client",
}


def __getattr__(name: str):
    # Loaded on first use, so `tunerd.kernels` and `tunerd.schedules` stay light in measurement workers
    # (and the HTTP client, which needs httpx, loads only when asked for).
    if name not in _LAZY:
        raise AttributeError(f"module 'tunerd' has no attribute {name!r}")
    from importlib import import_module

    module = import_module(f".{_LAZY[name] or name}", __name__)
    return module if _LAZY[name] is None else getattr(module, name)


if TYPE_CHECKING:
    from .patching import PatchReport
