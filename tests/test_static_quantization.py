import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from quanto_backend import (
    AffineQActivation,
    Calibration,
    HistogramObserver,
    MinMaxObserver,
    PerAxisAffineQWeight,
    QLayerNorm,
    QLinear,
    convert_static,
    freeze,
    insert_observers,
    ops,
    qfloat8,
    qint8,
    quantization_map,
    quantize,
    quantize_weight,
    quint8,
    requantize,
)


def _toy() -> nn.Sequential:
    """The seed's toy model: two bias-free Linears in bfloat16."""
    return nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(torch.bfloat16)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _static(model: nn.Module, samples, weights=quint8, observer=MinMaxObserver) -> nn.Module:
    insert_observers(model, observer=observer, activations=quint8)
    with torch.no_grad():
        for x in samples:
            model(x)
    return freeze(convert_static(model, weights=weights))


# ---- ops ---------------------------------------------------------------------------------------------------------
def test_quantize_asymmetric_rounds_shifts_and_clamps():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.24, 1.0, 100.0])
    q = ops.quantize_asymmetric(x, torch.tensor(0.5), torch.tensor(3, dtype=torch.int32))
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 2, 3, 3, 5, 203]
    back = ops.dequantize_asymmetric(q, torch.tensor(0.5), torch.tensor(3, dtype=torch.int32))
    assert back.tolist() == [-1.5, -0.5, 0.0, 0.0, 1.0, 100.0]


@pytest.mark.parametrize("weight_zero_point", [True, False])
@pytest.mark.parametrize("per_token", [True, False])
def test_linear_a8w8_asymmetric_matches_the_dequantized_product(weight_zero_point, per_token):
    x_q = torch.randint(0, 256, (3, 5, 96), dtype=torch.uint8)
    x_scale = torch.rand(3, 5, 1) + 0.1 if per_token else torch.tensor(0.02)
    x_zp = torch.randint(0, 256, (3, 5, 1), dtype=torch.int32) if per_token else torch.tensor(131, dtype=torch.int32)
    if weight_zero_point:
        w = torch.randint(0, 256, (40, 96), dtype=torch.uint8)
        w_zp = torch.randint(0, 256, (40, 1)).float()
    else:
        w, w_zp = torch.randint(-127, 128, (40, 96), dtype=torch.int8), None
    w_scale = torch.rand(40, 1) * 0.01
    bias = torch.randn(40)
    out = ops.linear_a8w8_asymmetric(x_q, x_scale, x_zp, w, w_scale, w_zp, bias, torch.float32)
    x = (x_q.double() - x_zp.double()) * x_scale.double()
    wf = (w.double() - (0 if w_zp is None else w_zp.double())) * w_scale.double()
    expected = (x @ wf.t() + bias.double()).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The integer form a kernel uses: an int matmul minus rank-one zero-point corrections.
    if weight_zero_point and not per_token:
        acc = x_q.long() @ w.long().t()
        acc = acc - x_zp.long() * w.long().sum(1) - w_zp.long().t() * x_q.long().sum(-1, keepdim=True)
        acc = acc + 96 * x_zp.long() * w_zp.long().t()
        torch.testing.assert_close(out, (acc.double() * x_scale * w_scale.t() + bias).float(), rtol=1e-5, atol=1e-5)


def test_new_ops_have_fake_implementations():
    with torch._subclasses.FakeTensorMode():
        x_q = torch.empty(2, 7, 16, dtype=torch.uint8)
        w = torch.empty(8, 16, dtype=torch.uint8)
        out = ops.linear_a8w8_asymmetric(
            x_q, torch.empty(()), torch.empty((), dtype=torch.int32), w, torch.empty(8, 1), torch.empty(8, 1), None,
            torch.bfloat16,
        )  # fmt: skip
        assert out.shape == (2, 7, 8) and out.dtype == torch.bfloat16
        assert ops.linear_w8_asymmetric(torch.empty(3, 16), w, torch.empty(8, 1), torch.empty(8, 1), None).shape == (
            3,
            8,
        )
        assert ops.quantize_asymmetric(torch.empty(3, 16), torch.empty(()), torch.empty(())).dtype == torch.uint8


# ---- per-axis uint8 weights --------------------------------------------------------------------------------------
def test_quint8_weights_are_per_axis_affine():
    w = torch.randn(32, 48) + torch.linspace(-2, 2, 32).unsqueeze(1)  # rows off-centre: the zero-point matters
    w[3] = 0
    qw = quantize_weight(w, quint8)
    assert isinstance(qw, PerAxisAffineQWeight)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (32, 48)
    assert qw.scale.shape == (32, 1) and qw.shift.shape == (32, 1)
    assert torch.equal(qw.shift, qw.shift.round()) and qw.shift.min() >= 0 and qw.shift.max() <= 255
    assert ((qw.dequantize() - w).abs() <= qw.scale / 2 + 1e-6).all()
    assert torch.equal(qw.dequantize()[3], torch.zeros(48))
    symmetric = quantize_weight(w, qint8).dequantize()
    assert (qw.dequantize() - w).abs().mean() < (symmetric - w).abs().mean()
    x = torch.randn(4, 48)
    torch.testing.assert_close(F.linear(x, qw), F.linear(x, qw.dequantize()), rtol=1e-4, atol=1e-4)


def test_quint8_weights_on_meta_and_refusing_other_optimizers():
    qw = quantize_weight(torch.empty(8, 16, device="meta", dtype=torch.bfloat16), quint8)
    assert qw.qdata.shape == (8, 16) and qw.shift.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="minmax"):
        quantize_weight(torch.randn(8, 16), quint8, optimizer="hqq")


def test_weight_only_quint8_linear_runs_through_the_asymmetric_op():
    model = quantize(nn.Sequential(nn.Linear(32, 16)), weights=quint8)
    x = torch.randn(5, 32)
    before = model(x)
    freeze(model)
    assert model[0].weight.dtype == torch.uint8 and model[0].weight_shift.shape == (16, 1)
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(model(x), F.linear(x, model[0].qweight.dequantize(), model[0].bias))


# ---- the static workflow -----------------------------------------------------------------------------------------
def test_toy_model_static_uint8_activations_and_weights_is_close_to_float():
    model = _toy()
    samples = [torch.randn(16, 64, dtype=torch.bfloat16) for _ in range(4)]
    test = torch.randn(32, 64, dtype=torch.bfloat16)
    expected = model(test)
    qmodel = _static(copy.deepcopy(model), samples)
    for i in (0, 2):
        layer = qmodel[i]
        assert isinstance(layer, QLinear) and layer.weight.dtype == torch.uint8
        assert layer.input_zero_point.dtype == torch.int32 and layer.input_scale.ndim == 0
        assert not hasattr(layer, "input_observer")
    # The second layer reads ReLU outputs: its zero-point sits at the bottom of the code range.
    assert qmodel[2].input_zero_point.item() == 0 and 0 < qmodel[0].input_zero_point.item() < 255
    with torch.no_grad():
        out = qmodel(test)
    assert out.dtype == torch.bfloat16
    assert _cosine(out, expected) > 0.999
    # The static parameters are the observers' min/max of the float activations.
    x_min, x_max = torch.cat(samples).float().aminmax()
    torch.testing.assert_close(qmodel[0].input_scale, (x_max - x_min) / 255)


def test_static_modules_compute_through_the_zero_point_op(monkeypatch):
    qmodel = _static(_toy(), [torch.randn(8, 64, dtype=torch.bfloat16)])
    calls = []
    original = ops.linear_a8w8_asymmetric
    monkeypatch.setattr(ops, "linear_a8w8_asymmetric", lambda *a: calls.append(a) or original(*a))
    with torch.no_grad():
        qmodel(torch.randn(3, 64, dtype=torch.bfloat16))
    assert len(calls) == 2 and calls[0][0].dtype == torch.uint8 and calls[0][3].dtype == torch.uint8


def test_static_state_round_trips_through_safetensors(tmp_path):
    qmodel = _static(_toy(), [torch.randn(16, 64, dtype=torch.bfloat16) for _ in range(2)])
    state = qmodel.state_dict()
    assert {"0.weight", "0.weight_scale", "0.weight_shift", "0.input_scale", "0.input_zero_point"} <= set(state)
    assert not any(k.endswith(("_g", "_v")) for k in state)
    save_file(state, tmp_path / "model.safetensors")
    with torch.device("meta"):
        skeleton = _toy()
    requantize(skeleton, load_file(tmp_path / "model.safetensors"), quantization_map(qmodel), device="cpu")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(skeleton(x), qmodel(x))
    assert skeleton[0].input_zero_point.item() == qmodel[0].input_zero_point.item()


def test_static_model_compiles():
    qmodel = _static(_toy(), [torch.randn(16, 64, dtype=torch.bfloat16)])
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    compiled = torch.compile(qmodel, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), qmodel(x), rtol=0, atol=0)


def test_percentile_observer_resists_an_outlier_batch():
    model = nn.Sequential(nn.Linear(64, 64))
    samples = [torch.randn(64, 64) for _ in range(4)]
    samples[1][0, 0] = 400.0  # one wild value in 16384
    test = torch.randn(64, 64)
    expected = model(test)
    errors = {}
    for name, observer in (
        ("minmax", MinMaxObserver),
        ("histogram", functools.partial(HistogramObserver, percentile=99.9)),
    ):
        qmodel = _static(copy.deepcopy(model), samples, weights=qint8, observer=observer)
        with torch.no_grad():
            errors[name] = (qmodel(test) - expected).abs().mean().item()
    assert errors["histogram"] < 0.5 * errors["minmax"]


def test_observe_outputs_and_layernorm_feeding_uint8_activations():
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(16, 32)
    expected = model(x)
    insert_observers(model, activations=quint8, outputs=True)
    assert hasattr(model[0], "output_observer") and not hasattr(model[0], "input_observer")
    assert hasattr(model[1], "input_observer") and hasattr(model[1], "output_observer")
    with torch.no_grad():
        model(x)
    freeze(convert_static(model, weights=qint8))
    assert isinstance(model[0], QLayerNorm) and model[0].output_zero_point.dtype == torch.int32
    with torch.no_grad():
        out = model(x)
        assert isinstance(model[0](x), AffineQActivation)
    assert _cosine(out.dequantize(), expected) > 0.995


def test_filters_by_type_and_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8))
    insert_observers(model, types=nn.Linear, exclude="2")
    assert [hasattr(m, "input_observer") for m in model] == [True, False, False, False]
    assert not hasattr(model[3], "output_observer")
    with torch.no_grad():
        model(torch.randn(2, 8))
    convert_static(model, weights=qint8)
    assert isinstance(model[0], QLinear) and type(model[2]) is nn.Linear and type(model[3]) is nn.LayerNorm


def test_static_composes_with_calibration_afterwards():
    model = _static(_toy(), [torch.randn(8, 64, dtype=torch.bfloat16)])
    with torch.no_grad(), Calibration(observer=MinMaxObserver):
        model(torch.randn(8, 64, dtype=torch.bfloat16) * 10)
    assert model[0].input_scale > 0.05  # recalibrated on the wider samples


def test_static_workflow_errors():
    with pytest.raises(ValueError, match="chose no module"):
        insert_observers(_toy(), include="nothing*")
    with pytest.raises(ValueError, match="no quantized version"):
        insert_observers(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), types=nn.ReLU)
    with pytest.raises(ValueError, match="no observed module"):
        convert_static(_toy())
    with pytest.raises(RuntimeError, match="saw no data"):
        convert_static(insert_observers(_toy()))
    with pytest.raises(TypeError, match="Observer"):
        insert_observers(_toy(), observer=lambda qtype: nn.Identity())
    with pytest.raises(ValueError, match="activations"):
        insert_observers(_toy(), activations="int4")
    with pytest.raises(ValueError, match="per axis"), torch.no_grad():
        model = insert_observers(_toy(), observer=functools.partial(MinMaxObserver, axis=-1))
        model(torch.randn(2, 64, dtype=torch.bfloat16))
        convert_static(model)


def test_quint8_activations_need_a_zero_point():
    from quanto_backend import quantize_activation

    with pytest.raises(ValueError, match="zero_point"):
        quantize_activation(torch.randn(3), quint8, torch.tensor(0.1))
    zero_point = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="zero_point"):
        quantize_activation(torch.randn(3), qfloat8, torch.tensor(0.1), zero_point)
    with pytest.raises(ValueError, match="zero_point"):  # a zero-point needs a static scale
        quantize_activation(torch.randn(3), qint8, None, zero_point)


def test_qint8_activations_with_a_zero_point_are_asymmetric_int8_codes():
    from quanto_backend import quantize_activation

    x = torch.tensor([-0.2, 0.0, 0.05, 1.0, 5.0])
    scale, zero_point = torch.tensor(5.2 / 255), torch.tensor(-118, dtype=torch.int32)
    q = quantize_activation(x, qint8, scale, zero_point)
    assert q.qdata.dtype == torch.int8
    expected = ((x / scale).round() + zero_point).clamp(-128, 127)
    assert torch.equal(q.qdata.float(), expected)
    assert torch.equal(q.qdata[1], zero_point.to(torch.int8))  # 0.0 is exact
    assert torch.allclose(q.dequantize(), x, atol=float(scale) / 2 + 1e-7)
