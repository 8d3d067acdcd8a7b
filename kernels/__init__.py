"""tunerd kernel generator: block specs, Triton templates, launch runtime, torch oracles.

Imports only torch, triton, numpy (and Jinja2 for templates), so it runs on a bare GPU box.
"""
import os as _os

if "TRITON_INTERPRET" not in _os.environ and "triton" not in __import__("sys").modules:
    # CPU-only box: run every kernel through Triton's interpreter. It must be chosen before
    # triton is imported, since triton.language's own @jit helpers are built at import.
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from .generator import GENERATOR_VERSION, Variant, render
from .schedule import Schedule, ScheduleError
from .spec import BlockSpec, Epilogue, SpecError, conv_spec

__all__ = ["BlockSpec", "Epilogue", "GENERATOR_VERSION", "Schedule", "ScheduleError", "SpecError", "Variant",
           "conv_spec", "render"]
