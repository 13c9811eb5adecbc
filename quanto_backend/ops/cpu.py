"""CPU implementations of the quantized matmul ops, on the packed-weight kernels PyTorch ships.

* ``linear_w8`` (int8 weights) and ``linear_a8w8`` (int8 x int8): ``torch._weight_int8pack_mm``, which reads the
  int8 weight as it is stored.
* ``linear_affine`` (4-bit and 2-bit weights): ``torch._weight_int4pack_mm_for_cpu``, which needs its own packed
  layout and its own ``scale_and_zeros`` (``w = (q - 8) * scale + zero``, ``[n_groups, out, 2]``). The weight is
  converted at its first use and cached (see :func:`_int4_weight`); the module's state keeps the documented format.

Both kernels are fast only with bfloat16 activations (float32 and float16 take a path 10-20x slower than a float
matmul). Numerics, chosen here once:

* bfloat16 activations always take the kernel (on CPUs without native bfloat16 matmul it beats the reference at
  every M; the reference itself computes in bfloat16 there).
* float32 and float16 activations are rounded to bfloat16 for the kernel, and its bfloat16 output cast back, for
  up to :func:`kernel_max_rows` rows (decode and small batches, where the kernel wins); more rows take the exact
  reference (dequantize, then a float matmul that is compute-bound and amortizes it). The rounding
  adds a relative error of about 2**-9 per activation and per output, well below the weight quantization error
  (about 1% for int8 per-axis, more for 4-bit), and ``tests/test_cpu_kernels.py`` bounds it against the reference.
* int8 x int8: int8 codes are exact in bfloat16 and the kernel accumulates in float32, so only the output is
  rounded to bfloat16 before the float32 scales are applied; it takes the kernel at every M (the reference
  accumulates in float64 and is far slower).

Anything a kernel cannot run (odd shapes, group sizes, dtypes, no rows) takes :mod:`.reference`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import library, reference

__all__ = ["INT4_GROUP_SIZES", "clear_cache", "kernel_max_rows"]

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# _weight_int8pack_mm returns wrong values (M == 1) or crashes (M > 1) when in_features is not a multiple of 8.
_INT8_IN_MULTIPLE = 8
_INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
_CAST_DTYPES = (torch.float32, torch.float16)
_INT2_CODE_OFFSET = 6  # 2-bit codes 0..3 become 4-bit codes 6..9 (see _int4_weight)


def kernel_max_rows(out_features: int, in_features: int, bits: int) -> int:
    """Rows of float32/float16 activations up to which the kernel for a ``bits``-wide weight beats the reference.

    The reference dequantizes the whole weight at every call, then runs a float matmul that is faster per row than
    the kernels: its fixed cost is amortized over the rows. The crossovers measured by ``bench/cpu_dispatch.py`` (2
    AVX2 cores, weights from 384x384 to 4096x14336, several runs) grow with the weight's size: from 8-32 rows
    (384x384) to 128-256 (4096x14336) for int8, from 64-128 to 128-256 for 4-bit (whose reference also unpacks the
    codes). The bound follows the square root of the size, on the low side of those ranges.
    """
    root = math.isqrt(out_features * in_features)
    return max(1, min(128, root // (32 if bits == 8 else 16)))


def _kernel_input(x: torch.Tensor, max_rows: int) -> torch.Tensor | None:
    """``x`` as the contiguous 2-D bfloat16 matrix the kernels take, or ``None`` where the reference is better.

    ``max_rows`` bounds the rows of float32/float16 activations (rounded to bfloat16).
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return None
    if x.dtype == torch.bfloat16:
        return x.reshape(rows, x.shape[-1]).contiguous()
    if x.dtype in _CAST_DTYPES and rows <= max_rows:
        return x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
    return None


def _per_row_scale(weight_scale: torch.Tensor, out_features: int) -> bool:
    return weight_scale.numel() == out_features and weight_scale.is_floating_point()


def _int8pack_ok(weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.shape[1] % _INT8_IN_MULTIPLE == 0
        and _per_row_scale(weight_scale, weight.shape[0])
    )


@functools.cache
def _ones(n: int) -> torch.Tensor:
    """The unit bfloat16 scales under which ``_weight_int8pack_mm`` returns the bare dot products (never written)."""
    with torch.inference_mode(False):
        return torch.ones(n, dtype=torch.bfloat16)


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)


@torch.library.register_kernel(library.linear_w8, "cpu")
def _linear_w8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    ok = _int8pack_ok(weight, weight_scale)
    x2d = _kernel_input(x, kernel_max_rows(*weight.shape, 8)) if ok else None
    if x2d is None:
        return reference.linear_w8(x, weight, weight_scale, bias)
    scale = weight_scale.reshape(-1)
    if scale.dtype == torch.bfloat16:
        out = torch._weight_int8pack_mm(x2d, weight.contiguous(), scale)
    else:
        # A float32/float16 scale applied after the kernel (bfloat16 x float32 promotes to float32) is not rounded
        # to bfloat16.
        out = torch._weight_int8pack_mm(x2d, weight.contiguous(), _ones(weight.shape[0])) * scale.float()
    return _with_bias(out.to(x.dtype).view(*x.shape[:-1], weight.shape[0]), bias)


@torch.library.register_kernel(library.linear_a8w8, "cpu")
def _linear_a8w8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x_q.dtype != torch.int8 or not _int8pack_ok(weight, weight_scale):
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    rows = x_q.numel() // x_q.shape[-1] if x_q.shape[-1] else 0
    if rows == 0:
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    x2d = x_q.reshape(rows, x_q.shape[-1]).to(torch.bfloat16)  # |codes| <= 128: exact in bfloat16
    acc = torch._weight_int8pack_mm(x2d, weight.contiguous(), _ones(weight.shape[0]))
    out = acc.view(*x_q.shape[:-1], weight.shape[0]).float() * x_scale.float() * weight_scale.float().reshape(-1)
    return _with_bias(out.to(out_dtype), bias)


@dataclass
class _Int4Weight:
    """A weight converted for ``_weight_int4pack_mm_for_cpu``, and what it was converted from."""

    packed: torch.Tensor
    scale_and_zeros: torch.Tensor
    sources: tuple  # _sources() at conversion: any change (in-place write, new scale storage) misses the cache


# Keyed by the weight's storage object (PyTorch keeps one Python object per live storage): an entry goes away with
# its storage, so `.to(device)`, reloading or deleting a model frees it, and a new storage can never hit an old
# entry. Under torch.compile the op stays opaque and this code runs on the real tensors, so the cache works alike.
# Caveat, as for any version-counter check: writes through ``.data`` are not seen (use ``copy_`` under no_grad).
_INT4_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _layout(t: torch.Tensor) -> tuple:
    # Inference tensors have no version counter (they cannot be written in place outside inference mode).
    version = None if t.is_inference() else t._version
    return (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, version)


def _sources(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple:
    # The scale and shift storages are held by the entry (they are small), so their identity stays meaningful; the
    # weight's storage is the cache key and must not be held, or the entry would never be collected.
    return (_layout(weight), scale.untyped_storage(), _layout(scale), shift.untyped_storage(), _layout(shift))


def _same_sources(a: tuple, b: tuple) -> bool:
    return all(x is y if isinstance(x, torch.UntypedStorage) else x == y for x, y in zip(a, b, strict=True))


def clear_cache() -> None:
    """Drop every cached 4-bit weight conversion (each is rebuilt at its next use)."""
    _INT4_CACHE.clear()


def _int4_weight(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> _Int4Weight:
    """The converted weight, from the cache, or converted now and cached.

    The kernel computes ``(q' - 8) * scale + zero`` with ``scale`` and ``zero`` in bfloat16; ours is ``(q - shift) *
    scale``. 4-bit codes are used as they are (``q' = q``); 2-bit codes are moved to the middle of the 4-bit range
    (``q' = q + 6``) so that ``zero = (8 - q' + q - shift) * scale`` stays small, and with it its bfloat16 rounding
    error, which every weight of the group shares.
    """
    storage, sources = weight.untyped_storage(), _sources(weight, scale, shift)
    entry = _INT4_CACHE.get(storage)
    if entry is not None and _same_sources(entry.sources, sources):
        return entry
    offset = 0 if bits == 4 else _INT2_CODE_OFFSET
    codes = reference.unpack(weight, bits).to(torch.int32) + offset
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)  # inner_k_tiles: ignored by the CPU layout
    zero = (8.0 - offset - shift.float()) * scale.float()
    scale_and_zeros = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    entry = _Int4Weight(packed, scale_and_zeros, sources)
    _INT4_CACHE[storage] = entry
    return entry


@torch.library.register_kernel(library.linear_affine, "cpu")
def _linear_affine(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shift: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    out_features, padded_in = weight.shape[0], weight.shape[-1] * 8 // bits
    n_groups = weight_scale.shape[-1]
    group_size = padded_in // n_groups if n_groups else 0
    ok = (
        bits in (2, 4)
        and weight.dim() == 2
        and out_features % _INT4_OUT_MULTIPLE == 0
        and group_size in INT4_GROUP_SIZES
        and group_size * n_groups == padded_in
        and weight_scale.shape == weight_shift.shape == (out_features, n_groups)
        and x.shape[-1] <= padded_in
    )
    x2d = _kernel_input(x, kernel_max_rows(out_features, padded_in, bits)) if ok else None
    if x2d is None:
        return reference.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)
    converted = _int4_weight(weight, weight_scale, weight_shift, bits)
    if x2d.shape[1] < padded_in:
        x2d = F.pad(x2d, (0, padded_in - x2d.shape[1]))  # zero inputs meet the padding codes
    out = torch._weight_int4pack_mm_for_cpu(x2d, converted.packed, group_size, converted.scale_and_zeros)
    return _with_bias(out.to(x.dtype).view(*x.shape[:-1], out_features), bias)
