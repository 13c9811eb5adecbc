"""CPU implementations of the quantized matmul ops: PyTorch's packed-weight kernels where their contracts hold and
they are faster, a dequantizing path elsewhere, and :mod:`.reference` for what neither takes.

* ``linear_w8`` (int8 weights): ``torch._weight_int8pack_mm``, which reads the int8 weight as it is stored, for a
  few rows; beyond, for large layers where :data:`INT_MM` holds, ``torch._int_mm`` on the activations split into
  int8 slices (:func:`_int8_slices`, the Ozaki scheme), which runs on the CPU's int8 matrix units (AMX, VNNI).
* ``linear_affine`` (4-bit and 2-bit weights): ``torch._weight_int4pack_mm_for_cpu``, which needs its own packed
  layout and its own ``scale_and_zeros`` (``w = (q - 8) * scale + zero``, ``[n_groups, out, 2]``). The weight is
  converted at its first use and cached (see :func:`_int4_weight`); the module's state keeps the documented format.
* ``linear_a8w8`` (int8 x int8): ``_weight_int8pack_mm`` for the rows where it is faster; beyond, exact sums:
  ``torch._int_mm`` where :data:`INT_MM` holds (the weight as its first operand where :data:`INT_MM_WEIGHT_FIRST`
  does), else float32 matmuls of the codes (:func:`_int8_sums`).

Every private kernel runs only inside its :class:`KernelContract` (CPU kind, shapes, alignment), checked
before the call. Numerics, chosen here once:

* Both packed kernels are fast only with bfloat16 activations (float32 and float16 take a path 10-20x slower than
  a float matmul): float32 and float16 activations are rounded to bfloat16 for them, and the bfloat16 output cast
  back. The rounding adds a relative error of about 2**-9 per activation and per output, well below the weight
  quantization error (about 1% for int8 per-axis, more for 4-bit); ``tests/test_cpu_kernels.py`` bounds it.
* Beyond :func:`kernel_max_rows` rows (a table per CPU kind, :func:`cpu_kind`), and wherever a contract does not
  hold, the dequantizing path (:func:`_blockwise_linear`) computes what the reference does, in the activation
  dtype, block by block of output channels.
* int8 x int8 through ``_weight_int8pack_mm``: the codes are exact in bfloat16 and the kernel accumulates in
  float32, so only its output is rounded to bfloat16 before the float32 scales are applied.

float8 weights (e4m3fn, e5m2) take the dequantizing path, their codes converted through float16 bits
(:func:`float8_into`); float8 x float8 multiplies the converted values in float32 (:func:`_float8_sums`).
Anything no path takes (other weight or activation dtypes, no rows, mismatched shapes) takes :mod:`.reference`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import library, reference
from .float8 import FLOAT8_VIA_HALF_FACTOR, float8_into, has_nan_codes

__all__ = [
    "INT4PACK",
    "INT4_GROUP_SIZES",
    "INT8PACK",
    "INT_MM",
    "INT_MM_WEIGHT_FIRST",
    "KernelContract",
    "a8w8_kernel_max_rows",
    "aligned",
    "clear_cache",
    "int_mm_is_exact",
    "kernel_max_rows",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
_CAST_DTYPES = (torch.float32, torch.float16)  # rounded to bfloat16 for the packed kernels
_ACTIVATION_DTYPES = (torch.bfloat16, *_CAST_DTYPES)
_INT2_CODE_OFFSET = 6  # 2-bit codes 0..3 become 4-bit codes 6..9 (see _int4_weight)
# What PyTorch's CPU allocator gives every fresh tensor; storage loaded from a checkpoint (safetensors gives 4- or
# 8-byte aligned views into one buffer) is copied to it once, at load (see QModuleMixin.align_storage).
ALIGNMENT = 64


@functools.cache
def cpu_kind() -> str:
    """The CPU as the contracts and tables here know it: ``torch.backends.cpu.get_cpu_capability()`` ("AVX2",
    "AVX512", ...), with ``_AMX`` appended where the CPU has AMX tiles. Sapphire Rapids and Zen 4 both report
    "AVX512", but on the first oneDNN's bfloat16 and int8 matmuls run on AMX (bfloat16 ``F.linear`` of 32 rows by
    4096 x 14336: 7.3 ms there, 13.4 ms on Zen 4): a crossover measured on one says nothing about the other."""
    capability = torch.backends.cpu.get_cpu_capability()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent from some torch builds
    return f"{capability}_AMX" if has_amx is not None and has_amx() else capability


@dataclass(frozen=True)
class KernelContract:
    """The inputs on which a private PyTorch CPU kernel was measured correct, checked before every call.

    Read off ``bench/cpu_contracts.py`` (crash-contained probes of shapes, dtypes and storage offsets; results in
    ``bench/results/cpu_contracts-<kind>.json``) and off the kernels' sources. Outside the contract, and on
    any CPU kind it was not measured on, a path without the kernel runs.
    """

    kinds: frozenset[str]  # cpu_kind() values it was measured on
    in_multiple: int  # in_features must be a multiple of this
    out_multiple: int  # out_features must be a multiple of this
    alignment: int  # bytes, of the data pointers of the activations and of the weight
    # Run once on the machine itself (cached), where the CPU kind alone does not settle correctness.
    verified: Callable[[], bool] | None = None

    def holds(self) -> bool:
        return cpu_kind() in self.kinds and (self.verified is None or self.verified())

    def admits_weight(self, weight: torch.Tensor) -> bool:
        return (
            self.holds()
            and weight.dim() == 2
            and weight.shape[1] % self.in_multiple == 0
            and weight.shape[0] % self.out_multiple == 0
            and weight.is_contiguous()
            and weight.data_ptr() % self.alignment == 0
        )


# torch._weight_int8pack_mm, bfloat16 activations (its float32/float16 paths are scalar loops, 10-20x slower):
# * AVX-512: aligned 32-byte loads of 16 activations and 16-byte loads of 16 weights, no tail. Measured on torch
#   2.13, alike on Sapphire Rapids and Zen 4: in_features % 16 != 0 crashes (M >= 2) or returns NaN/Inf/1e30
#   (M = 1); activations off 32-byte alignment crash; weights off 16-byte alignment crash from 4 rows on.
# * AVX2: aligned 16-byte loads of 8 activations, unaligned weight loads; in_features % 8 != 0 crashes or returns
#   garbage (measured on Zen 3 in earlier sessions).
# One contract covers both, with a margin: multiples of 16, 64-byte alignment. Both contracts below also hold on Zen 4
# with torch 2.11 and 2.14.1, natively and on ATen's AVX2 kernels (bench/results/cpu_contracts-*-torch2.1?.json).
INT8PACK = KernelContract(
    frozenset({"AVX2", "AVX512", "AVX512_AMX"}), in_multiple=16, out_multiple=1, alignment=ALIGNMENT
)
# torch._weight_int4pack_mm_for_cpu with the weight converted by _convert_weight_to_int4pack_for_cpu (which needs
# out_features % 16 == 0): unaligned loads only; measured correct at every activation offset on AVX-512 (Zen 4 and
# Sapphire Rapids). The converted weight is ours (always aligned); the activations are held to the same alignment as
# INT8PACK's.
INT4PACK = KernelContract(
    frozenset({"AVX2", "AVX512", "AVX512_AMX"}), in_multiple=1, out_multiple=16, alignment=ALIGNMENT
)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is contiguous and :data:`ALIGNMENT`-aligned (or not on CPU), else an aligned copy."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class RowBound:
    """Rows up to which a packed kernel beats the dequantizing path for a layer: ``sqrt(out * in) / divisor``,
    clamped to ``[1, cap]`` (the dequantizing path's cost is per weight, the kernel's per row and weight)."""

    divisor: int
    cap: int

    def __call__(self, out_features: int, in_features: int) -> int:
        return max(1, min(self.cap, math.isqrt(out_features * in_features) // self.divisor))


# Fitted per CPU kind to the crossovers bench/cpu_dispatch.py measures (bench/results/cpu_dispatch-<kind>.json), on
# the low side of several runs; keyed by (weight bits, activation dtype). A kind that is not here never reaches a
# kernel (its contracts do not hold).
_ROW_BOUNDS: dict[str, dict[tuple[int, torch.dtype], RowBound]] = {
    # 2 Zen 3 cores, bench/results/cpu_dispatch-avx2.json: float32 crossovers at 8-32 rows (384 x 384 to 1536 x
    # 384), 32-64 (1024 x 1024 and up; at 128 rows the kernel is 1.3-1.6x slower) for int8, 64-128 for 4-bit; with
    # bfloat16 activations (no native bfloat16 matmul on Zen 3) the kernels win at every measured row count, up to
    # 512. int8 x int8 uses the int8 float32 bound (crossovers 32-64 against the exact float32 path). float16
    # (bench/results/cpu_dispatch-avx2-float16.json): the kernels are 2-4x faster than float16 F.linear at every
    # measured shape and row count (no native float16 matmul either).
    "AVX2": {
        (8, torch.float32): RowBound(32, 64),
        (4, torch.float32): RowBound(16, 128),
        (8, torch.bfloat16): RowBound(1, 1 << 20),
        (4, torch.bfloat16): RowBound(1, 1 << 20),
        (8, torch.float16): RowBound(1, 1 << 20),
        (4, torch.float16): RowBound(1, 1 << 20),
    },
    # 2 Zen 4 cores (AVX-512 with VNNI and bfloat16 dot products, no AMX), bench/results/cpu_dispatch-avx512.json:
    # the float32 dequantizing path is slow here (0.4-1.4 ns per int8 weight at one row), and the kernels beat it to
    # 128-512 rows, 4-bit ones to 256-512; with bfloat16 activations the crossovers are 8-64 rows for int8 (8 at
    # 1024 x 1024 in two runs of three) and 32-128 for 4-bit in three runs (128-256 before the 4-bit dequantizing
    # path converted codes in strided copies): the two within 10% at 64 rows, the dequantizing one 1.1-1.4x faster
    # at 128. The float32 bounds keep the divisors of the other kinds and take Zen 4's caps: the kernels round
    # float32 activations to bfloat16, and with one divisor a layer of up to 2048 x 2048 (int8; 4-bit: up to the
    # caps) takes the same path, and gives the same float32 result, at a given row count on every CPU. float16
    # (bench/results/cpu_dispatch-avx512-float16.json): float16 F.linear has no fast path here beyond one row (100 ms
    # at 32 rows of 4096 x 14336, bfloat16 13 ms), and the kernels are 3-5x faster than the float16 dequantizing
    # path at every measured shape and row count.
    "AVX512": {
        (8, torch.float32): RowBound(32, 256),
        (4, torch.float32): RowBound(16, 512),
        (8, torch.bfloat16): RowBound(1, 16),
        (4, torch.bfloat16): RowBound(1, 64),
        (8, torch.float16): RowBound(1, 1 << 20),
        (4, torch.float16): RowBound(1, 1 << 20),
    },
    # 2 Sapphire Rapids cores (AVX-512, AMX), bench/results/cpu_dispatch-avx512_amx.json and a quiet re-run of its
    # two largest shapes: float32 crossovers from 32-64 rows (384 x 384) to 64-128 (1024 x 1024 and up); bfloat16
    # ones at 16-64 rows for int8 (oneDNN's bfloat16 matmul, AMX, takes the dequantized blocks) and 64-128 for 4-bit.
    "AVX512_AMX": {
        (8, torch.float32): RowBound(32, 128),
        (4, torch.float32): RowBound(16, 128),
        (8, torch.bfloat16): RowBound(1, 32),
        (4, torch.bfloat16): RowBound(16, 128),
    },
}


# torch._int_mm (oneDNN's int8 GEMM, VNNI/AMX where the CPU has them): exact int32 sums at every shape, row count and
# storage offset bench/cpu_contracts.py probed, on Zen 4, Sapphire Rapids and Zen 3 alike (408 cases each). Fast
# only with AVX-512: on AVX2 (Zen 3, no VNNI) it is a loop 6-15x slower than _weight_int8pack_mm and 5-15x slower
# than a float32 matmul (bench/results/cpu_dispatch-avx2.json), so int8 x int8 takes the exact float32 path there
# (_int8_sums).
#
# The CPU kind does not settle it alone. oneDNN's int8 GEMM without VNNI (vpmaddubsw) saturates pairs of products at
# int16; torch calls oneDNN only where the CPU has AVX512-VNNI (pytorch/pytorch#136746), but oneDNN picks its GEMM by
# the ISA it is allowed. On Zen 4 with ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) set to AVX2 or AVX512_CORE,
# torch._int_mm returns wrong sums, silently (374 of 408 bench/cpu_contracts.py cases), while get_cpu_capability()
# still says AVX512. Hence a check on the machine itself, once (int_mm_is_exact).
@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` gives the exact sums here, in both operand orders :func:`_int8_matmul` uses, on codes
    whose pairs of products overflow int16 (checked once per process: 5-30 ms, mostly oneDNN's own first-call
    setup, which the first real call would pay)."""
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 64, 16), (5, 72, 33), (33, 264, 48)):
        x = torch.randint(-128, 128, (rows, k), generator=generator, dtype=torch.int8)
        weight = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
        # Extreme rows: products of 127s and -128s, whose pairs overflow int16 as int8 x int8 or as oneDNN's
        # uint8 (x + 128) x int8.
        x[0], x[1:2], weight[0], weight[1] = 127, -128, 127, -128
        exact = (x.double() @ weight.double().t()).to(torch.int32)
        try:
            sums = (torch._int_mm(x, weight.t()), torch._int_mm(weight, x.t()).t())
        except RuntimeError:
            return False
        if not all(torch.equal(s, exact) for s in sums):
            return False
    return True


INT_MM = KernelContract(
    frozenset({"AVX512", "AVX512_AMX"}), in_multiple=1, out_multiple=1, alignment=1, verified=int_mm_is_exact
)
# The same sums with the weight as the first operand (weight @ x.T, transposed back; exact in all 408 cases on Zen 4,
# "int_mm_weight_first" in bench/results/cpu_contracts-avx512.json). oneDNN reorders a transposed second operand at
# every call: on Zen 4, at 4096 x 14336, 11-16 ms from 2 to 64 rows as x @ weight.T, 6.3-12.4 ms as weight @ x.T.
# Not measured on Sapphire Rapids: it keeps the activations first.
INT_MM_WEIGHT_FIRST = KernelContract(
    frozenset({"AVX512"}), in_multiple=1, out_multiple=1, alignment=1, verified=int_mm_is_exact
)
# int8 x int8: rows up to which _weight_int8pack_mm (bfloat16-rounded output) beats torch._int_mm (exact), where
# INT_MM holds. Sapphire Rapids (bench/results/cpu_dispatch-avx512_amx.json): int8pack 1.3x faster at 1 row,
# _int_mm 2-10x faster from 8 rows at every shape. Zen 4 (cpu_dispatch-avx512.json): _int_mm, weight first, is
# faster at every row count.
A8W8_INT8PACK_MAX_ROWS: dict[str, int] = {"AVX512_AMX": 1, "AVX512": 0}


def _int8_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2d @ weight.T`` of int8 matrices through ``torch._int_mm`` (where :data:`INT_MM` holds): the exact int32
    sums, as a contiguous float32 ``[rows, out]`` matrix (float32 holds them to a relative 2**-24)."""
    if not INT_MM_WEIGHT_FIRST.holds():
        return torch._int_mm(x2d, weight.t()).float()  # one conversion pass: int32 + float32 promotes slowly
    sums = torch._int_mm(weight, x2d.t())  # [out, rows]
    return torch.empty(sums.shape[::-1], dtype=torch.float32).copy_(sums.t())  # transposed and converted at once


def a8w8_kernel_max_rows(out_features: int, in_features: int) -> int:
    """Rows of int8 x int8 up to which ``_weight_int8pack_mm`` runs; beyond, ``torch._int_mm`` where
    :data:`INT_MM` holds, else the exact float32 path (:func:`_int8_sums`), whose float32 matmul is the one the
    dequantizing path of float32 activations runs: the same crossover as int8 weights' with float32 activations."""
    if INT_MM.holds():
        return A8W8_INT8PACK_MAX_ROWS.get(cpu_kind(), 0)
    return kernel_max_rows(out_features, in_features, 8, torch.float32)


@dataclass(frozen=True)
class SlicedBound:
    """Where int8 weights times float activations take the sliced ``torch._int_mm`` path (:func:`_sliced_int_mm`):
    layers of at least ``min_weights`` weights (below, its fixed cost of a dozen small ops loses to the
    dequantizing path), from ``kernel_rows + 1`` rows (up to there, ``_weight_int8pack_mm`` is faster), and for
    bfloat16 activations up to ``bfloat16_max_rows`` rows (beyond, the bfloat16 matmul of the dequantizing path is
    compute-bound and as fast as the int8 one, which the slices give twice the rows)."""

    min_weights: int
    kernel_rows: int
    bfloat16_max_rows: int

    def takes(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether ``rows`` rows the packed kernel does not take (beyond ``kernel_rows``, or outside its
        contract) go to the sliced path."""
        return dtype != torch.bfloat16 or rows <= self.bfloat16_max_rows


# Fitted to bench/cpu_dispatch.py (sliced_ms against kernel_ms and dequantized_ms), where INT_MM holds. Sapphire
# Rapids (2 cores, bench/results/cpu_dispatch-avx512_amx.json): from 1024 x 4096 weights up, the sliced path
# beats the kernel from 8 rows (at 4 the kernel wins), the float32 dequantizing path at every row count (4-5x) and
# the bfloat16 one up to 256 rows (1.1-5x; at 512 rows it is 0.8-1.2x). At 1024 x 1024 the kernel wins up to 32
# rows; beyond, the sliced path (fixed cost about 0.2 ms) is 2x faster than the dequantizing one with float32
# activations and up to 2x slower with bfloat16 ones: one size bound for both keeps such layers off it.
_SLICED_BOUNDS: dict[str, SlicedBound] = {
    "AVX512": SlicedBound(min_weights=1 << 22, kernel_rows=4, bfloat16_max_rows=128),
    "AVX512_AMX": SlicedBound(min_weights=1 << 22, kernel_rows=4, bfloat16_max_rows=256),
}


def _sliced_bound(out_features: int, in_features: int) -> SlicedBound | None:
    bound = _SLICED_BOUNDS.get(cpu_kind())
    if bound is None or not INT_MM.holds() or out_features * in_features < bound.min_weights:
        return None
    return bound


def kernel_max_rows(out_features: int, in_features: int, bits: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows of ``dtype`` activations up to which the packed kernel for a ``bits``-wide weight (8, or 4 for the 2-
    and 4-bit formats) beats the path taken beyond (the sliced ``_int_mm`` one or the dequantizing one) on this
    CPU; 0 where no kernel is measured."""
    table, width = _ROW_BOUNDS.get(cpu_kind(), {}), 8 if bits == 8 else 4
    bound = table.get((width, dtype))
    if bound is None and dtype == torch.float16:  # where float16 has no bound of its own, float32's
        bound = table.get((width, torch.float32))
    if bound is None:
        return 0
    sliced = _sliced_bound(out_features, in_features) if bits == 8 else None
    rows = bound(out_features, in_features)
    return rows if sliced is None else min(rows, sliced.kernel_rows)


# int8 weights x float activations on torch._int_mm, by splitting each row of activations into int8 slices (the
# Ozaki scheme): x = s * (q_1 + q_2 / 254 + q_3 / 254**2 + ...), s = absmax / 127, every q_i in [-127, 127]. Each
# slice times the weight is an exact int32 sum; after n slices an element is off by at most absmax / 254**n. Slices
# are added until that is below 2**-9 of the row's mean magnitude, the bfloat16 rounding the packed kernels apply to
# activations, so this path is as accurate as they are; a row needing more slices takes the dequantizing path.
_SLICE_RADIX = 254
_SLICE_MAX = 3
_SLICE_ERROR = 2.0**-9


def _int8_slices(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(slices, scale)``: ``[n, rows, in]`` int8 and ``[rows, 1]`` float32 with ``x2d = scale * sum_i slices[i] /
    254**i`` to within :data:`_SLICE_ERROR` of each row's mean magnitude; ``None`` if that takes more than
    :data:`_SLICE_MAX` slices, or an activation is not finite."""
    xf = x2d.float()
    magnitude = xf.abs()
    tiny = torch.finfo(torch.float32).tiny  # all-zero rows: any scale, ratio 1
    absmax = magnitude.amax(dim=1, keepdim=True).clamp_min_(tiny)
    worst = float((absmax / magnitude.mean(dim=1, keepdim=True).clamp_min_(tiny)).max())
    if not 0.5 <= worst < math.inf:  # >= 1 but for rounding; NaN from an Inf or NaN activation, or an overflow
        return None
    n = max(1, math.ceil(math.log(worst / _SLICE_ERROR) / math.log(_SLICE_RADIX)))
    if n > _SLICE_MAX:
        return None
    scale = absmax / 127
    t = xf / scale
    slices = torch.empty(n, *x2d.shape, dtype=torch.int8)
    for i in range(n):
        # |t| <= 127 (to a rounding of the division, which round() absorbs), and |t - q| <= 0.5: every code fits.
        q = t.round()
        slices[i].copy_(q)
        if i + 1 < n:
            t = t.sub_(q).mul_(_SLICE_RADIX)  # t - q is exact
    return slices, scale


def _sliced_int_mm(
    x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``F.linear(x2d, weight * scale, bias)`` in ``x2d``'s dtype through :func:`_int8_slices` and
    ``torch._int_mm`` (sums and scaling in float32, one rounding at the end), or ``None``."""
    split = _int8_slices(x2d)
    if split is None:
        return None
    slices, x_scale = split
    n, rows, in_features = slices.shape
    acc = _int8_matmul(slices.view(n * rows, in_features), weight).view(n, rows, -1)
    out = acc[n - 1]
    for i in range(n - 2, -1, -1):
        out = acc[i].add_(out, alpha=1.0 / _SLICE_RADIX)  # Horner: q_i + (rest) / 254
    out.mul_(x_scale)
    # The last multiply writes the output dtype itself (a separate float32 -> bfloat16 cast costs 3x more).
    result = torch.empty(rows, weight.shape[0], dtype=x2d.dtype)
    if bias is None:
        return torch.mul(out, scale.float(), out=result)
    return torch.addcmul(bias, out, scale.float(), out=result)


# int8 x int8 products are at most 128 * 127 in magnitude, so every partial sum of up to 1024 of them is an integer
# below 2**24: float32 holds it exactly, in whatever order a matmul adds. Longer rows are summed chunk by chunk, in
# float64 (exact far beyond any real in_features).
_EXACT_FLOAT32_TERMS = 1024


def _int8_sums(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x2d @ weight.T`` of int8 codes as float32, each exact sum rounded once to float32 (what the float64
    reference gives, bit for bit), through float32 matmuls of blocks of the weight; ``None`` where float32 matmuls
    may round their inputs (``torch.set_float32_matmul_precision`` below "highest" lets oneDNN use bfloat16)."""
    if torch.get_float32_matmul_precision() != "highest":
        return None
    xf, in_features, out_features = x2d.float(), x2d.shape[1], weight.shape[0]
    total = None
    for k in range(0, in_features, _EXACT_FLOAT32_TERMS):
        chunk = slice(k, k + _EXACT_FLOAT32_TERMS)
        fill = lambda a, b, buf, chunk=chunk: buf.copy_(weight[a:b, chunk])  # noqa: E731
        sums = _blockwise_linear(xf[:, chunk], out_features, fill, None)
        if in_features <= _EXACT_FLOAT32_TERMS:
            return sums
        total = sums.double() if total is None else total.add_(sums)
    return total.float()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _kernel_input(x: torch.Tensor, max_rows: int) -> torch.Tensor | None:
    """``x`` as the contiguous, aligned 2-D bfloat16 matrix the kernels take (float32/float16 rounded to it), or
    ``None`` beyond ``max_rows`` rows, where the dequantizing path is faster."""
    rows = _rows(x)
    if rows == 0 or rows > max_rows or x.dtype not in _ACTIVATION_DTYPES:
        return None
    if x.dtype == torch.bfloat16:
        return aligned(x.reshape(rows, x.shape[-1]))
    return x.reshape(rows, x.shape[-1]).to(torch.bfloat16, memory_format=torch.contiguous_format)


# The dequantizing path converts a block of weights at a time (a few hundred output channels of a large layer), into
# one reused buffer that stays in the CPU's caches: the float weight never goes to memory and costs no page faults,
# which a whole dequantized weight does at every call. A block is never smaller than the activations: every block's
# matmul reads all of them again. Bytes per block, fitted per CPU kind to bench/cpu_blocks.py
# (bench/results/cpu_blocks-<kind>.json); a kind not measured takes DEFAULT_BLOCK_BYTES (1 MiB, half the L2 of a
# Sapphire Rapids core). Zen 4 (1 MiB L2 per core): 4 MiB blocks are the fastest or within a few percent of it at
# every measured shape and row count, 1 MiB ones up to 1.7x slower.
DEFAULT_BLOCK_BYTES = 1 << 20
_BLOCK_BYTES: dict[str, int] = {"AVX512": 1 << 22}


def _blockwise_linear(x2d: torch.Tensor, out_features: int, dequantize_into, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x2d, W, bias)`` in ``x2d``'s dtype, with ``W`` dequantized block by block of output channels by
    ``dequantize_into(start, stop, buffer)`` (which fills and returns ``buffer``, ``[stop - start, in]``)."""
    rows, in_features = x2d.shape
    block_bytes = max(_BLOCK_BYTES.get(cpu_kind(), DEFAULT_BLOCK_BYTES), x2d.numel() * x2d.dtype.itemsize)
    block = min(out_features, max(16, block_bytes // (in_features * x2d.dtype.itemsize)))
    buffer = torch.empty(block, in_features, dtype=x2d.dtype)
    if block == out_features:
        return F.linear(x2d, dequantize_into(0, out_features, buffer), None if bias is None else bias.to(x2d.dtype))
    out = torch.empty(rows, out_features, dtype=x2d.dtype)
    for start in range(0, out_features, block):
        stop = min(start + block, out_features)
        block_bias = None if bias is None else bias[start:stop].to(x2d.dtype)
        out[:, start:stop] = F.linear(x2d, dequantize_into(start, stop, buffer[: stop - start]), block_bias)
    return out


def _per_row_scale(weight_scale: torch.Tensor, out_features: int) -> bool:
    return weight_scale.numel() == out_features and weight_scale.is_floating_point()


@functools.cache
def _ones(n: int) -> torch.Tensor:
    """The unit bfloat16 scales under which ``_weight_int8pack_mm`` returns the bare dot products (never written)."""
    with torch.inference_mode(False):
        return torch.ones(n, dtype=torch.bfloat16)


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out + bias``, in place (every caller's ``out`` is a fresh tensor of its own)."""
    return out if bias is None else out.add_(bias.to(out.dtype))


def _per_row_weight(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """A 2-D weight with one scale per output channel, and activations of its width."""
    return (
        weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]  # the kernel does not check: a shorter row would be read past its end
        and _per_row_scale(weight_scale, weight.shape[0])
    )


@torch.library.register_kernel(library.linear_w8, "cpu")
def _linear_w8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    codes = weight.dtype == torch.int8 or weight.dtype in FLOAT8_VIA_HALF_FACTOR
    if not codes or not _per_row_weight(x, weight, weight_scale) or x.dtype not in _ACTIVATION_DTYPES or not _rows(x):
        return reference.linear_w8(x, weight, weight_scale, bias)
    out_features = weight.shape[0]
    scale = weight_scale.reshape(-1)
    if weight.dtype == torch.int8:
        out = _linear_int8_kernels(x, weight, scale, bias)
        if out is not None:
            return out.view(*x.shape[:-1], out_features)
        codes_into, factor = (lambda a, b, buf: buf.copy_(weight[a:b])), 1.0
    else:
        codes_into, factor = _float8_weight_into(weight), FLOAT8_VIA_HALF_FACTOR[weight.dtype]
    x2d = x.reshape(_rows(x), x.shape[-1])
    column = scale.float().mul(factor).reshape(-1, 1)
    if x.dtype == torch.float16:
        # Sums of codes times activations can overflow float16: the weight is scaled first, as the reference does.
        fill = lambda a, b, buf: codes_into(a, b, buf).mul_(column[a:b])  # noqa: E731
        return _blockwise_linear(x2d, out_features, fill, bias).view(*x.shape[:-1], out_features)
    # The codes are exact in float32 and bfloat16: the scale goes on the output, one multiply per output rather than
    # per weight (an in-place bfloat16 x float32 multiply of the weight costs more than the matmul).
    out = _blockwise_linear(x2d, out_features, codes_into, None)
    out = out.mul_(column.view(-1)) if out.dtype == torch.float32 else out.float() * column.view(-1)
    return _with_bias(out.to(x.dtype).view(*x.shape[:-1], out_features), bias)


def _linear_int8_kernels(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``linear_w8`` of int8 weights through ``_weight_int8pack_mm`` or the sliced ``torch._int_mm`` path, as a
    ``[rows, out]`` matrix; ``None`` where neither is taken (beyond their rows, outside their contracts)."""
    out_features = weight.shape[0]
    max_rows = kernel_max_rows(*weight.shape, 8, x.dtype) if INT8PACK.admits_weight(weight) else 0
    x2d = _kernel_input(x, max_rows)
    if x2d is not None:
        if scale.dtype == torch.bfloat16:
            out = torch._weight_int8pack_mm(x2d, weight, scale)
        else:
            # A float32/float16 scale applied after the kernel (bfloat16 x float32 promotes to float32) is not
            # rounded to bfloat16.
            out = torch._weight_int8pack_mm(x2d, weight, _ones(out_features)) * scale.float()
        return _with_bias(out.to(x.dtype), bias)
    x2d = x.reshape(_rows(x), x.shape[-1])
    sliced = _sliced_bound(*weight.shape)
    return _sliced_int_mm(x2d, weight, scale, bias) if sliced and sliced.takes(x2d.shape[0], x.dtype) else None


def _float8_weight_into(weight: torch.Tensor):
    """The ``dequantize_into(start, stop, buffer)`` of :func:`_blockwise_linear` for float8 codes (values divided by
    ``FLOAT8_VIA_HALF_FACTOR``); whether the weight holds NaN codes is checked once per storage and version, which
    spares four passes a call on a weight without them."""
    nan_codes = _per_storage(_NAN_CODES_CACHE, has_nan_codes, weight)
    return lambda start, stop, buffer: float8_into(weight[start:stop], buffer, nan_codes)


def _float8_sums(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2d @ weight.T`` of float8 codes (e4m3fn or e5m2, any pair) as float32, through float32 matmuls of their
    values (:func:`float8_into`, block by block of the weight). Each product is exact in float32 (4-bit
    significands at most); the sums are float32 ones, where the reference adds in float64."""
    x = float8_into(x2d, torch.empty(x2d.shape, dtype=torch.float32))
    acc = _blockwise_linear(x, weight.shape[0], _float8_weight_into(weight), None)
    return acc.mul_(FLOAT8_VIA_HALF_FACTOR[x2d.dtype] * FLOAT8_VIA_HALF_FACTOR[weight.dtype])  # a power of 2: exact


@torch.library.register_kernel(library.linear_a8w8, "cpu")
def _linear_a8w8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    rows = _rows(x_q)
    float8 = x_q.dtype in FLOAT8_VIA_HALF_FACTOR and weight.dtype in FLOAT8_VIA_HALF_FACTOR
    codes = x_q.dtype == weight.dtype == torch.int8 or float8
    if not codes or not _per_row_weight(x_q, weight, weight_scale) or rows == 0:
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    x2d = x_q.reshape(rows, x_q.shape[-1])
    if float8:
        acc = _float8_sums(x2d, weight)
    elif INT8PACK.admits_weight(weight) and rows <= a8w8_kernel_max_rows(*weight.shape):
        # |codes| <= 128: exact in bfloat16 (a fresh tensor, so contiguous and aligned); the kernel sums in float32
        # and rounds its output to bfloat16.
        x2d = x2d.to(torch.bfloat16, memory_format=torch.contiguous_format)
        acc = torch._weight_int8pack_mm(x2d, weight, _ones(weight.shape[0])).float()
    elif INT_MM.holds():
        acc = _int8_matmul(x2d, weight)  # exact: what the float64 reference computes
    else:
        acc = _int8_sums(x2d, weight)
        if acc is None:
            return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    out = acc.view(*x_q.shape[:-1], weight.shape[0]) * x_scale.float() * weight_scale.float().reshape(-1)
    return _with_bias(out.to(out_dtype), bias)


@dataclass
class _Int4Weight:
    """A weight converted for ``_weight_int4pack_mm_for_cpu``."""

    packed: torch.Tensor
    scale_and_zeros: torch.Tensor


# Keyed by the weight's storage object (PyTorch keeps one Python object per live storage): an entry goes away with
# its storage, so `.to(device)`, reloading or deleting a model frees it, and a new storage can never hit an old
# entry. Under torch.compile the op stays opaque and this code runs on the real tensors, so the cache works alike.
# Caveat, as for any version-counter check: writes through ``.data`` are not seen (use ``copy_`` under no_grad).
_INT4_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _layout(t: torch.Tensor) -> tuple:
    # Inference tensors have no version counter (they cannot be written in place outside inference mode).
    version = None if t.is_inference() else t._version
    return (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, version)


def _sources(weight: torch.Tensor, *others: torch.Tensor) -> tuple:
    # The other storages (scales, shifts: small) are held by the entry, so their identity stays meaningful; the
    # weight's storage is the cache key and must not be held, or the entry would never be collected.
    return (_layout(weight), *(x for t in others for x in (t.untyped_storage(), _layout(t))))


def _same_sources(a: tuple, b: tuple) -> bool:
    return all(x is y if isinstance(x, torch.UntypedStorage) else x == y for x, y in zip(a, b, strict=True))


# Per weight storage, cached like the 4-bit conversions: the row sums of int8 weights (linear layers with a zero-point
# on their int8 input), and whether float8 weights hold NaN codes.
_ROW_SUMS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_NAN_CODES_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_cache() -> None:
    """Drop every cached 4-bit weight conversion, row sum and float8 NaN check (each is redone at its next use)."""
    _INT4_CACHE.clear()
    _ROW_SUMS_CACHE.clear()
    _NAN_CODES_CACHE.clear()


def _per_storage(cache: WeakIdKeyDictionary, compute, weight: torch.Tensor, *others: torch.Tensor):
    """``compute(weight, *others)``, cached per weight storage while the layouts and versions (:func:`_layout`) of
    ``weight`` and ``others`` stay and ``others`` keep their storages (any in-place write or new storage misses)."""
    storage, sources = weight.untyped_storage(), _sources(weight, *others)
    entry = cache.get(storage)
    if entry is None or not _same_sources(entry[0], sources):
        entry = (sources, compute(weight, *others))
        cache[storage] = entry
    return entry[1]


@torch.library.register_kernel(library.weight_row_sums, "cpu")
def _weight_row_sums(weight: torch.Tensor) -> torch.Tensor:
    # A pass over the whole weight, as long as the matmul itself at one row: computed once per weight storage.
    sums = _per_storage(_ROW_SUMS_CACHE, reference.weight_row_sums, weight)
    return sums.clone()  # a fresh output, as an op's must be (the caller, or inductor, may write into it)


def _int4_weight(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> _Int4Weight:
    """The converted weight, from the cache, or converted now and cached.

    The kernel computes ``(q' - 8) * scale + zero`` with ``scale`` and ``zero`` in bfloat16; ours is ``(q - shift) *
    scale``. 4-bit codes are used as they are (``q' = q``); 2-bit codes are moved to the middle of the 4-bit range
    (``q' = q + 6``) so that ``zero = (8 - q' + q - shift) * scale`` stays small, and with it its bfloat16 rounding
    error, which every weight of the group shares.
    """

    def convert(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> _Int4Weight:
        offset = 0 if bits == 4 else _INT2_CODE_OFFSET
        codes = reference.unpack(weight, bits).to(torch.int32) + offset
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)  # inner_k_tiles: ignored by the CPU layout
        zero = (8.0 - offset - shift.float()) * scale.float()
        scale_and_zeros = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return _Int4Weight(packed, scale_and_zeros)

    return _per_storage(_INT4_CACHE, convert, weight, scale, shift)


def _dequantize_affine_into(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, out: torch.Tensor
) -> torch.Tensor:
    """``reference.dequantize_affine(packed, scale, shift, bits)[:, :width]``, bit for bit, written into ``out``
    (``[rows, width]``, any float dtype) and returned. Each code position of a byte is converted to float32 in one
    strided copy: the reference's unpack (a broadcast shift of uint8) costs 3x the rest of the dequantization."""
    rows, padded = packed.shape[0], packed.shape[-1] * 8 // bits
    direct = out.dtype == scale.dtype == torch.float32 and out.shape[1] == padded and out.is_contiguous()
    values = out if direct else torch.empty(rows, padded, dtype=torch.float32)
    lanes, mask = values.view(rows, -1, 8 // bits), (1 << bits) - 1
    for i in range(8 // bits):
        lanes[..., i].copy_((packed >> (bits * i) if i else packed) & mask)
    groups = values.view(rows, scale.shape[-1], -1)
    groups.sub_(shift.float().unsqueeze(-1)).mul_(scale.float().unsqueeze(-1))  # the reference's arithmetic
    if direct:
        return out
    if scale.dtype not in (torch.float32, out.dtype):
        values = values.to(scale.dtype)  # the reference returns the scale's dtype: its rounding first
    return out.copy_(values[:, : out.shape[1]])


@torch.library.register_kernel(library.dequantize_affine, "cpu")
def _dequantize_affine(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    layout = (
        bits in (2, 4)
        and packed.dtype == torch.uint8
        and packed.dim() == 2
        and scale.dim() == 2
        and scale.shape == shift.shape
        and scale.shape[0] == packed.shape[0]
        and scale.shape[-1] > 0
        and (packed.shape[-1] * 8 // bits) % scale.shape[-1] == 0
        and scale.dtype in _ACTIVATION_DTYPES
    )
    if not layout:
        return reference.dequantize_affine(packed, scale, shift, bits)
    out = torch.empty(packed.shape[0], packed.shape[-1] * 8 // bits, dtype=scale.dtype)
    return _dequantize_affine_into(packed, scale, shift, bits, out)


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
    layout = (
        bits in (2, 4)
        and weight.dim() == 2
        and weight_scale.shape == weight_shift.shape == (out_features, n_groups)
        and group_size * n_groups == padded_in
        and x.dim() >= 1
        and 0 < x.shape[-1] <= padded_in
        and _rows(x) > 0
        and x.dtype in _ACTIVATION_DTYPES
    )
    if not layout:
        return reference.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)
    kernel = INT4PACK.holds() and out_features % INT4PACK.out_multiple == 0 and group_size in INT4_GROUP_SIZES
    x2d = _kernel_input(x, kernel_max_rows(out_features, padded_in, bits, x.dtype)) if kernel else None
    if x2d is None:

        def dequantize_into(start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
            rows = slice(start, stop)
            return _dequantize_affine_into(weight[rows], weight_scale[rows], weight_shift[rows], bits, buffer)

        out = _blockwise_linear(x.reshape(_rows(x), x.shape[-1]), out_features, dequantize_into, bias)
        return out.view(*x.shape[:-1], out_features)
    converted = _int4_weight(weight, weight_scale, weight_shift, bits)
    if x2d.shape[1] < padded_in:
        x2d = F.pad(x2d, (0, padded_in - x2d.shape[1]))  # zero inputs meet the padding codes
    out = torch._weight_int4pack_mm_for_cpu(x2d, converted.packed, group_size, converted.scale_and_zeros)
    return _with_bias(out.to(x.dtype).view(*x.shape[:-1], out_features), bias)
