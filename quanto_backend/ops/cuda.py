"""CUDA implementations of the ``quanto_backend::*`` ops: kernels from ``cuda_kernels/`` launched through
:mod:`quanto_backend.kernels`.

Each op checks that its inputs are a case a kernel covers (dtypes, layouts, group sizes); anything else, and every
call when the kernels cannot run here (no CuPy/NVRTC, or ``QUANTO_BACKEND_DISABLE_KERNELS=1``), takes the
plain-torch reference, which is correct on any device. Importing this module needs neither CuPy nor a GPU.

Matmul dispatch: up to ``GEMV_MAX_M`` rows of activations go to the decode GEMV (tensor-core m16 tile, each
weight byte read once), more rows to the tiled tensor-core GEMM: int8 x int8 and float8 x float8 (sm_89+) for
quantized activations, and for weight-only formats a 16-bit GEMM whose weight tiles are dequantized in shared
memory; a GEMM of fewer output tiles than SMs is split along K (:func:`split_k`). From ``*_LIBRARY_ROWS`` rows on,
a library GEMM takes over where its contract (``INT_MM``, ``SCALED_MM``) allows: cuBLAS through ``F.linear`` on
the dequantized weight, ``torch._int_mm``, ``torch._scaled_mm``.

Kernel families (``FAMILIES``, one per source) are self-tested on their first use on a device (see
:func:`warmup` and :mod:`.cuda_self_test`); one that fails to compile, to load, or to agree with the reference is
disabled there with one warning, and its ops take the reference.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch

from . import library, reference

__all__ = [
    "FAMILIES",
    "FP8_LIBRARY_ROWS",
    "GEMV_MAX_M",
    "INT8_LIBRARY_ROWS",
    "INT_MM",
    "SCALED_MM",
    "SPLIT_K_MAX",
    "SPLIT_K_MIN_TILES",
    "WEIGHT_ONLY_LIBRARY_ROWS",
    "LibraryContract",
    "split_k",
    "warmup",
]

GEMV_MAX_M = 16

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_Q8 = (torch.int8, *_FP8)
_BLOCK = 256
_MAX_GRID_Y = 65535
_GEMM_TILE = 128
# 2/4-bit groups must hold whole 32-value pieces: the GEMV reads one scale and shift per 32 weights.
_GROUP_MULTIPLE = 32

# The kernel families: one per source of cuda_kernels/ (the stems of kernels.ENTRY_POINTS). Each is enabled per
# device after its first-use self-test, or disabled (with one warning naming it) when it cannot be compiled or
# loaded or disagrees with the reference; the ops of a disabled family take the reference.
FAMILIES: tuple[str, ...] = ("quantize", "gemv", "gemm")

_warned = False
_health: dict[tuple[int | None, str], bool] = {}
_warmup_lock = threading.RLock()


def _register(op):
    """Registers the decorated function as ``op``'s CUDA kernel and keeps it callable by name (the self-tests
    and unit tests call it directly)."""

    def register(fn):
        torch.library.register_kernel(op, "cuda", fn)
        return fn

    return register


def _kernels_ready(*tensors: torch.Tensor | None) -> bool:
    """True when every tensor is on one CUDA device and the kernels can run; warns once when they cannot."""
    global _warned
    if _one_cuda_device(*tensors) is None:
        return False
    from ..kernels import kernels_unavailable_reason

    reason = kernels_unavailable_reason()
    if reason is not None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"quanto_backend CUDA kernels are unavailable ({reason}); using the slower plain-torch ops",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def _disable(index: int | None, family: str, why: str) -> None:
    _health[(index, family)] = False
    warnings.warn(
        f"quanto_backend: the {family} CUDA kernels are disabled on cuda:{index} ({why}); "
        "their ops use the slower plain-torch reference there",
        RuntimeWarning,
        stacklevel=2,
    )


def _warmup(device: torch.device) -> dict[str, bool]:
    """Loads every module on ``device`` and self-tests each loaded family, once per device (see :func:`warmup`)."""
    with _warmup_lock:
        index = device.index
        if any((index, f) not in _health for f in FAMILIES):
            from ..kernels import KernelsNotLoadedError, load_modules
            from . import cuda_self_test

            if torch.cuda.is_current_stream_capturing():  # the self-tests read their results: not in a capture
                raise KernelsNotLoadedError(
                    f"the quanto_backend kernels of cuda:{index} have not been prepared and a CUDA graph is being "
                    "captured: run the model once before capturing, or call "
                    f"quanto_backend.ops.warmup(torch.device('cuda', {index})) first"
                )
            errors = load_modules(device)
            for source, error in errors.items():
                family = source.removesuffix(".cu")
                if error is not None:
                    _disable(index, family, f"they could not be compiled or loaded: {error}")
            for family in FAMILIES:
                if (index, family) in _health:
                    continue
                try:
                    problem = cuda_self_test.run(family, device)
                except Exception as e:  # a kernel that fails to run is as unusable as one that is wrong
                    problem = f"{type(e).__name__}: {e}"
                if problem is None:
                    _health[(index, family)] = True
                else:
                    _disable(index, family, f"their first-use self-test against the reference failed: {problem}")
        return {f: _health[(index, f)] for f in FAMILIES}


def warmup(device: torch.device | str | int | None = None) -> dict[str, bool]:
    """Prepares the CUDA kernels of ``device`` (default: the current one) and returns which families run there.

    Compiles (or reads from the disk cache) and loads every kernel module, then runs each family's self-test: a
    small case of every entry point against the plain-torch reference. A family that cannot be compiled or loaded,
    or that disagrees with the reference, is disabled there with one warning naming it, and its ops take the
    reference. This happens by itself at the first quantized op on a device; call it explicitly before capturing
    CUDA graphs when the model has not run outside the capture yet. Done once per device.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"warmup: device {device} is not a CUDA device; accepted: 'cuda', 'cuda:N', N")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from ..kernels import KernelUnavailableError, kernels_unavailable_reason

    reason = kernels_unavailable_reason()
    if reason is not None:
        raise KernelUnavailableError(f"the quanto_backend CUDA kernels cannot run here: {reason}")
    return _warmup(device)


def _ready(family: str, *tensors: torch.Tensor | None) -> bool:
    """True when ``family``'s kernels can run on the tensors' device: :func:`_kernels_ready` and the family is
    enabled there (its first use on a device runs :func:`_warmup`)."""
    if not _kernels_ready(*tensors):
        return False
    device = next(t.device for t in tensors if t is not None)
    state = _health.get((device.index, family))
    if state is None:
        state = _warmup(device)[family]
    return state


def _code(dtype: torch.dtype) -> int:
    from ..kernels import DTYPE_CODES

    return DTYPE_CODES[dtype]


def _launch(source: str, entry_point: str, grid: tuple[int, ...], args: tuple, device: torch.device) -> None:
    from ..kernels import launch

    launch(source, entry_point, grid, (_BLOCK,), args, device)


def _int64(value: int):
    from ..kernels import Int64

    return Int64(value)


def _scale_layout(x: torch.Tensor, scale: torch.Tensor) -> int | None:
    """1 when ``scale`` holds one value per row of ``x`` (``[..., 1]``), 0 when it is one value for all of ``x``,
    None for any other broadcast (left to the reference)."""
    if x.dim() == 0:
        return None
    if scale.numel() == 1 and scale.dim() <= x.dim():
        return 0
    if scale.dim() == x.dim() and scale.shape[-1] == 1 and scale.shape[:-1] == x.shape[:-1]:
        return 1
    return None


def _vector_ok(t: torch.Tensor, row_bytes: int) -> int:
    """Whether every row of a contiguous tensor starts 16-byte aligned, so kernels may use 16-byte loads."""
    return int(t.data_ptr() % 16 == 0 and row_bytes % 16 == 0)


def _rows_grid(cols: int, rows: int) -> tuple[int, int]:
    return (math.ceil(cols / _BLOCK), min(rows, _MAX_GRID_Y))


# --- elementwise ops (family "quantize") ------------------------------------------------------------------------
# Each op checks that its inputs are a case the kernel covers; the *_kernel function after it launches the kernel
# on inputs already checked (the self-tests call those directly).


@_register(library.pack)
def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    if not (
        bits in (2, 4)
        and values.dtype == torch.uint8
        and values.dim() >= 1
        and values.shape[-1] % (8 // bits) == 0
        and _ready("quantize", values)
    ):
        return reference.pack(values, bits)
    return _pack_kernel(values, bits)


def _pack_kernel(values: torch.Tensor, bits: int) -> torch.Tensor:
    values = values.contiguous()
    out = values.new_empty((*values.shape[:-1], values.shape[-1] * bits // 8))
    n = out.numel()
    if n:
        grid = (min(math.ceil(n / _BLOCK), 65535),)
        _launch("quantize.cu", "qb_pack", grid, (values, out, _int64(n), bits), values.device)
    return out


@_register(library.unpack)
def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if not (bits in (2, 4) and packed.dtype == torch.uint8 and packed.dim() >= 1 and _ready("quantize", packed)):
        return reference.unpack(packed, bits)
    return _unpack_kernel(packed, bits)


def _unpack_kernel(packed: torch.Tensor, bits: int) -> torch.Tensor:
    packed = packed.contiguous()
    out = packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits))
    n = packed.numel()
    if n:
        grid = (min(math.ceil(n / _BLOCK), 65535),)
        _launch("quantize.cu", "qb_unpack", grid, (packed, out, _int64(n), bits), packed.device)
    return out


@_register(library.quantize_symmetric)
def _quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    layout = _scale_layout(x, scale)
    if not (
        layout is not None
        and dtype in _Q8
        and x.dtype in _FLOAT
        and scale.dtype in _FLOAT
        and _ready("quantize", x, scale)
    ):
        return reference.quantize_symmetric(x, scale, dtype)
    return _quantize_symmetric_kernel(x, scale, dtype, layout)


def _quantize_symmetric_kernel(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, layout: int) -> torch.Tensor:
    x = x.contiguous()
    scale = scale.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    if rows:
        args = (x, _code(x.dtype), scale, _code(scale.dtype), layout, out, _code(dtype), _int64(rows), cols)
        _launch("quantize.cu", "qb_quantize_symmetric", _rows_grid(cols, rows), args, x.device)
    return out


@_register(library.dequantize_symmetric)
def _dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    layout = _scale_layout(q, scale)
    if not (layout is not None and q.dtype in _Q8 and scale.dtype in _FLOAT and _ready("quantize", q, scale)):
        return reference.dequantize_symmetric(q, scale)
    return _dequantize_symmetric_kernel(q, scale, layout)


def _dequantize_symmetric_kernel(q: torch.Tensor, scale: torch.Tensor, layout: int) -> torch.Tensor:
    q = q.contiguous()
    scale = scale.contiguous()
    out = torch.empty(q.shape, dtype=scale.dtype, device=q.device)
    cols = q.shape[-1]
    rows = q.numel() // cols if cols else 0
    if rows:
        args = (q, _code(q.dtype), scale, _code(scale.dtype), layout, out, _int64(rows), cols)
        _launch("quantize.cu", "qb_dequantize_symmetric", _rows_grid(cols, rows), args, q.device)
    return out


@_register(library.quantize_per_token)
def _quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not (dtype in _Q8 and x.dtype in _FLOAT and x.dim() >= 1 and x.shape[-1] > 0 and _ready("quantize", x)):
        return reference.quantize_per_token(x, dtype)
    return _quantize_per_token_kernel(x, dtype)


def _quantize_per_token_kernel(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    cols = x.shape[-1]
    rows = x.numel() // cols
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if rows:
        args = (x, _code(x.dtype), out, _code(dtype), scale, cols)
        _launch("quantize.cu", "qb_quantize_per_token", (rows,), args, x.device)
    return out, scale


def _affine_ok(rows: int, cols: int, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> bool:
    return (
        bits in (2, 4)
        and scale.dim() == 2
        and scale.shape == shift.shape
        and scale.shape[0] == rows
        and scale.shape[1] > 0
        and cols % scale.shape[1] == 0
        and cols % (8 // bits) == 0
        and scale.dtype in _FLOAT
        and shift.dtype in _FLOAT
    )


@_register(library.quantize_affine)
def _quantize_affine(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    if not (
        w.dim() == 2
        and w.dtype in _FLOAT
        and _affine_ok(w.shape[0], w.shape[1], scale, shift, bits)
        and _ready("quantize", w, scale, shift)
    ):
        return reference.quantize_affine(w, scale, shift, bits)
    return _quantize_affine_kernel(w, scale, shift, bits)


def _quantize_affine_kernel(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    w, scale, shift = w.contiguous(), scale.contiguous(), shift.contiguous()
    rows, cols = w.shape
    n_groups = scale.shape[1]
    packed_cols = cols * bits // 8
    out = torch.empty((rows, packed_cols), dtype=torch.uint8, device=w.device)
    if rows and packed_cols:
        args = (
            w, _code(w.dtype), scale, _code(scale.dtype), shift, _code(shift.dtype), out, _int64(rows), cols,
            n_groups, cols // n_groups, bits,
        )  # fmt: skip
        _launch("quantize.cu", "qb_quantize_affine", _rows_grid(packed_cols, rows), args, w.device)
    return out


@_register(library.dequantize_affine)
def _dequantize_affine(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    cols = packed.shape[-1] * 8 // bits if packed.dim() == 2 and bits in (2, 4) else 0
    if not (
        packed.dim() == 2
        and packed.dtype == torch.uint8
        and _affine_ok(packed.shape[0], cols, scale, shift, bits)
        and _ready("quantize", packed, scale, shift)
    ):
        return reference.dequantize_affine(packed, scale, shift, bits)
    return _dequantize_affine_kernel(packed, scale, shift, bits)


def _dequantize_affine_kernel(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int
) -> torch.Tensor:
    packed, scale, shift = packed.contiguous(), scale.contiguous(), shift.contiguous()
    rows, packed_cols = packed.shape
    cols = packed_cols * 8 // bits
    n_groups = scale.shape[1]
    out = torch.empty((rows, cols), dtype=scale.dtype, device=packed.device)
    if rows and packed_cols:
        args = (
            packed, scale, _code(scale.dtype), shift, _code(shift.dtype), out, _int64(rows), packed_cols,
            n_groups, cols // n_groups, bits,
        )  # fmt: skip
        _launch("quantize.cu", "qb_dequantize_affine", _rows_grid(packed_cols, rows), args, packed.device)
    return out


# --- matmuls (families "gemv" and "gemm") --------------------------------------------------------------------


def _bias_ok(bias: torch.Tensor | None, n: int) -> bool:
    return bias is None or (bias.dim() == 1 and bias.shape[0] == n and bias.dtype in _FLOAT)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _kernel_kind(m: int) -> str | None:
    """The family of our kernel for ``m`` rows of activations: the GEMV up to ``GEMV_MAX_M``, else the GEMM
    (None when its grid would be too tall)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if math.ceil(m / _GEMM_TILE) <= _MAX_GRID_Y else None


def _matmul(
    kind: str,
    act_format: int,
    weight_format: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shift: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    x_scale_stride: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    n_groups: int,
    group_size: int,
) -> torch.Tensor:
    """Runs the ``kind`` ("gemv" or "gemm") kernel for ``x [..., K] @ weight^T``; inputs already checked."""
    from ..kernels import matmul_entry_point

    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        weight = weight.contiguous()
        weight_scale = weight_scale.contiguous()
        weight_shift = None if weight_shift is None else weight_shift.contiguous()
        bias = None if bias is None else bias.contiguous()
        source, entry_point = matmul_entry_point(kind, act_format, weight_format)
        scale_code, out_code = _code(weight_scale.dtype), _code(out_dtype)
        bias_code = 0 if bias is None else _code(bias.dtype)
        args = (
            x2, weight, weight_scale, weight_shift, x_scale, bias, out,
            m, n, k, weight.shape[1], n_groups, group_size, x_scale_stride, scale_code, bias_code, out_code,
            _vector_ok(x2, k * x2.element_size()), _vector_ok(weight, weight.shape[1]),
        )  # fmt: skip
        if kind == "gemv":
            _launch(source, entry_point, (math.ceil(n / 8),), args, x.device)
        else:
            epilogue = (x_scale, x_scale_stride, weight_scale, scale_code, bias, bias_code, out, out_code)
            _gemm(source, entry_point, args, epilogue, (m, n, k), x2.dtype, x.device)
    return out.reshape(*x.shape[:-1], n)


# Split-K (see cuda_kernels/gemm.cu): a GEMM of fewer 128 x 128 output tiles than the GPU has SMs splits its
# k-tiles (64 bytes of each row of activations) into up to SPLIT_K_MAX parts of at least SPLIT_K_MIN_TILES. NOT YET
# MEASURED ON A GPU: sized so that the blocks about fill the SMs once; bench/kernel_speed.py times M = 17-128 when a GPU
# is lent.
SPLIT_K_MAX = 8
SPLIT_K_MIN_TILES = 2


def split_k(output_tiles: int, k_tiles: int, multiprocessors: int) -> tuple[int, int]:
    """(splits, k-tiles per split) of a GEMM with ``output_tiles`` blocks per split and ``k_tiles`` k-tiles: one
    split when the output tiles alone fill the SMs; every split gets at least one k-tile."""
    if output_tiles >= multiprocessors:
        return 1, k_tiles
    wanted = min(SPLIT_K_MAX, math.ceil(multiprocessors / output_tiles), math.ceil(k_tiles / SPLIT_K_MIN_TILES))
    per_split = math.ceil(k_tiles / max(1, wanted))
    return math.ceil(k_tiles / per_split), per_split


_multiprocessor_counts: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _multiprocessor_counts:
        _multiprocessor_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _multiprocessor_counts[index]


def _gemm(source: str, entry_point: str, args: tuple, epilogue: tuple, mnk: tuple, act_dtype, device) -> None:
    """Launches the GEMM ``entry_point`` on the matmul ``args``, split along K where that fills more SMs, then (if
    split) its reduction, which applies the ``epilogue`` arguments (scales, bias, output) of ``qb_gemm_reduce``."""
    m, n, k = mnk
    grid = (math.ceil(n / _GEMM_TILE), math.ceil(m / _GEMM_TILE))
    k_tiles = math.ceil(k * act_dtype.itemsize / 64)
    splits, per_split = split_k(grid[0] * grid[1], k_tiles, _multiprocessors(device))
    if splits == 1:
        _launch(source, entry_point, (*grid, 1), (*args, None, k_tiles), device)
        return
    # What the kernel accumulates in: int32 sums of int8 x int8 (exact), float32 otherwise.
    dtype = torch.int32 if act_dtype == torch.int8 else torch.float32
    partial = torch.empty((splits, m, n), dtype=dtype, device=device)
    _launch(source, entry_point, (*grid, splits), (*args, partial, per_split), device)
    reduce_entry = entry_point.replace("qb_gemm<", "qb_gemm_reduce<")
    _launch(source, reduce_entry, (math.ceil(m * n / _BLOCK),), (partial, splits, m, n, *epilogue), device)


# --- library GEMMs for many rows ------------------------------------------------------------------------------
# From these row counts on, a library GEMM replaces ours: weight-only formats dequantize the weight (our
# dequantize kernel) and call cuBLAS through F.linear; int8 x int8 calls torch._int_mm; float8 x float8 calls
# torch._scaled_mm (on sm_90 the only float8 tensor-core path: mma.sync with e4m3 is emulated there). NOT YET
# MEASURED ON A GPU: these are estimates (our GEMM was estimated at 35-50% of cuBLAS at M = 2048, and dequantizing
# the whole weight is amortized over this many rows); bench/kernel_speed.py measures the crossover when a GPU is lent.
WEIGHT_ONLY_LIBRARY_ROWS = 512
INT8_LIBRARY_ROWS = 256
FP8_LIBRARY_ROWS = 256


@dataclass(frozen=True)
class LibraryContract:
    """What a private torch GEMM accepts, checked before each call (outside it, our kernel or the reference runs).

    ``a`` is ``[M, K]`` row-major, ``b`` is ``[K, N]`` column-major (the transpose of a contiguous ``[N, K]``
    weight, which is what both ops want)."""

    name: str
    min_rows: int
    k_multiple: int
    n_multiple: int
    max_k: int | None  # None: no bound
    min_capability: tuple[int, int]
    dtype_pairs: tuple[tuple[torch.dtype, torch.dtype], ...]

    def accepts(self, m: int, k: int, n: int, a_dtype: torch.dtype, b_dtype: torch.dtype, capability) -> bool:
        return (
            m >= self.min_rows
            and k > 0
            and k % self.k_multiple == 0
            and n > 0
            and n % self.n_multiple == 0
            and (self.max_k is None or k <= self.max_k)
            and tuple(capability) >= self.min_capability
            and (a_dtype, b_dtype) in self.dtype_pairs
        )


# torch._int_mm (cuBLASLt IMMA): self.size(0) > 16, K and N multiples of 8, int8 x int8 -> int32. The int32
# accumulator holds any sum of K products of int8 (|x| <= 128) exactly while K <= 2**31 / 128**2, which keeps the
# result bit for bit the reference's (float64 sums).
INT_MM = LibraryContract("torch._int_mm", 17, 8, 8, 2**31 // 128**2, (7, 5), ((torch.int8, torch.int8),))
# torch._scaled_mm, tensorwise float32 scales of 1 (our scales are applied after, as the reference does): K and
# both dimensions of mat2 multiples of 16, float8 tensor cores (sm_89+); cuBLASLt has no e5m2 x e5m2.
SCALED_MM = LibraryContract(
    "torch._scaled_mm", 1, 16, 16, None, (8, 9),
    tuple((a, b) for a in _FP8 for b in _FP8 if (a, b) != (torch.float8_e5m2, torch.float8_e5m2)),
)  # fmt: skip


def _one_cuda_device(*tensors: torch.Tensor | None) -> torch.device | None:
    """The CUDA device all the tensors are on, or None."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return None
    device = next(iter(devices))
    return device if device.type == "cuda" else None


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _library_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """cuBLAS through F.linear on a dequantized weight: the reference's own math, with our dequantize kernel."""
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _scale_rows(acc, x_scale, layout, weight_scale, bias, out_dtype, x_shape) -> torch.Tensor:
    """The reference's epilogue on a float32 ``[M, N]`` accumulator: ``acc * x_scale * w_scale^T``, cast, bias."""
    xs = x_scale.float().reshape(-1, 1) if layout == 1 else x_scale.float().reshape(())
    out = (acc * xs * weight_scale.float().reshape(1, -1)).to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x_shape[:-1], out.shape[-1])


def _int_mm_linear(x_q, x_scale, layout, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
    acc = torch._int_mm(x_q.reshape(-1, x_q.shape[-1]).contiguous(), weight.contiguous().t())
    return _scale_rows(acc.float(), x_scale, layout, weight_scale, bias, out_dtype, x_q.shape)


def _scaled_mm_linear(x_q, x_scale, layout, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=x_q.device)
    a = x_q.reshape(-1, x_q.shape[-1]).contiguous()
    acc = torch._scaled_mm(a, weight.contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return _scale_rows(acc, x_scale, layout, weight_scale, bias, out_dtype, x_q.shape)


@_register(library.linear_w8)
def _linear_w8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if not (
        x.dtype in _HALF
        and weight.dtype in _Q8
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1] > 0
        and weight_scale.numel() == weight.shape[0]
        and weight_scale.dtype in _FLOAT
        and _bias_ok(bias, weight.shape[0])
    ):
        return reference.linear_w8(x, weight, weight_scale, bias)
    m = _rows(x)
    if m >= WEIGHT_ONLY_LIBRARY_ROWS and _one_cuda_device(x, weight, weight_scale, bias) is not None:
        scale = weight_scale.reshape(-1, 1)
        # Dequantized in x's dtype when the scale has it, else in float32 and cast after: the reference's rounding.
        w = _dequantize_symmetric(weight, scale if scale.dtype == x.dtype else scale.float())
        return _library_linear(x, w, bias)
    kind = _kernel_kind(m)
    if kind is None or not _ready(kind, x, weight, weight_scale, bias):
        return reference.linear_w8(x, weight, weight_scale, bias)
    return _linear_w8_kernel(kind, x, weight, weight_scale, bias)


def _linear_w8_kernel(kind, x, weight, weight_scale, bias) -> torch.Tensor:
    return _matmul(
        kind, _code(x.dtype), _code(weight.dtype), x, weight, weight_scale.reshape(-1), None, None, 0, bias, x.dtype,
        1, weight.shape[1],
    )  # fmt: skip


@_register(library.linear_affine)
def _linear_affine(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shift: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    padded = weight.shape[-1] * 8 // bits if weight.dim() == 2 and bits in (2, 4) else 0
    if not (
        x.dtype in _HALF
        and weight.dtype == torch.uint8
        and x.dim() >= 1
        and 0 < x.shape[-1] <= padded
        and _affine_ok(weight.shape[0], padded, weight_scale, weight_shift, bits)
        and weight_shift.dtype == weight_scale.dtype
        and (padded // weight_scale.shape[1]) % _GROUP_MULTIPLE == 0
        and _bias_ok(bias, weight.shape[0])
    ):
        return reference.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)
    m = _rows(x)
    if m >= WEIGHT_ONLY_LIBRARY_ROWS and _one_cuda_device(x, weight, weight_scale, weight_shift, bias) is not None:
        w = _dequantize_affine(weight, weight_scale, weight_shift, bits)[:, : x.shape[-1]]
        return _library_linear(x, w, bias)
    kind = _kernel_kind(m)
    if kind is None or not _ready(kind, x, weight, weight_scale, weight_shift, bias):
        return reference.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)
    return _linear_affine_kernel(kind, x, weight, weight_scale, weight_shift, bits, bias)


def _linear_affine_kernel(kind, x, weight, weight_scale, weight_shift, bits, bias) -> torch.Tensor:
    from ..kernels.loader import U2_CODE, U4_CODE

    padded = weight.shape[-1] * 8 // bits
    n_groups = weight_scale.shape[1]
    return _matmul(
        kind, _code(x.dtype), U4_CODE if bits == 4 else U2_CODE, x, weight, weight_scale, weight_shift, None, 0,
        bias, x.dtype, n_groups, padded // n_groups,
    )  # fmt: skip


def _fp8_tensor_cores(device: torch.device) -> bool:
    """float8 tensor cores start with Ada (sm_89)."""
    return device.type == "cuda" and _capability(device) >= (8, 9)


@_register(library.linear_a8w8)
def _linear_a8w8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    int8_pair = x_q.dtype == weight.dtype == torch.int8
    fp8_pair = x_q.dtype in _FP8 and weight.dtype in _FP8
    layout = _scale_layout(x_q, x_scale)
    if not (
        (int8_pair or fp8_pair)
        and layout is not None
        and x_scale.dtype in _FLOAT
        and weight.dim() == 2
        and x_q.shape[-1] == weight.shape[1] > 0
        and weight_scale.numel() == weight.shape[0]
        and weight_scale.dtype in _FLOAT
        and out_dtype in _FLOAT
        and _bias_ok(bias, weight.shape[0])
    ):
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    m, k, n = _rows(x_q), x_q.shape[-1], weight.shape[0]
    device = _one_cuda_device(x_q, x_scale, weight, weight_scale, bias)
    if device is not None:
        args = (x_q, x_scale, layout, weight, weight_scale, bias, out_dtype)
        capability = _capability(device)
        if int8_pair and m >= INT8_LIBRARY_ROWS and INT_MM.accepts(m, k, n, x_q.dtype, weight.dtype, capability):
            return _int_mm_linear(*args)
        if fp8_pair and m >= FP8_LIBRARY_ROWS and SCALED_MM.accepts(m, k, n, x_q.dtype, weight.dtype, capability):
            return _scaled_mm_linear(*args)
    if fp8_pair and not _fp8_tensor_cores(x_q.device):
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    kind = _kernel_kind(m)
    if kind is None or not _ready(kind, x_q, x_scale, weight, weight_scale, bias):
        return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    return _linear_a8w8_kernel(kind, x_q, x_scale, layout, weight, weight_scale, bias, out_dtype)


def _linear_a8w8_kernel(kind, x_q, x_scale, layout, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
    x_scale = x_scale.reshape(-1).float().contiguous()
    return _matmul(
        kind, _code(x_q.dtype), _code(weight.dtype), x_q, weight, weight_scale.reshape(-1), None, x_scale, layout,
        bias, out_dtype, 1, weight.shape[1],
    )  # fmt: skip
