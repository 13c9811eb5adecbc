"""Compatibility with optimum-quanto: its names, signatures and checkpoints, on top of the core.

Everything here may import from the rest of the package; nothing else imports this (the core keeps one
vocabulary). Importing it registers :func:`~quanto_backend.compat.checkpoints.read_quanto_checkpoint`, so that
:func:`~quanto_backend.requantize` and every loader built on it read optimum-quanto's checkpoints.
See the README section "Migrating from optimum-quanto" for what stays different.
"""

from ..quantize import register_checkpoint_reader
from .checkpoints import is_quanto_checkpoint, read_quanto_checkpoint
from .tensors import (
    ActivationQBytesTensor,
    MaxOptimizer,
    QBitsTensor,
    QBytesTensor,
    WeightQBitsTensor,
    WeightQBytesTensor,
    absmax_scale,
    quantize_weight,
)

register_checkpoint_reader(read_quanto_checkpoint)

__all__ = [
    "ActivationQBytesTensor",
    "MaxOptimizer",
    "QBitsTensor",
    "QBytesTensor",
    "WeightQBitsTensor",
    "WeightQBytesTensor",
    "absmax_scale",
    "is_quanto_checkpoint",
    "quantize_weight",
    "read_quanto_checkpoint",
]
