"""Static int8 inputs with a zero-point: Calibration gives one to a mostly one-sided input (a GELU's output), the
int8 x int8 op runs on the codes with the zero-point's term in the bias, and the state saves and reloads."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quanto_backend import Calibration, freeze, ops, qfloat8, qint8, quantization_map, quantize, requantize
from quanto_backend.tensor import AffineQActivation


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def _calibrated(**calibration):
    model = quantize(_mlp(), weights=qint8, activations=qint8)
    x = torch.randn(8, 32)
    with torch.no_grad(), Calibration(**calibration):
        model(x)
    return model, x


def test_gelu_output_gets_a_zero_point_and_a_symmetric_input_does_not():
    model, x = _calibrated()
    assert "input_zero_point" not in model[0]._buffers  # randn: two-sided
    with torch.no_grad():
        hidden = nn.functional.gelu(nn.functional.linear(x, model[0].qweight.dequantize(), model[0].bias))
    low, high = hidden.amin(), hidden.amax()
    assert low > -0.2 and high > 1.0
    # One sample: the range is the sample's [min, max], mapped onto the 256 int8 codes.
    torch.testing.assert_close(model[2].input_scale, (high - low) / 255, rtol=2e-2, atol=0)
    zero_point = model[2].input_zero_point
    assert zero_point.dtype == torch.int32 and zero_point.ndim == 0
    assert int(zero_point) == int(torch.round(-128 - low / model[2].input_scale))
    assert quantization_map(model)["2"]["input_zero_point"] is True
    assert "input_zero_point" not in quantization_map(model)["0"]


def test_zero_points_can_be_turned_off():
    model, _ = _calibrated(input_zero_points=False)
    assert not any(name.endswith("input_zero_point") for name, _ in model.named_buffers())


def test_zero_point_halves_the_input_error_of_a_one_sided_input():
    errors = {}
    for zero_points in (False, True):
        model, x = _calibrated(input_zero_points=zero_points)
        with torch.no_grad():
            hidden = model[1](model[0](x))
            hidden = hidden.dequantize() if hasattr(hidden, "dequantize") else hidden
            q = model[2].quantize_input(hidden)
        assert isinstance(q, AffineQActivation) == zero_points
        errors[zero_points] = (q.dequantize() - hidden).abs().mean()
    assert errors[True] < 0.6 * errors[False]


def test_frozen_linear_with_a_zero_point_matches_the_asymmetric_reference():
    model, x = _calibrated()
    freeze(model)
    layer = model[2]
    with torch.no_grad():
        hidden = model[1](model[0](x))
        q = layer.quantize_input(hidden.dequantize() if hasattr(hidden, "dequantize") else hidden)
        got = layer.qforward(q)
        reference = ops.linear_a8w8_asymmetric(
            q.qdata, q.scale, q.zero_point, layer.weight, layer.weight_scale, None, layer.bias, torch.float32
        )
        float_out = nn.functional.linear(q.dequantize(), layer.qweight.dequantize(), layer.bias)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, float_out, rtol=1e-4, atol=1e-4)


def test_zero_points_survive_save_and_requantize(tmp_path):
    model, x = _calibrated()
    freeze(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    qmap = quantization_map(model)
    with torch.device("meta"):
        skeleton = _mlp()
    reloaded = requantize(skeleton, load_file(tmp_path / "model.safetensors"), qmap, device="cpu")
    assert torch.equal(reloaded[2].input_zero_point, model[2].input_zero_point)
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    assert torch.equal(got.dequantize(), expected.dequantize())


def test_a_zero_point_needs_static_int8_inputs():
    model = quantize(_mlp(), weights=qint8, activations=qfloat8)
    with pytest.raises(ValueError, match="zero-point needs static qint8"):
        model[0].set_input_zero_point(torch.tensor(3))
    with pytest.raises(ValueError, match="zero-point needs static qint8"):
        quantize(_mlp(), weights=qint8, activations=qint8, activation_scales="dynamic")[0].set_input_zero_point(0)
