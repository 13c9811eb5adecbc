"""The CPU fast paths of :mod:`quanto_backend.ops.cpu` against :mod:`quanto_backend.ops.reference`.

Each case also checks which path ran: a spy counts the calls of PyTorch's packed kernels, so a silent fallback to
the reference (or a fast path taken where the kernel is wrong) fails the test.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools

import pytest
import torch
from torch import nn

from quanto_backend import freeze, ops, quantize
from quanto_backend.ops import cpu, float8, reference
from quanto_backend.ops.float8 import FLOAT8_VIA_HALF_FACTOR, float8_into

M_VALUES = (1, 2, 7, 32, 333)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# The kernels round activations (float32/float16) and outputs to bfloat16: about 2**-9 relative each.
KERNEL_RTOL = 1e-2


class Spy:
    """Counts calls of the packed CPU kernels (and still runs them)."""

    NAMES = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_int_mm")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            monkeypatch.setattr(torch, name, self._counting(name, getattr(torch, name)))

    def _counting(self, name, fn):
        @functools.wraps(fn)  # inductor registers the ops it lowers to as extern kernels by their names
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.NAMES, 0)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    cpu.clear_cache()
    cpu.int_mm_is_exact()  # the contract's one-time check of torch._int_mm, run before the counting starts
    yield Spy(monkeypatch)
    cpu.clear_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# The dequantizing path computes what the reference does, block by block of output channels: it differs only by the
# float matmul's order of additions.
DEQUANTIZED_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# The sliced int8 x int8 path (torch._int_mm) holds activations to 2**-9 of each row's mean magnitude and computes
# in float32: it is off by the reference's own bfloat16/float16 rounding of weights and outputs, or in float32 by a
# few 1e-5 (dropping one slice would cost about 1e-2).
SLICED_RTOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def check(out: torch.Tensor, ref: torch.Tensor, fast: bool, sliced: bool = False) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tolerance = KERNEL_RTOL if fast else SLICED_RTOL[out.dtype] if sliced else DEQUANTIZED_RTOL[out.dtype]
    assert rel_err(out, ref) < tolerance


def int8pack_takes(in_features: int) -> bool:
    return cpu.INT8PACK.holds() and in_features % cpu.INT8PACK.in_multiple == 0


def int8_weight(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = ops.quantize_per_token(torch.randn(out_features, in_features), torch.int8)
    return q, scale.to(dtype)


def slice_small_layers(monkeypatch) -> None:
    """The sliced ``_int_mm`` path for layers of any size (it is kept for large ones), where it holds."""
    bound = cpu._SLICED_BOUNDS.get(cpu.cpu_kind())
    if bound is not None:
        monkeypatch.setitem(cpu._SLICED_BOUNDS, cpu.cpu_kind(), dataclasses.replace(bound, min_weights=0))


def takes_sliced(out_features: int, in_features: int, fast: bool, rows: int, dtype: torch.dtype) -> bool:
    bound = cpu._sliced_bound(out_features, in_features)
    return not fast and bound is not None and bound.takes(rows, dtype)


# ---- int8 weights ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sliced_everywhere", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", [(64, 256), (48, 4104), (7, 96), (33, 40), (16, 4100), (5, 12)])
def test_linear_w8(spy, monkeypatch, shape, m, dtype, sliced_everywhere):
    if sliced_everywhere:
        slice_small_layers(monkeypatch)
    out_features, in_features = shape
    weight, scale = int8_weight(out_features, in_features, dtype)
    x = torch.randn(m, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    out = ops.linear_w8(x, weight, scale, bias)
    fast = int8pack_takes(in_features) and m <= cpu.kernel_max_rows(out_features, in_features, 8, dtype)
    sliced = takes_sliced(out_features, in_features, fast, m, dtype)
    assert (spy.calls["_weight_int8pack_mm"], spy.calls["_int_mm"]) == (int(fast), int(sliced))
    check(out, reference.linear_w8(x, weight, scale, bias), fast, sliced)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_w8_batched_input_and_float32_scale(spy, monkeypatch, dtype):
    slice_small_layers(monkeypatch)
    weight, scale = int8_weight(256, 512, torch.float32)  # a float32 scale with lower-precision activations
    x = torch.randn(2, 3, 512).to(dtype)
    out = ops.linear_w8(x, weight, scale, None)
    fast = int8pack_takes(512) and 6 <= cpu.kernel_max_rows(256, 512, 8, dtype)
    sliced = takes_sliced(256, 512, fast, 6, dtype)
    assert (spy.calls["_weight_int8pack_mm"], spy.calls["_int_mm"]) == (int(fast), int(sliced))
    check(out, reference.linear_w8(x, weight, scale.to(dtype), None), fast, sliced)


@pytest.mark.parametrize("m", [1, 4, 5, 32, 300])
def test_linear_w8_large_layer_dispatch(spy, m):
    # A layer of four million weights: the packed kernel for a few rows, then the sliced _int_mm path where it holds,
    # then (bfloat16, hundreds of rows) the dequantizing path.
    weight, scale = int8_weight(2048, 2048, torch.bfloat16)
    x = torch.randn(m, 2048, dtype=torch.bfloat16)
    out = ops.linear_w8(x, weight, scale, None)
    fast = int8pack_takes(2048) and m <= cpu.kernel_max_rows(2048, 2048, 8, torch.bfloat16)
    sliced = takes_sliced(2048, 2048, fast, m, torch.bfloat16)
    bound = cpu._SLICED_BOUNDS.get(cpu.cpu_kind())
    if bound is not None:
        assert fast == (m <= bound.kernel_rows) and sliced == (not fast and m <= bound.bfloat16_max_rows)
    assert (spy.calls["_weight_int8pack_mm"], spy.calls["_int_mm"]) == (int(fast), int(sliced))
    check(out, reference.linear_w8(x, weight, scale, None), fast, sliced)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outlier", [1.0, 50.0, 1e4])
def test_int8_slices_hold_activations_to_their_mean_magnitude(dtype, outlier):
    # Rows with one large activation among small ones (the outlier features of LLM activations) need more slices.
    x = torch.randn(5, 1000)
    x[1, 17] = outlier * x.abs().max()
    x[3] = 0.0  # an all-zero row
    x[4] = 0.3  # a constant row: its mean is its absmax, to a rounding
    x = x.to(dtype)
    slices, scale = cpu._int8_slices(x)
    radix = cpu._SLICE_RADIX ** torch.arange(len(slices), dtype=torch.float64)
    rebuilt = (slices.double() / radix.view(-1, 1, 1)).sum(0) * scale.double()
    error = (rebuilt - x.double()).abs().amax(dim=1)
    assert (error <= cpu._SLICE_ERROR * x.double().abs().mean(dim=1)).all()
    assert len(slices) == (2 if outlier == 1.0 else 3)


def test_int8_slices_refuse_what_they_cannot_hold():
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    assert cpu._int8_slices(x) is None
    wide = torch.full((2, 1 << 16), 1e-30)
    wide[0, 0] = 1e30  # absmax / mean of 2**16: more than three slices
    assert cpu._int8_slices(wide) is None


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_linear_w8_non_finite_activations_take_the_dequantizing_path(spy, monkeypatch, bad):
    slice_small_layers(monkeypatch)
    weight, scale = int8_weight(48, 64, torch.float32)
    x = torch.randn(40, 64)
    x[7, 3] = float(bad)
    out = ops.linear_w8(x, weight, scale, None)
    assert spy.calls["_int_mm"] == 0
    ref = reference.linear_w8(x, weight, scale, None)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert torch.allclose(out[finite], ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(cpu._ROW_BOUNDS))
def test_row_bound_grows_with_the_weight(monkeypatch, kind):
    # Against the dequantizing path (whose cost is per weight), the kernel keeps at least as many rows for a large
    # layer as for a small one, and always one row (decode); against the sliced _int_mm path (whose cost is
    # per weight and row), a few rows at any size. Every CPU kind's table, on whichever machine runs this.
    monkeypatch.setattr(cpu, "cpu_kind", lambda: kind)
    sliced = cpu._SLICED_BOUNDS.get(kind)
    monkeypatch.setattr(cpu, "_SLICED_BOUNDS", {})
    for bits, dtype in cpu._ROW_BOUNDS[kind]:
        rows = [cpu.kernel_max_rows(o, i, bits, dtype) for o, i in ((8, 8), (384, 384), (1536, 384), (4096, 14336))]
        assert rows[0] >= 1 and rows == sorted(rows), (bits, dtype, rows)
        if dtype == torch.float32:  # a sentence-embedding batch through a small layer leaves the kernel sooner
            assert rows[0] == 1 and rows[1] < rows[3], (bits, rows)
    if sliced is not None:
        monkeypatch.setattr(cpu, "_SLICED_BOUNDS", {kind: sliced})
        for dtype in (torch.float32, torch.bfloat16):
            assert cpu.kernel_max_rows(2048, 2048, 8, dtype) == cpu.kernel_max_rows(4096, 14336, 8, dtype)
            assert cpu.kernel_max_rows(4096, 14336, 8, dtype) == sliced.kernel_rows


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scale_dtype", DTYPES)
def test_dequantize_affine_is_the_reference_bit_for_bit(bits, scale_dtype):
    # The CPU kernel (one strided conversion per code position) and the dequantizing path's writes into a block
    # buffer of any dtype and width (the padded input dimension cut to in_features): what the reference computes.
    for rows, groups, group_size in ((7, 3, 32), (16, 1, 64), (33, 5, 128)):
        packed = torch.randint(0, 256, (rows, groups * group_size * bits // 8), dtype=torch.uint8)
        scale = torch.rand(rows, groups).to(scale_dtype)
        shift = (torch.rand(rows, groups) * 2**bits).to(scale_dtype)
        expected = reference.dequantize_affine(packed, scale, shift, bits)
        assert torch.equal(ops.dequantize_affine(packed, scale, shift, bits), expected)
        for out_dtype, width in itertools.product(DTYPES, (groups * group_size, groups * group_size - 5)):
            out = cpu._dequantize_affine_into(packed, scale, shift, bits, torch.empty(rows, width, dtype=out_dtype))
            assert torch.equal(out, expected[:, :width].to(out_dtype)), (rows, out_dtype, width)


@pytest.mark.parametrize("piece", [None, 100])
@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_into_is_exact_on_every_code(monkeypatch, dtype, piece):
    # piece: bfloat16 outputs converted in pieces (of BFLOAT16_PIECE codes, made small here), a last one ragged
    if piece:
        monkeypatch.setattr(float8, "BFLOAT16_PIECE", piece)
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).repeat(3)[: 256 * 3 - 7].view(-1, 1)
    expected = codes.float() / FLOAT8_VIA_HALF_FACTOR[dtype]  # torch's own (scalar) conversion
    for out_dtype in DTYPES:
        out = float8_into(codes, torch.empty(codes.shape, dtype=out_dtype)).float()
        assert torch.equal(out.isnan(), expected.isnan()) and int(expected.isnan().sum()) > 0
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())  # infinities (e5m2) included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", FLOAT8)
@pytest.mark.parametrize("shape", [(7, 40), (33, 1000), (48, 4104)])
def test_linear_w8_float8_weights(monkeypatch, spy, shape, weight_dtype, dtype):
    out_features, in_features = shape
    w = torch.randn(out_features, in_features)
    scale = (w.abs().amax(1, keepdim=True) / torch.finfo(weight_dtype).max).to(dtype)
    codes = (w / scale.float()).to(weight_dtype)
    misaligned = torch.empty(codes.numel() + 3, dtype=torch.uint8)[3:].view(weight_dtype).view(codes.shape)
    misaligned.copy_(codes)
    bias = torch.randn(out_features).to(dtype)
    for m in M_VALUES:
        x = torch.randn(m, in_features).to(dtype)
        ref = reference.linear_w8(x, codes, scale, bias)
        with monkeypatch.context() as patched:  # the float8 path, not the reference (torch's scalar conversion)
            patched.setattr(cpu.reference, "linear_w8", None)
            for weight in (codes, misaligned):
                check(ops.linear_w8(x, weight, scale, bias), ref, fast=False)
    assert sum(spy.calls.values()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_w8_float8_nan_codes_stay_nan(spy, dtype):
    # Whether a weight holds NaN codes is checked once per storage and version: a code written in place is seen.
    codes, scale, x = torch.randn(16, 32).to(torch.float8_e4m3fn), torch.rand(16, 1).to(dtype), torch.randn(2, 32)
    assert not ops.linear_w8(x.to(dtype), codes, scale, None).isnan().any()
    codes.view(torch.uint8)[3, 5] = 0x7F  # e4m3fn's NaN (a corrupt checkpoint)
    out = ops.linear_w8(x.to(dtype), codes, scale, None)
    assert out[:, 3].isnan().all() and not out[:, torch.arange(16) != 3].isnan().any()
    x_q, x_scale = reference.quantize_per_token(x, torch.float8_e4m3fn)
    out = ops.linear_a8w8(x_q, x_scale, codes, scale.float(), None, torch.float32)
    assert out[:, 3].isnan().all() and not out[:, torch.arange(16) != 3].isnan().any()


def test_linear_w8_other_float8_weights_take_the_reference(spy):
    weight = torch.randn(16, 32).to(torch.float8_e4m3fnuz)
    scale, x = torch.rand(16, 1), torch.randn(3, 32)
    assert torch.equal(ops.linear_w8(x, weight, scale, None), reference.linear_w8(x, weight, scale, None))
    assert sum(spy.calls.values()) == 0


# ---- int8 x int8 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("shape", [(64, 256), (48, 4104), (16, 4100)])
def test_linear_a8w8(spy, shape, per_token, m, out_dtype):
    out_features, in_features = shape
    weight, w_scale = int8_weight(out_features, in_features, out_dtype)
    x_q, x_scale = ops.quantize_per_token(torch.randn(m, in_features), torch.int8)
    if not per_token:
        x_scale = x_scale.amax()
    bias = torch.randn(out_features).to(out_dtype)
    out = ops.linear_a8w8(x_q, x_scale, weight, w_scale, bias, out_dtype)
    fast = int8pack_takes(in_features) and m <= cpu.a8w8_kernel_max_rows(out_features, in_features)
    int_mm = not fast and cpu.INT_MM.holds()
    assert spy.calls["_weight_int8pack_mm"] == int(fast) and spy.calls["_int_mm"] == int(int_mm)
    expected = reference.linear_a8w8(x_q, x_scale, weight, w_scale, bias, out_dtype)
    if fast:
        check(out, expected, fast)
    else:
        assert torch.equal(out, expected)  # _int_mm or float32 matmuls: exact sums, scaled in the reference's order


@pytest.mark.parametrize("weight_first", [False, True])
@pytest.mark.parametrize("rows, k, n, offset", [(1, 40, 33, 0), (2, 264, 16, 1), (5, 1000, 7, 3), (33, 4104, 48, 8)])
def test_int8_matmul_is_exact_in_either_operand_order(monkeypatch, weight_first, rows, k, n, offset):
    # torch._int_mm takes the weight first where INT_MM_WEIGHT_FIRST holds (Zen 4), the activations first elsewhere;
    # either way the result is the exact sums, contiguous, on odd shapes and misaligned storage (the op is exact on
    # every CPU kind probed, so both orders run on whichever machine runs this).
    kinds = frozenset({cpu.cpu_kind()} if weight_first else ())
    monkeypatch.setattr(cpu, "INT_MM_WEIGHT_FIRST", dataclasses.replace(cpu.INT_MM_WEIGHT_FIRST, kinds=kinds))
    codes = lambda n: torch.randint(-128, 128, (n + offset,), dtype=torch.int8)[offset:]  # noqa: E731
    x, weight = codes(rows * k).view(rows, k), codes(n * k).view(n, k)
    x[0], weight[0] = -128, -128  # the largest sum there is
    out = cpu._int8_matmul(x, weight)
    assert out.dtype == torch.float32 and out.shape == (rows, n) and out.is_contiguous()
    assert torch.equal(out, (x.double() @ weight.double().t()).float())


@pytest.mark.parametrize("in_features", [1024, 1025, 4104])
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_linear_a8w8_without_int_mm_sums_exactly_in_float32(monkeypatch, spy, in_features, precision):
    # Where torch._int_mm is not trusted (AVX2), rows beyond the int8pack kernel's take float32 matmuls of the
    # codes: exact up to 1024 terms per sum, chunked beyond. Extreme codes make the largest sums there are; with
    # float32 matmul precision lowered (oneDNN may then round to bfloat16), the float64 reference runs instead.
    monkeypatch.setattr(cpu, "INT_MM", cpu.KernelContract(frozenset(), 1, 1, 1))
    monkeypatch.setattr(cpu, "A8W8_INT8PACK_MAX_ROWS", {})
    monkeypatch.setattr(cpu, "kernel_max_rows", lambda *_: 0)
    sums, results = cpu._int8_sums, []
    monkeypatch.setattr(cpu, "_int8_sums", lambda *a: results.append(sums(*a)) or results[-1])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        weight = torch.randint(-128, 128, (33, in_features), dtype=torch.int8)
        weight[:2] = torch.tensor([-128, 127], dtype=torch.int8)[:, None]
        x_q = torch.full((5, in_features), -128, dtype=torch.int8)
        x_q[1:] = torch.randint(-128, 128, (4, in_features), dtype=torch.int8)
        args = (x_q, torch.rand(5, 1), weight, torch.rand(33, 1), torch.randn(33), torch.float32)
        assert torch.equal(ops.linear_a8w8(*args), reference.linear_a8w8(*args))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert spy.calls["_weight_int8pack_mm"] == spy.calls["_int_mm"] == 0
    assert len(results) == 1 and (results[0] is None) == (precision != "highest")


FLOAT8_PAIRS = [(a, w) for a in FLOAT8 for w in FLOAT8]


@pytest.mark.parametrize(("x_dtype", "w_dtype"), FLOAT8_PAIRS)
@pytest.mark.parametrize("per_token", [True, False])
def test_linear_a8w8_float8(monkeypatch, spy, x_dtype, w_dtype, per_token):
    # Float32 matmuls of the codes' values (exact products, float32 sums) against the reference's float64 sums; a
    # misaligned weight (a safetensors load) and odd shapes, with the reference patched out so that a fallback fails.
    for out_features, in_features in ((7, 40), (33, 1000), (16, 4104)):
        w_q, w_scale = reference.quantize_per_token(torch.randn(out_features, in_features), w_dtype)
        misaligned = torch.empty(w_q.numel() + 5, dtype=torch.uint8)[5:].view(w_dtype).view(w_q.shape)
        misaligned.copy_(w_q)
        bias = torch.randn(out_features)
        for m in M_VALUES:
            x = torch.randn(m, in_features) * 3
            if per_token:
                x_q, x_scale = reference.quantize_per_token(x, x_dtype)
            else:
                x_scale = x.abs().amax() / torch.finfo(x_dtype).max
                x_q = reference.quantize_symmetric(x, x_scale, x_dtype)
            expected = reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, torch.float32)
            with monkeypatch.context() as patched:
                patched.setattr(cpu.reference, "linear_a8w8", None)
                for weight in (w_q, misaligned):
                    out = ops.linear_a8w8(x_q, x_scale, weight, w_scale, bias, torch.float32)
                    assert rel_err(out, expected) < 1e-6, (out_features, in_features, m)
    assert sum(spy.calls.values()) == 0


def test_linear_a8w8_other_float8_takes_the_reference(spy):
    weight, x_q = torch.randn(16, 32).to(torch.float8_e4m3fnuz), torch.randn(3, 32).to(torch.float8_e4m3fnuz)
    args = (x_q, torch.tensor(0.5), weight, torch.rand(16, 1), None, torch.float32)
    assert torch.equal(ops.linear_a8w8(*args), reference.linear_a8w8(*args))
    assert sum(spy.calls.values()) == 0


# ---- 2/4-bit weights -------------------------------------------------------------------------------------------
def affine_weight(out_features: int, in_features: int, group_size: int, bits: int, dtype: torch.dtype):
    padded_in = -(-in_features // group_size) * group_size
    codes = torch.randint(0, 2**bits, (out_features, padded_in), dtype=torch.uint8)
    n_groups = padded_in // group_size
    scale = (torch.rand(out_features, n_groups) * 0.02 + 0.005).to(dtype)
    shift = (torch.rand(out_features, n_groups) * (2**bits - 1)).to(dtype)
    return ops.pack(codes, bits), scale, shift


def test_a_batch_beyond_the_row_bound_takes_the_dequantizing_path(spy):
    w8, s8 = int8_weight(384, 1536, torch.float32)
    w4, s4, z4 = affine_weight(384, 1536, 128, 4, torch.float32)
    beyond8, beyond4 = (cpu.kernel_max_rows(384, 1536, bits) + 1 for bits in (8, 4))
    for rows8, rows4, kernel_calls in ((beyond8, beyond4, 0), (1, 1, 1)):  # a batch, then decode
        ops.linear_w8(torch.randn(rows8, 1536), w8, s8, None)
        ops.linear_affine(torch.randn(rows4, 1536), w4, s4, z4, 4, None)
        expected = kernel_calls if cpu.INT8PACK.holds() else 0
        assert spy.calls["_weight_int8pack_mm"] == spy.calls["_weight_int4pack_mm_for_cpu"] == expected


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize(
    "shape",
    [
        (64, 256, 128),
        (48, 4100, 128),  # in_features padded to 4224: the activations are padded with zeros
        (32, 96, 32),
        (16, 512, 256),
        (32, 192, 64),
        (40, 256, 128),  # out_features not a multiple of 16: reference
        (32, 256, 16),  # group size the kernel does not take: reference
        (32, 40, 40),
    ],
)
def test_linear_affine(spy, shape, m, dtype, bits):
    out_features, in_features, group_size = shape
    weight, scale, shift = affine_weight(out_features, in_features, group_size, bits, dtype)
    x = torch.randn(m, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    out = ops.linear_affine(x, weight, scale, shift, bits, bias)
    fast = (
        cpu.INT4PACK.holds()
        and out_features % 16 == 0
        and group_size in cpu.INT4_GROUP_SIZES
        and m <= cpu.kernel_max_rows(out_features, weight.shape[-1] * 8 // bits, bits, dtype)
    )
    assert spy.calls["_weight_int4pack_mm_for_cpu"] == int(fast)
    check(out, reference.linear_affine(x, weight, scale, shift, bits, bias), fast)


def test_int4_conversion_is_cached_and_invalidated(spy):
    weight, scale, shift = affine_weight(32, 256, 128, 4, torch.bfloat16)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    for _ in range(3):
        ops.linear_affine(x, weight, scale, shift, 4, None)
    assert spy.calls["_convert_weight_to_int4pack_for_cpu"] == 1

    # An in-place write to the weight (what load_state_dict does) bumps its version: converted again, and right.
    new_weight, _, _ = affine_weight(32, 256, 128, 4, torch.bfloat16)
    with torch.no_grad():
        weight.copy_(new_weight)
    check(
        ops.linear_affine(x, weight, scale, shift, 4, None),
        reference.linear_affine(x, weight, scale, shift, 4, None),
        True,
    )
    assert spy.calls["_convert_weight_to_int4pack_for_cpu"] == 2

    # A new scale tensor (e.g. after module.to(dtype)) misses the cache too.
    scale = scale * 2
    check(
        ops.linear_affine(x, weight, scale, shift, 4, None),
        reference.linear_affine(x, weight, scale, shift, 4, None),
        True,
    )
    assert spy.calls["_convert_weight_to_int4pack_for_cpu"] == 3


def test_int4_cache_entry_dies_with_the_weight(spy):
    weight, scale, shift = affine_weight(32, 256, 128, 4, torch.bfloat16)
    ops.linear_affine(torch.randn(1, 256, dtype=torch.bfloat16), weight, scale, shift, 4, None)
    assert len(cpu._INT4_CACHE) == 1
    del weight
    gc.collect()
    assert len(cpu._INT4_CACHE) == 0


# ---- through QLinear -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "kernel"),
    [
        ({"weights": "int8"}, "_weight_int8pack_mm"),
        ({"weights": "int4"}, "_weight_int4pack_mm_for_cpu"),
        ({"weights": "int2"}, "_weight_int4pack_mm_for_cpu"),
        ({"weights": "int8", "activations": "int8", "activation_scales": "dynamic"}, "int8 x int8"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_qlinear_takes_the_fast_path_and_keeps_its_state(spy, config, kernel, dtype):
    model = nn.Sequential(nn.Linear(256, 128)).to(dtype)
    quantize(model, **config)
    freeze(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 256, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        expected = torch.nn.functional.linear(x, model[0].qweight.dequantize().to(dtype), model[0].bias)
    if kernel == "int8 x int8":  # beyond the int8pack kernel's rows: torch._int_mm, or float32 matmuls of the codes
        int8pack = 3 <= cpu.a8w8_kernel_max_rows(128, 256)
        kernel = "_weight_int8pack_mm" if int8pack else "_int_mm" if cpu.INT_MM.holds() else None
    if kernel is None:
        assert spy.calls["_weight_int8pack_mm"] == spy.calls["_int_mm"] == 0
    else:
        assert spy.calls[kernel] == 1
    # W8A8 also quantizes the activations, hence the looser bound.
    assert rel_err(out, expected) < (0.02 if "activations" in config else KERNEL_RTOL)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_compiled_qlinear_uses_the_cached_int4_kernel(spy):
    model = nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16)
    quantize(model, weights="int4")
    freeze(model)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)
        for _ in range(2):
            assert torch.equal(compiled(x), eager)
    assert spy.calls["_weight_int4pack_mm_for_cpu"] == 3
    assert spy.calls["_convert_weight_to_int4pack_for_cpu"] == 1


def test_weight_row_sums_are_cached_per_storage_and_follow_writes():
    weight = torch.randint(-128, 128, (48, 1000), dtype=torch.int8)
    calls = []
    original = cpu.reference.weight_row_sums

    def counting(w):
        calls.append(w.shape)
        return original(w)

    cpu.clear_cache()
    cpu.reference.weight_row_sums = counting
    try:
        first = ops.weight_row_sums(weight)
        assert torch.equal(first, weight.sum(dim=1, dtype=torch.int32).float())
        first.zero_()  # the caller owns its output: the cache is not touched
        assert torch.equal(ops.weight_row_sums(weight), weight.sum(dim=1, dtype=torch.int32).float())
        assert len(calls) == 1
        with torch.no_grad():
            weight[3, 7] = 127 if weight[3, 7] != 127 else -128  # an in-place write bumps the version
        assert torch.equal(ops.weight_row_sums(weight), weight.sum(dim=1, dtype=torch.int32).float())
        assert len(calls) == 2
    finally:
        cpu.reference.weight_row_sums = original
        cpu.clear_cache()
