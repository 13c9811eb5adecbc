"""CUDA kernels: the sources of ``cuda_kernels/`` compiled with NVRTC, cached, and launched on torch's stream.

Importing this package needs neither CuPy nor a GPU; they are looked for when a kernel is first compiled or
launched, and :class:`KernelUnavailableError` names what is missing.
"""

from . import driver
from .launch import Int64, launch
from .loader import (
    DTYPE_CODES,
    ENTRY_POINTS,
    KernelsNotLoadedError,
    KernelUnavailableError,
    compile_source,
    kernels_unavailable_reason,
    load_modules,
    matmul_entry_point,
)

__all__ = [
    "DTYPE_CODES",
    "ENTRY_POINTS",
    "Int64",
    "KernelUnavailableError",
    "KernelsNotLoadedError",
    "compile_source",
    "driver",
    "kernels_unavailable_reason",
    "launch",
    "load_modules",
    "matmul_entry_point",
]
