"""tunerd kernel generator: block specs, Triton templates, launch runtime, torch oracles.

Imports only torch, triton, numpy (and Jinja2 for templates), so it runs on a bare GPU box.
"""

import os as _os
import sys as _sys


def select_interpreter() -> None:
    """The one interpreter switch: on a CPU-only machine run every kernel through Triton's interpreter.

    It must happen before triton is imported (triton.language builds its own @jit helpers at import),
    so importing anything under `tunerd` calls it first. An explicit TRITON_INTERPRET wins; a process
    that imported triton before tunerd gets a clear error from the runtime when it launches on CPU.
    """
    if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
        import torch

        if not torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"


select_interpreter()

from .generator import GENERATOR_VERSION, Variant, render
from .schedule import Schedule, ScheduleError
from .spec import BlockSpec, Epilogue, SpecError, conv_spec

__all__ = [
    "BlockSpec",
    "Epilogue",
    "GENERATOR_VERSION",
    "Schedule",
    "ScheduleError",
    "SpecError",
    "Variant",
    "conv_spec",
    "render",
    "select_interpreter",
]
