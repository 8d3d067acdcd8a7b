"""tunerd: generated, autotuned Triton kernels for convolution blocks."""
import kernels as _kernels  # noqa: F401  (chooses the Triton interpreter on CPU-only machines first)

from . import functional

__version__ = "0.1.0"
__all__ = ["functional", "__version__"]
