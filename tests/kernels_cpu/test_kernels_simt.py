"""Every entry point of cuda_kernels/, compiled as C++ with the SIMT shim (ASan + UBSan) and launched by
quanto_backend/ops/cuda.py on CPU tensors, against quanto_backend/ops/reference.py.

Cases cover ragged shapes (no dimension a multiple of a tile or a vector), unaligned tensors (the kernels' scalar
paths, which a 16-byte load would fault on), and both sides of each dispatch threshold: GEMV up to GEMV_MAX_M rows
and GEMM above, one and several GEMM tiles, the row-stride loops of the elementwise kernels past their grid limit.
The elementwise kernels and the int8 x int8 matmul must match the reference bit for bit; the other matmuls are
compared to a float32 truth with a tolerance of a few output ulps, as tests/cuda does (the CPU model of mma.sync
sums exactly, so any fragment-layout or indexing bug shows as an error of the order of the outputs).
"""

from __future__ import annotations

import pytest
import torch

from quanto_backend.kernels import ENTRY_POINTS, Int64
from quanto_backend.kernels.loader import MATMUL_FORMATS, U2_CODE, U4_CODE
from quanto_backend.ops import reference
from quanto_backend.ops.cuda import FAMILIES, GEMV_MAX_M

HALF = (torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
Q8 = (torch.int8, *FP8)
FLOAT = (torch.float32, *HALF)
CODE_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.int8, 5: torch.float8_e4m3fn, 6: torch.float8_e5m2}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unaligned(t: torch.Tensor, byte_offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts ``byte_offset`` bytes past a 64-byte boundary."""
    size = t.element_size()
    assert byte_offset % size == 0
    storage = torch.empty(t.numel() + 64 // size, dtype=t.dtype)
    skip = (-storage.data_ptr() % 64 + byte_offset) // size
    out = storage[skip : skip + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == byte_offset and out.is_contiguous()
    return out


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype in (*FP8, torch.int8, torch.uint8):
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_matmul_close(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == truth.shape and actual.dtype == dtype
    assert torch.isfinite(actual).all()
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2.5e-3, torch.float32: 1e-4}[dtype]
    err = (actual.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-6)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def test_the_shim_serves_every_entry_point(simt_device):
    names = set(simt_device.entry_points())
    assert names == {e for entries in ENTRY_POINTS.values() for e in entries}


def test_first_use_self_tests_pass_on_the_shim(first_use):
    """ops/cuda.py's first use on a device (every module loaded, each family's self-test against the reference),
    run on the shim: every family enabled, no warning, and the self-tests launched every entry point."""
    assert first_use.warnings == []  # a disabled family's warning names the case that disagreed
    assert first_use.health == {(None, f): True for f in FAMILIES}
    assert set(first_use.launches) == {e for entries in ENTRY_POINTS.values() for e in entries}


def test_the_shim_reports_a_misaligned_vector_load(simt_device):
    """The GPU faults on a 16-byte load from an address that is not 16-byte aligned; so does the shim. Here the
    GEMV is told the activations are aligned (x_vec = 1) when they are not."""
    x = unaligned(torch.randn(1, 64).to(torch.float16), 2)
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    scale = torch.ones(8, dtype=torch.float16)
    out = torch.empty(1, 8, dtype=torch.float16)
    args = (x, w, scale, None, None, None, out, 1, 8, 64, 64, 1, 64, 0, 1, 0, 1, 1, 1)
    with pytest.raises(AssertionError, match="misaligned"):
        simt_device.launch("qb_gemv<1, 3>", (1,), (256,), args)


# --- elementwise kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 12)])
def test_pack_unpack(cuda_ops, simt_device, bits, shape):
    values = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=gen())
    packed = cuda_ops._pack(values, bits)
    assert_bits_equal(packed, reference.pack(values, bits))
    assert_bits_equal(cuda_ops._unpack(packed, bits), values)
    wide = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(1))  # unmasked codes spill like the reference
    assert_bits_equal(cuda_ops._pack(wide, bits), reference.pack(wide, bits))
    assert simt_device.launches == ["qb_pack", "qb_unpack", "qb_pack"]


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_grid_stride(simt_device, bits):
    """More bytes than threads in the grid (the host caps the grid at 65535 blocks): two blocks stride over 5000."""
    values = torch.randint(0, 256, (5000 * 8 // bits,), dtype=torch.uint8, generator=gen(2))
    packed = torch.full((5000,), 0xAB, dtype=torch.uint8)
    simt_device.launch("qb_pack", (2,), (256,), (values, packed, Int64(5000), bits))
    assert_bits_equal(packed, reference.pack(values, bits))
    codes = torch.full_like(values, 0xAB)
    simt_device.launch("qb_unpack", (2,), (256,), (packed, codes, Int64(5000), bits))
    assert_bits_equal(codes, reference.unpack(packed, bits))


def _scales(x: torch.Tensor, per_row: bool, dtype: torch.dtype, qmax: float) -> torch.Tensor:
    s = x.float().abs().amax(dim=-1, keepdim=True) if per_row else x.float().abs().amax()
    return (s / qmax).clamp_min(1e-8).to(dtype)


@pytest.mark.parametrize("qdtype", Q8)
@pytest.mark.parametrize("x_dtype", FLOAT)
def test_quantize_dequantize_symmetric(cuda_ops, simt_device, monkeypatch, qdtype, x_dtype):
    # One value per row (bfloat16) and one for the whole tensor (float32), across the 9 dtype pairs.
    qmax = 127.0 if qdtype == torch.int8 else torch.finfo(qdtype).max
    for shape, per_row, scale_dtype in (((7, 300), True, torch.bfloat16), ((2, 3, 33), False, torch.float32)):
        x = (torch.randn(shape, generator=gen()) * 3).to(x_dtype)
        scale = _scales(x, per_row, scale_dtype, qmax)
        q = cuda_ops._quantize_symmetric(x, scale, qdtype)
        assert_bits_equal(q, reference.quantize_symmetric(x, scale, qdtype))
        saturated = cuda_ops._quantize_symmetric(x * 4, scale, qdtype)
        assert_bits_equal(saturated, reference.quantize_symmetric(x * 4, scale, qdtype))
        assert_bits_equal(cuda_ops._dequantize_symmetric(q, scale), reference.dequantize_symmetric(q, scale))
    # More rows than the grid has: blocks stride over rows (the host caps grid.y at 65535; here at 3).
    monkeypatch.setattr(cuda_ops, "_MAX_GRID_Y", 3)
    x = unaligned((torch.randn(8, 45, generator=gen(1)) * 3).to(x_dtype), 4 if x_dtype == torch.float32 else 2)
    scale = _scales(x, True, torch.float32, qmax)
    q = cuda_ops._quantize_symmetric(x, scale, qdtype)
    assert_bits_equal(q, reference.quantize_symmetric(x, scale, qdtype))
    assert_bits_equal(cuda_ops._dequantize_symmetric(q, scale), reference.dequantize_symmetric(q, scale))


@pytest.mark.parametrize("qdtype", Q8)
@pytest.mark.parametrize("x_dtype", FLOAT)
def test_quantize_per_token(cuda_ops, simt_device, qdtype, x_dtype):
    # cols below and above the block of 256 threads; an all-zero row gets scale 1.
    for shape in ((3, 7), (4, 1000)):
        x = (torch.randn(shape, generator=gen()) * 5).to(x_dtype)
        x[0] = 0
        q, scale = cuda_ops._quantize_per_token(x, qdtype)
        q_ref, scale_ref = reference.quantize_per_token(x, qdtype)
        assert_bits_equal(scale, scale_ref)
        assert_bits_equal(q, q_ref)


def _affine_params(w: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype):
    groups = w.float().unflatten(-1, (-1, group_size))
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6)
    shift = -lo / scale
    return scale.to(dtype), shift.to(dtype)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_dequantize_affine(cuda_ops, simt_device, monkeypatch, bits, group_size):
    monkeypatch.setattr(cuda_ops, "_MAX_GRID_Y", 4)  # 5 rows: the last block strides to its second row
    w_dtype = FLOAT[(bits + group_size // 32) % 3]
    w = torch.randn(5, 3 * group_size, generator=gen()).to(w_dtype)
    scale, shift = _affine_params(w, group_size, bits, w_dtype)
    packed = cuda_ops._quantize_affine(w, scale, shift, bits)
    assert_bits_equal(packed, reference.quantize_affine(w, scale, shift, bits))
    out = cuda_ops._dequantize_affine(packed, scale, shift, bits)
    assert_bits_equal(out, reference.dequantize_affine(packed, scale, shift, bits))


# --- matmuls ---------------------------------------------------------------------------------------------------

# (M, K, N, unaligned). GEMV: its unchecked loops (two steps per iteration, then one, then the checked tail) on
# both sides of M = 8 (one row-half of the mma tile or two), with K long enough for several iterations per warp
# (`None`: 20.75 warp steps, see _long_k); and the checked loop alone, for unaligned tensors. GEMM: just above
# GEMV_MAX_M (one tile of rows) and above one tile; K and N ragged. On an H100's 132 SMs (the shim's count) these
# two output tiles split along K: 4 splits of 2, 2, 2 and 1 k-tiles, 2 of 2 and 1, or 2 of 2 each (8-bit
# activations); one SM (the last case) leaves a K of 9 or 17 k-tiles unsplit.
GEMV_CASES = (
    (1, None, 24, False),
    (8, None, 9, False),
    (9, None, 17, False),
    (12, None, 11, False),
    (GEMV_MAX_M, 333, 19, True),
)
GEMM_CASES = ((GEMV_MAX_M + 1, 200, 136, True, 132), (129, 96, 40, False, 132), (40, 520, 72, False, 1))


def _long_k(fmt: tuple[int, int]) -> int:
    """20 full warp steps of the GEMV and 48 values more (16-byte aligned rows for every format)."""
    bits = {U4_CODE: 4, U2_CODE: 2}.get(fmt[1], 8)
    return 20 * 4 * (128 // bits) + 48


def _format_id(fmt: tuple[int, int]) -> str:
    names = {1: "f16", 2: "bf16", 3: "i8", 5: "e4m3", 6: "e5m2", U4_CODE: "u4", U2_CODE: "u2"}
    return f"{names[fmt[0]]}-{names[fmt[1]]}"


def _run_matmul(cuda_ops, simt_device, fmt: tuple[int, int], m: int, k: int, n: int, misaligned: bool, seed: int):
    """Runs the matmul of ``fmt`` through ops/cuda.py and checks it; returns the kind of kernel launched."""
    act, weight = fmt
    bias_seed = gen(seed + 2)
    if weight in (U4_CODE, U2_CODE):
        bits = 4 if weight == U4_CODE else 2
        x_dtype = CODE_DTYPES[act]
        # Groups of 32 and of 64 (for 2-bit weights: two groups in a lane's 16 bytes, or one) on each side of
        # M = 8; unaligned: a group size that is not a power of two and float32 scales (the checked loop's cases).
        group_size = 96 if misaligned else 32 if m in (1, 12) else 64
        padded = -(-k // group_size) * group_size
        w = torch.randn(n, padded, generator=gen(seed + 1))
        w[:, k:] = 0
        scale, shift = _affine_params(w, group_size, bits, torch.float32 if misaligned else x_dtype)
        packed = reference.quantize_affine(w, scale, shift, bits)
        x = torch.randn(m, k, generator=gen(seed)).to(x_dtype)
        if misaligned:
            x, packed = unaligned(x, 2), unaligned(packed, 5)
        bias = torch.randn(n, generator=bias_seed).to(x_dtype) if m % 2 else None
        out = cuda_ops._linear_affine(x, packed, scale, shift, bits, bias)
        w_ref = reference.dequantize_affine(packed, scale, shift, bits)[:, :k].to(x_dtype).float()
        truth = x.float() @ w_ref.t() + (0 if bias is None else bias.float())
        assert_matmul_close(out, truth, x_dtype)
    elif act in (1, 2):
        x_dtype, w_dtype = CODE_DTYPES[act], CODE_DTYPES[weight]
        x = torch.randn(m, k, generator=gen(seed)).to(x_dtype)
        w = torch.randn(n, k, generator=gen(seed + 1))
        qmax = 127.0 if w_dtype == torch.int8 else torch.finfo(w_dtype).max
        scale = _scales(w, True, x_dtype, qmax)
        q = reference.quantize_symmetric(w, scale, w_dtype)
        if misaligned:
            x, q = unaligned(x, 6), unaligned(q, 3)
        bias = torch.randn(n, generator=bias_seed).to(x_dtype) if m % 2 else None
        out = cuda_ops._linear_w8(x, q, scale, bias)
        truth = x.float() @ (q.float() * scale.float()).t() + (0 if bias is None else bias.float())
        assert_matmul_close(out, truth, x_dtype)
    else:
        x_dtype, w_dtype = CODE_DTYPES[act], CODE_DTYPES[weight]
        x = torch.randn(m, k, generator=gen(seed)) * 2
        per_token = not misaligned
        if per_token:
            x_q, x_scale = reference.quantize_per_token(x, x_dtype)
        else:
            qmax = 127.0 if x_dtype == torch.int8 else torch.finfo(x_dtype).max
            x_scale = (x.abs().amax() / qmax).float()
            x_q = reference.quantize_symmetric(x, x_scale, x_dtype)
        w_q, w_scale = reference.quantize_per_token(torch.randn(n, k, generator=gen(seed + 1)), w_dtype)
        if misaligned:
            x_q, w_q = unaligned(x_q, 1), unaligned(w_q, 7)
        out_dtype = torch.float16 if m % 2 else torch.float32
        bias = torch.randn(n, generator=bias_seed).to(out_dtype) if m % 2 else None
        # float8 pairs reach the kernels on sm_89+ only: the fixture's device has float8 tensor cores.
        out = cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        if act == 3:
            assert_bits_equal(out, reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype))
        else:
            truth = (x_q.float() @ w_q.float().t()) * x_scale * w_scale.t() + (0 if bias is None else bias.float())
            assert_matmul_close(out, truth, out_dtype)
    return simt_device.launches


@pytest.mark.parametrize("fmt", MATMUL_FORMATS, ids=_format_id)
def test_gemv(cuda_ops, simt_device, fmt):
    for i, (m, k, n, misaligned) in enumerate(GEMV_CASES):
        launches = _run_matmul(cuda_ops, simt_device, fmt, m, k or _long_k(fmt), n, misaligned, seed=10 * i)
        assert launches[-1] == f"qb_gemv<{fmt[0]}, {fmt[1]}>"


@pytest.mark.parametrize("fmt", MATMUL_FORMATS, ids=_format_id)
def test_gemm(cuda_ops, simt_device, monkeypatch, fmt):
    splits_seen = set()
    for i, (m, k, n, misaligned, sms) in enumerate(GEMM_CASES):
        monkeypatch.setattr(cuda_ops, "_multiprocessors", lambda device, sms=sms: sms)
        simt_device.launches = []
        launches = _run_matmul(cuda_ops, simt_device, fmt, m, k, n, misaligned, seed=10 * i)
        act_bytes = 1 if fmt[0] in (3, 5, 6) else 2
        splits, _ = cuda_ops.split_k(-(-n // 128) * -(-m // 128), -(-k * act_bytes // 64), sms)
        gemm = f"qb_gemm<{fmt[0]}, {fmt[1]}>"
        assert launches == ([gemm] if splits == 1 else [gemm, f"qb_gemm_reduce<{fmt[0]}, {fmt[1]}>"])
        splits_seen.add(splits)
    assert 1 in splits_seen and max(splits_seen) >= 2
