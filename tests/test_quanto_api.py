"""optimum-quanto's public names and signatures, driven as its users call them (optimum-quanto itself is never
imported: the expected values are computed here from the documented formulas)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import quanto_backend as qb
from quanto_backend import (
    AbsmaxOptimizer,
    ActivationQBytesTensor,
    AffineOptimizer,
    Calibration,
    HqqOptimizer,
    MaxOptimizer,
    QBitsTensor,
    QBytesTensor,
    QConv2d,
    QLayerNorm,
    QLinear,
    QTensor,
    WeightQBitsTensor,
    WeightQBytesTensor,
    absmax_scale,
    freeze,
    qfloat8,
    qfloat8_e4m3fnuz,
    qint2,
    qint4,
    qint8,
    qtypes,
    quantize,
    quantize_module,
    quantize_weight,
)


def test_qtype_names():
    assert qtypes["qfloat8"] is qfloat8 is qtypes["qfloat8_e4m3fn"]
    assert qfloat8_e4m3fnuz.dtype == torch.float8_e4m3fnuz and qtypes["qfloat8_e4m3fnuz"] is qfloat8_e4m3fnuz
    assert qfloat8_e4m3fnuz.qmax == torch.finfo(torch.float8_e4m3fnuz).max


def test_fnuz_weights_quantize_and_run():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64)
    qlinear = quantize_module(linear, weights=qfloat8_e4m3fnuz)
    qlinear.freeze()
    assert qlinear.weight.dtype == torch.float8_e4m3fnuz
    expected = linear(x)
    assert ((qlinear(x) - expected).norm() / expected.norm()) < 0.05


@pytest.mark.parametrize("weights", [qint4, qfloat8_e4m3fnuz])
@pytest.mark.parametrize("scales", ["static", "dynamic"])
def test_fnuz_activations_calibrate_run_and_reload(weights, scales):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(8, 64)
    expected = model(x)
    quantize(model, weights=weights, activations=qfloat8_e4m3fnuz, activation_scales=scales)
    with torch.no_grad(), Calibration():
        model(x)
    freeze(model)
    out = model(x)
    assert 0 < ((out - expected).norm() / expected.norm()) < 0.1
    qmap = qb.quantization_map(model)
    assert qmap["0"]["activations"] == "qfloat8_e4m3fnuz"
    reloaded = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qb.requantize(reloaded, model.state_dict(), qmap)
    assert torch.equal(reloaded(x), out)


@pytest.mark.parametrize("qtype", [qint2, qint4])
def test_quanto_signature_one_group_per_row_of_any_width(qtype):
    # optimum-quanto's group_size=None is one group per output channel, whatever the width (here 5 inputs, not
    # whole bytes of codes): the row is padded inside the tensor, and the weight keeps its shape.
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    scale, shift = MaxOptimizer()(w, qtype, axis=0, group_size=None)
    assert scale.shape == shift.shape == (6, 1)
    qw = quantize_weight(w, qtype, 0, scale, shift, group_size=None)
    codes = ((w + shift) / scale).round().clamp(0, 2**qtype.bits - 1)
    assert qw.shape == (6, 5)
    assert torch.allclose(qw.dequantize(), codes * scale - shift, atol=1e-6)
    x = torch.randn(3, 5)
    assert torch.allclose(torch.nn.functional.linear(x, qw), x @ qw.dequantize().t(), atol=1e-5)


def test_absmax_scale_keeps_the_input_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    scale = absmax_scale(x, qint8)
    assert scale.dtype == torch.bfloat16 and scale.ndim == 0
    assert torch.equal(scale, (x.float().abs().max() / 127).to(torch.bfloat16))
    per_row = absmax_scale(x, qint8, axis=0)
    assert per_row.shape == (4, 1)
    assert absmax_scale(x, qfloat8, axis=-1).shape == (1, 8)
    with pytest.raises(ValueError, match="8-bit"):
        absmax_scale(x, qint4)


def test_quantize_module_returns_a_working_qmodule():
    linear = torch.nn.Linear(64, 16)
    qlinear = quantize_module(linear, weights=qint8, activations=None, optimizer=AbsmaxOptimizer())
    assert isinstance(qlinear, QLinear) and qlinear.weight_qtype is qint8
    assert quantize_module(torch.nn.ReLU(), weights=qint8) is None
    positional = quantize_module(torch.nn.Linear(64, 16), qint4, None, MaxOptimizer())  # optimum-quanto's order
    assert positional.weight_qtype is qint4 and isinstance(positional.optimizer, MaxOptimizer)


def test_module_constructors_take_quanto_keywords():
    linear = QLinear(64, 32, bias=False, dtype=torch.float32, weights=qint8, activations=qint8, optimizer=None)
    assert linear.bias is None and linear.weight.shape == (32, 64) and linear.weight_qtype is qint8
    assert linear.input_scale.shape == () and linear.output_scale.shape == ()
    conv = QConv2d(4, 8, 3, padding=1, weights="qint4", activations="qint8", quantize_input=True)
    assert conv.weight_qtype is qint4 and "input_scale" in conv._buffers and "output_scale" in conv._buffers
    norm = QLayerNorm(32, activations=qint8)
    assert norm.weight_qtype is None and "output_scale" in norm._buffers and "input_scale" in norm._buffers
    floating = QLinear(64, 32, weights=qint8, quantize_input=False, activations=qint8)
    x = torch.randn(2, 64)
    assert not hasattr(floating.quantize_input(x), "qtype") and hasattr(linear.quantize_input(x), "qtype")
    with torch.no_grad():
        out = linear(x)
    assert out.shape == (2, 32)


def test_frozen_state_dict_loads_into_an_unfrozen_module():
    torch.manual_seed(0)
    source = QLinear(64, 32, weights=qint4)
    source.freeze()
    target = QLinear(64, 32, weights=qint4)
    assert not target.frozen
    target.load_state_dict(source.state_dict())
    assert target.frozen
    x = torch.randn(2, 64)
    assert torch.equal(target(x), source(x))


def test_quanto_quantize_weight_signature_keeps_requires_grad():
    torch.manual_seed(0)
    w = torch.randn(32, 64, requires_grad=True)
    scale = AbsmaxOptimizer()(w, qint8, axis=0)
    assert scale.shape == (32, 1) and scale.dtype == w.dtype
    qw = quantize_weight(w, qint8, 0, scale)
    assert isinstance(qw, WeightQBytesTensor) and isinstance(qw, QBytesTensor) and isinstance(qw, QTensor)
    assert qw.requires_grad
    assert torch.allclose(qw.dequantize(), (w / scale).round().clamp(-127, 127) * scale)
    qw.dequantize().sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through


def test_affine_optimizer_quanto_signature_round_trips():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    scale, shift = MaxOptimizer()(w, qint4, 0, 32)
    groups = w.reshape(-1, 32)
    rmin, rmax = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    assert scale.shape == shift.shape == (64, 1)
    assert torch.allclose(scale, (rmax - rmin) / 15) and torch.allclose(shift, -rmin, atol=1e-6)
    qw = quantize_weight(w, qint4, axis=0, scale=scale, shift=shift, group_size=32)
    assert isinstance(qw, WeightQBitsTensor) and isinstance(qw, QBitsTensor) and not isinstance(qw, QBytesTensor)
    codes = ((groups + shift) / scale).round().clamp(0, 15)
    assert torch.allclose(qw.dequantize(), (codes * scale - shift).reshape(16, 128), atol=1e-5)
    # HQQ by its quanto keywords, through the same call.
    hqq_scale, hqq_shift = HqqOptimizer(iters=5, verbose=False)(w, qint4, 0, 32)
    hqq = quantize_weight(w, qint4, 0, hqq_scale, hqq_shift, 32)
    assert (hqq.dequantize() - w).pow(2).mean() <= (qw.dequantize() - w).pow(2).mean() * 1.0001
    with pytest.raises(ValueError, match="axis"):
        MaxOptimizer()(w, qint4, -1, 32)


def test_hqq_verbose_prints_its_progress(capsys):
    HqqOptimizer(iters=2, verbose=True)(torch.randn(8, 64), qint4, 0, 32)
    assert "HQQ" in capsys.readouterr().out
    assert HqqOptimizer(iters=7).iterations == 7 == HqqOptimizer(iterations=7).iters
    with pytest.raises(ValueError, match="iters"):
        HqqOptimizer(iterations=3, iters=4)


def test_absmax_optimizer_axis_none_is_per_tensor():
    w = torch.randn(8, 16)
    assert AbsmaxOptimizer()(w, qint8).shape == ()
    assert torch.equal(AbsmaxOptimizer()(w, qint8, axis=None), w.abs().max() / 127)


def test_tensor_class_constructors():
    data = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scale = torch.rand(8, 1) + 0.1
    w = WeightQBytesTensor(qint8, 0, data.shape, data.stride(), data, scale, None)
    assert torch.equal(w.dequantize(), data.float() * scale)
    act = ActivationQBytesTensor(qint8, data.shape, data.stride(), data, torch.tensor(0.5))
    assert isinstance(act, ActivationQBytesTensor) and not isinstance(act, WeightQBytesTensor)
    assert torch.equal(act.dequantize(), data.float() * 0.5)
    assert isinstance(ActivationQBytesTensor.quantize(torch.randn(2, 4), qint8, torch.tensor(0.1)), QBytesTensor)
    codes = torch.randint(0, 16, (16, 32), dtype=torch.uint8)  # [out * n_groups, group_size] for 8 x 64
    s, sh = torch.rand(16, 1) + 0.1, torch.rand(16, 1)
    q = WeightQBitsTensor(qint4, 0, 32, (8, 64), (64, 1), codes, s, sh)
    assert torch.allclose(q.dequantize(), (codes * s - sh).reshape(8, 64), atol=1e-6)
    with pytest.raises(TypeError):
        QBytesTensor(qint8, 0, (8, 16), (16, 1), data, scale)


def test_calibration_debug_prints_scales(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    quantize(model, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration(debug=True):
        model(torch.randn(2, 64))
    assert "input_scale" in capsys.readouterr().out
    freeze(model)


def test_this_librarys_quantize_weight_signature_still_works():
    w = torch.randn(16, 64)
    q = quantize_weight(w, qint4, 32, "minmax")
    assert q.group_size == 32 and isinstance(q, WeightQBitsTensor)
    assert qb.tensor.quantize_weight(w, qint8).qtype is qint8


def test_frozen_modules_round_trip_through_safetensors_into_unfrozen_ones(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize(model, weights=qint8)
    freeze(model)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), weights=qint8)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), model(x))


class _ClippedMax(AffineOptimizer):
    """A custom optimizer as optimum-quanto users write one: ``optimize(base, qtype, axis)`` on the grouped weight,
    returning optimum-quanto's (scale, shift) with ``w ~= q * scale - shift``."""

    def optimize(self, base, qtype, axis):
        dim = list(range(1, base.ndim)) if axis == 0 else list(range(0, base.ndim - 1))
        rmin, rmax = base.amin(dim=dim, keepdim=True) * 0.9, base.amax(dim=dim, keepdim=True) * 0.9
        return (rmax - rmin) / (2**qtype.bits - 1), -rmin


class _ClippedMaxHere(AffineOptimizer):
    """The same choice in this library's form: ``optimize(groups, qtype)``, shift in codes."""

    def optimize(self, groups, qtype):
        rmin, rmax = groups.amin(-1) * 0.9, groups.amax(-1) * 0.9
        scale = (rmax - rmin) / qtype.qmax
        return scale, -rmin / scale


class _HalfAbsmax(AbsmaxOptimizer):
    def optimize(self, base, qtype, axis=None):
        dim = list(range(1, base.ndim)) if axis == 0 else list(range(0, base.ndim - 1))
        return base.abs().amax(dim=dim, keepdim=True) * 0.5 / qtype.qmax


class _MaxTimesTwo(MaxOptimizer):
    def optimize(self, base, qtype, axis):
        scale, shift = super().optimize(base, qtype, axis)
        return scale * 2, shift


def _frozen(weights, optimizer, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 32))
    freeze(quantize(model, weights=weights, optimizer=optimizer))
    return model[0]


def test_custom_optimizers_in_optimum_quanto_style():
    # An affine optimize(base, qtype, axis): used by quantize(), converted to this library's convention (the
    # same dequantized weights as optimum-quanto computes with it, measured: 5e-8 relative).
    theirs, ours = _frozen(qint4, _ClippedMax()), _frozen(qint4, _ClippedMaxHere())
    torch.testing.assert_close(theirs.qweight.dequantize(), ours.qweight.dequantize(), rtol=0, atol=1e-6)
    assert not torch.equal(theirs.qweight.dequantize(), _frozen(qint4, MaxOptimizer()).qweight.dequantize())
    w = torch.randn(8, 64)
    scale, shift = _ClippedMax()(w, qint4, 0, 32)  # optimum-quanto's call, its convention back
    assert scale.shape == shift.shape == (16, 1)
    torch.testing.assert_close(shift, -w.reshape(16, 32).amin(1, keepdim=True) * 0.9)
    # A symmetric optimize(base, qtype, axis): its scales are the ones used.
    layer = _frozen(qint8, _HalfAbsmax())
    torch.manual_seed(0)
    expected = torch.nn.Linear(256, 32).weight.abs().amax(1, keepdim=True) * 0.5 / 127
    torch.testing.assert_close(layer.weight_scale, expected)
    # super().optimize(base, qtype, axis) of MaxOptimizer answers in optimum-quanto's form.
    base = torch.randn(16, 32)
    s2, t2 = _MaxTimesTwo().optimize(base, qint4, 0)
    s1, t1 = MaxOptimizer().optimize(base, qint4, 0)
    assert s1.shape == (16, 1) and torch.equal(s2, 2 * s1) and torch.equal(t2, t1)
    torch.testing.assert_close(t1, -base.amin(1, keepdim=True))


def test_custom_optimizer_with_wrong_shapes_names_itself():
    class PerTensor(AffineOptimizer):
        def optimize(self, base, qtype, axis):
            return base.abs().amax() / 15, torch.zeros(())

    with pytest.raises(ValueError, match=r"PerTensor\.optimize\(base, qtype, axis\) must return .* per group"):
        _frozen(qint4, PerTensor())
