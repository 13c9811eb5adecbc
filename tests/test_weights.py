"""quantize_weight: formats, group layout, optimizers, edge cases."""

import pytest
import torch

from quanto_backend import (
    AbsmaxOptimizer,
    GroupedQWeight,
    HqqOptimizer,
    MinMaxOptimizer,
    PerAxisQWeight,
    qfloat8,
    qfloat8_e5m2,
    qint2,
    qint4,
    qint8,
    quantize_weight,
)
from quanto_backend.tensor import group_layout


def _rel_error(q, w):
    return ((q.dequantize() - w).norm() / w.norm()).item()


@pytest.mark.parametrize("qtype, bound", [(qint8, 0.01), (qfloat8, 0.05), (qfloat8_e5m2, 0.1)])
def test_8bit_per_axis(qtype, bound):
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    q = quantize_weight(w, qtype)
    assert isinstance(q, PerAxisQWeight)
    assert q.qdata.dtype == qtype.dtype and q.qdata.shape == (64, 128)
    assert q.scale.shape == (64, 1) and q.scale.dtype == torch.bfloat16
    assert q.shape == w.shape and q.dtype == w.dtype and q.qtype is qtype
    assert _rel_error(q, w.float()) < bound


@pytest.mark.parametrize("qtype, group_size, bound", [(qint4, 128, 0.12), (qint4, 32, 0.1), (qint2, 64, 0.5)])
def test_grouped_affine(qtype, group_size, bound):
    w = torch.randn(32, 256)
    q = quantize_weight(w, qtype, group_size=group_size)
    assert isinstance(q, GroupedQWeight) and q.group_size == group_size
    assert q.qdata.dtype == torch.uint8 and q.qdata.shape == (32, 256 * qtype.bits // 8)
    assert q.scale.shape == q.shift.shape == (32, 256 // group_size)
    assert _rel_error(q, w) < bound


def test_default_group_size_is_128():
    assert quantize_weight(torch.randn(4, 512), qint4).group_size == 128


def test_group_layout_pads_the_last_group():
    assert group_layout(4100, 128) == (128, 4224)
    assert group_layout(384, 128) == (128, 384)
    assert group_layout(20, 128) == (24, 24)  # never larger than the (rounded-up) input


def test_in_features_not_a_multiple_of_the_group():
    w = torch.randn(16, 100)
    q = quantize_weight(w, qint4, group_size=32)
    assert q.scale.shape == (16, 4) and q.qdata.shape == (16, 128 * 4 // 8)
    back = q.dequantize()
    assert back.shape == (16, 100)
    assert _rel_error(q, w) < 0.12


@pytest.mark.parametrize("group_size", [0, -8, 12, 7.5, "64"])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 64), qint4, group_size=group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("position", [(0, 0), (1, 3), (3, 63)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(bad, position, dtype):
    w = torch.randn(4, 64, dtype=dtype)
    w[position] = bad
    for qtype in (qint8, qint4):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_weight(w, qtype)
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_weight(w.t().contiguous().t(), qtype)  # a non-contiguous view


def test_absmax_scales_are_the_largest_magnitudes():
    w = torch.randn(6, 5, 3)
    w[2, 1, 1], w[4, 0, 2] = -9.0, 7.0  # a negative and a positive extreme
    for axis, dims in ((0, (1, 2)), (1, (0, 2)), (-1, (0, 1)), (None, (0, 1, 2))):
        scale = AbsmaxOptimizer().optimize(w, qint8, axis)
        expected = w.abs().amax(dim=dims, keepdim=axis is not None) / 127
        torch.testing.assert_close(scale, expected, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [qint8, qfloat8, qint4, qint2])
def test_zero_rows_and_groups_come_back_exactly(qtype):
    w = torch.randn(8, 128)
    w[2] = 0
    w[5, 64:] = 0
    w[6, :64] = 0.25  # a constant non-zero group
    q = quantize_weight(w, qtype, group_size=64)
    assert torch.isfinite(q.scale).all()
    back = q.dequantize()
    assert (back[2] == 0).all() and (back[5, 64:] == 0).all()
    if qtype.is_packed:
        assert (back[6, :64] == 0.25).all()


def test_hqq_beats_minmax_on_a_real_weight(minilm_weight):
    for qtype, group_size in [(qint4, 128), (qint4, 32), (qint2, 64)]:
        minmax = _rel_error(quantize_weight(minilm_weight, qtype, group_size, MinMaxOptimizer()), minilm_weight)
        hqq = _rel_error(quantize_weight(minilm_weight, qtype, group_size, HqqOptimizer()), minilm_weight)
        assert hqq < minmax * 0.97, (qtype, group_size, hqq, minmax)


def test_hqq_stops_early_close_to_the_full_refinement(minilm_weight, monkeypatch):
    steps = []
    fit = HqqOptimizer._fit
    monkeypatch.setattr(HqqOptimizer, "_fit", staticmethod(lambda *args: steps.append(1) or fit(*args)))
    early = _rel_error(quantize_weight(minilm_weight, qint4, 128, HqqOptimizer()), minilm_weight)
    early_steps, steps[:] = len(steps), []
    full = _rel_error(quantize_weight(minilm_weight, qint4, 128, HqqOptimizer(tolerance=0)), minilm_weight)
    assert 1 <= early_steps < len(steps) <= 20
    assert full <= early < full * 1.01


def test_hqq_shrinks_large_residuals_with_the_lp_operator():
    optimizer, beta = HqqOptimizer(), 10.0
    w, residual = torch.randn(4096), torch.randn(4096) * 0.3  # about half beyond the threshold of 0.17
    p = optimizer.lp_norm
    shrunk = torch.sign(residual) * torch.relu(residual.abs() - residual.abs().pow(p - 1) / beta)
    assert (shrunk != 0).float().mean() > 0.3
    torch.testing.assert_close(optimizer._target(w, residual, beta), w - shrunk)
    assert optimizer._target(w, residual * 0.1, beta) is w  # nothing beyond the threshold: no shrinkage


def test_optimizer_must_fit_the_format():
    with pytest.raises(ValueError, match="affine optimizer"):
        quantize_weight(torch.randn(4, 64), qint4, optimizer="absmax")
    with pytest.raises(ValueError, match="symmetric optimizer"):
        quantize_weight(torch.randn(4, 64), qint8, optimizer="hqq")
    with pytest.raises(ValueError, match="accepted: absmax, minmax, hqq"):
        quantize_weight(torch.randn(4, 64), qint8, optimizer="best")


def test_bad_inputs():
    with pytest.raises(ValueError, match="int3"):
        quantize_weight(torch.randn(4, 64), "int3")
    with pytest.raises(TypeError, match="floating point"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int32), qint8)
    with pytest.raises(ValueError, match="at least 2 dims"):
        quantize_weight(torch.randn(64), qint8)


def test_conv_weight_grouped_over_flattened_inputs():
    w = torch.randn(8, 3, 3, 3)
    q = quantize_weight(w, qint4, group_size=16)
    assert q.scale.shape == (8, 2)  # 27 inputs padded to 32
    assert q.dequantize().shape == w.shape
    assert _rel_error(q, w) < 0.12


def test_mse_clip_search_is_near_hqq_and_the_4bit_default(minilm_weight):
    from quanto_backend import MseOptimizer

    for group_size in (128, 32):
        minmax = _rel_error(quantize_weight(minilm_weight, qint4, group_size, MinMaxOptimizer()), minilm_weight)
        hqq = _rel_error(quantize_weight(minilm_weight, qint4, group_size, HqqOptimizer()), minilm_weight)
        mse = _rel_error(quantize_weight(minilm_weight, qint4, group_size, MseOptimizer()), minilm_weight)
        default = _rel_error(quantize_weight(minilm_weight, qint4, group_size), minilm_weight)
        assert mse < minmax * 0.97 and mse < hqq * (1.01 if group_size == 128 else 1.04), (group_size, mse, hqq, minmax)
        assert default == mse
        assert _rel_error(quantize_weight(minilm_weight, qint4, group_size, "mse"), minilm_weight) == mse
    # At 2 bits HQQ stays the default.
    assert _rel_error(quantize_weight(minilm_weight, qint2, 64), minilm_weight) == _rel_error(
        quantize_weight(minilm_weight, qint2, 64, HqqOptimizer()), minilm_weight
    )


def test_mse_clip_search_never_worse_than_minmax_and_exact_on_flat_groups():
    from quanto_backend import MseOptimizer

    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    w[3] = 0.5  # constant rows: exact, as with min-max
    w[4, :128] = 0
    for shrink in [(1.0,), (1.0, 0.8), (1.0, 0.9, 0.8, 0.7)]:
        q = quantize_weight(w, qint4, 128, MseOptimizer(shrink))
        per_group = lambda q: ((q.dequantize() - w) ** 2).reshape(16, 2, 128).sum(-1)  # noqa: E731
        assert (per_group(q) <= per_group(quantize_weight(w, qint4, 128, "minmax")) + 1e-6).all()
        assert (q.dequantize()[3] == 0.5).all() and (q.dequantize()[4, :128] == 0).all()
    with pytest.raises(ValueError, match="shrink"):
        MseOptimizer((1.0, 1.5))


def test_mse_clip_search_is_the_same_in_any_blocks_and_refits_down():
    from quanto_backend import MseOptimizer
    from quanto_backend.tensor import MinMaxOptimizer

    torch.manual_seed(0)
    groups = (torch.randn(37, 3, 64) * torch.rand(37, 3, 1)).to(torch.bfloat16)  # 111 groups
    whole = MseOptimizer().optimize(groups, qint4)
    blocked = MseOptimizer()
    blocked.block_elements = 64 * 10  # blocks of 10 groups and a last one of 1
    for a, b in zip(whole, blocked.optimize(groups, qint4), strict=True):
        assert a.shape == (37, 3) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def error(scale, shift):
        w = groups.float()
        codes = (w / scale[..., None] + shift[..., None]).round().clamp(0, 15)
        return (((codes - shift[..., None]) * scale[..., None] - w) ** 2).sum(-1)

    searched = error(*MseOptimizer(refit=False).optimize(groups, qint4))
    refit = error(*whole)
    assert (refit <= searched * (1 + 1e-5) + 1e-9).all()  # the refit never raises a group's error
    assert refit.sum() < searched.sum() and searched.sum() < error(*MinMaxOptimizer().optimize(groups, qint4)).sum()
