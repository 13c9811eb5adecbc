"""The operator seam: ``torch.ops.quanto_backend.*`` custom ops (see :mod:`.library`)."""

from . import cpu, cuda  # noqa: F401  (register the CPU and CUDA kernels of the ops)
from .cpu import aligned
from .cuda import warmup
from .library import (
    dequantize_affine,
    dequantize_asymmetric,
    dequantize_symmetric,
    linear_a8w8,
    linear_a8w8_asymmetric,
    linear_affine,
    linear_w8,
    linear_w8_asymmetric,
    pack,
    quantize_affine,
    quantize_asymmetric,
    quantize_per_token,
    quantize_symmetric,
    unpack,
    weight_row_sums,
)

__all__ = [
    "aligned",
    "dequantize_affine",
    "dequantize_asymmetric",
    "dequantize_symmetric",
    "linear_a8w8",
    "linear_a8w8_asymmetric",
    "linear_affine",
    "linear_w8",
    "linear_w8_asymmetric",
    "pack",
    "quantize_affine",
    "quantize_asymmetric",
    "quantize_per_token",
    "quantize_symmetric",
    "unpack",
    "warmup",
    "weight_row_sums",
]
