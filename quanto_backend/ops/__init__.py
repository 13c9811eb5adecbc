"""The operator seam: ``torch.ops.quanto_backend.*`` custom ops (see :mod:`.library`)."""

from .library import (
    dequantize_affine,
    dequantize_symmetric,
    linear_a8w8,
    linear_affine,
    linear_w8,
    pack,
    quantize_affine,
    quantize_per_token,
    quantize_symmetric,
    unpack,
)

__all__ = [
    "dequantize_affine",
    "dequantize_symmetric",
    "linear_a8w8",
    "linear_affine",
    "linear_w8",
    "pack",
    "quantize_affine",
    "quantize_per_token",
    "quantize_symmetric",
    "unpack",
]
