"""Every module with static activations carries input_scale, output_scale and output_quantized; streamline turns
output quantization off through that flag, which survives every save and reload; format 1 checkpoints (which
dropped output_scale instead) still load and compute what they computed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quanto_backend import Calibration, QLayerNorm, QLinear, freeze, quantization_map, quantize, requantize

V1 = Path(__file__).parent / "fixtures" / "format_v1"
ACTIVATION_TENSORS = ("input_scale", "output_scale", "output_quantized")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.ReLU(), nn.Linear(48, 16))


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def calibrated(build, activations="int8", shape=(8, 32), streamline=True):
    torch.manual_seed(0)
    model = quantize(build().eval(), weights="int8", activations=activations)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), Calibration(streamline=streamline):
        for _ in range(3):
            model(torch.randn(*shape, generator=g))
    return model


def run(model, x):
    with torch.no_grad():
        y = model(x)
    return y.dequantize() if hasattr(y, "qtype") else y


def flags(model) -> dict[str, bool]:
    return {name: m.quantizes_output for name, m in model.named_modules() if hasattr(m, "quantizes_output")}


@pytest.mark.parametrize("activations", ["int8", "uint8", "float8"])
def test_streamline_keeps_every_buffer_and_clears_the_flag(activations):
    model = calibrated(mlp, activations)
    for module in (model[0], model[1], model[3]):
        assert all(name in module._buffers for name in ACTIVATION_TENSORS), type(module).__name__
    assert isinstance(model[1], QLayerNorm) and model[1].input_scale.item() != 1.0  # recorded, as optimum-quanto
    assert flags(model) == {"0": True, "1": False, "3": True}  # the LayerNorm's output is read by a float ReLU
    assert model[1].output_quantized.item() is False and model[0].output_quantized.item() is True
    assert quantization_map(model)["1"]["quantize_output"] is False
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert not hasattr(model[1](model[0](x)), "qtype")  # the LayerNorm's output is float
        assert hasattr(model(x), "qtype")


@pytest.mark.parametrize("build, shape", [(mlp, (8, 32)), (convnet, (2, 3, 9, 9))], ids=["mlp", "conv"])
def test_streamlined_model_survives_safetensors_and_requantize(tmp_path, build, shape):
    model = calibrated(build, shape=shape)
    freeze(model)
    before = flags(model)
    assert False in before.values() and True in before.values()
    x = torch.randn(*shape)
    expected = run(model, x)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "qmap.json").write_text(json.dumps(quantization_map(model)))

    with torch.device("meta"):
        skeleton = build()
    reloaded = requantize(
        skeleton, load_file(tmp_path / "model.safetensors"), json.loads((tmp_path / "qmap.json").read_text())
    )
    assert flags(reloaded) == before
    assert torch.equal(run(reloaded.eval(), x), expected)

    # The same frozen state dict into a model quantized afresh (not frozen, outputs quantized): its flags follow.
    fresh = quantize(build().eval(), weights="int8", activations="int8")
    assert all(flags(fresh).values())
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert flags(fresh) == before
    assert torch.equal(run(fresh, x), expected)


def test_output_quantization_toggles_and_is_saved():
    model = calibrated(mlp)
    layer = model[0]
    layer.disable_output_quantization()
    assert not layer.quantizes_output and layer.output_quantized.item() is False
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer.enable_output_quantization()
    assert layer.quantizes_output
    model.load_state_dict(state)
    assert not layer.quantizes_output  # the loaded flag wins
    dynamic = quantize(mlp(), weights="int8", activations="int8", activation_scales="dynamic")
    assert not dynamic[0].quantizes_output
    with pytest.raises(ValueError, match="no static output scale.*dynamic"):
        dynamic[0].enable_output_quantization()


def test_a_float_state_dict_still_fails_on_the_missing_scales():
    model = quantize(mlp(), weights="int8", activations="int8")
    with pytest.raises(RuntimeError, match=r"Missing key.*0\.input_scale"):
        model.load_state_dict(mlp().state_dict())


@pytest.mark.parametrize("name", ["mlp_w8a8", "mlp_w8a8_quint8"])
def test_format_1_state_dicts_load(name):
    state = load_file(V1 / name / "model.safetensors")
    qmap = json.loads((V1 / name / "quanto_qmap.json").read_text())
    io = load_file(V1 / name / "io.safetensors")
    assert "1.output_scale" not in state and "1.input_scale" not in state  # format 1: streamlined, no input scale
    with torch.device("meta"):
        skeleton = mlp()
    model = requantize(skeleton, state, qmap).eval()
    assert isinstance(model[3], QLinear) and flags(model) == {"0": True, "1": False, "3": True}
    for module in (model[0], model[1], model[3]):
        assert all(module._buffers[n].device.type == "cpu" for n in ACTIVATION_TENSORS)
    assert model[1].output_scale.item() == 1.0 and model[1].input_scale.item() == 1.0  # never used
    assert torch.equal(run(model, io["input"]), io["output"])
    # Saved again, it is written in the current format: every tensor is there.
    assert {"1.input_scale", "1.output_scale", "1.output_quantized"} <= set(model.state_dict())


def test_format_1_state_dict_loads_into_a_quantized_model():
    # load_state_dict upgrades each module whose state it finds: here the streamlined quint8 LayerNorm kept its
    # output_zero_point. (A streamlined int8 LayerNorm kept nothing: requantize, which has the map, reads it.)
    state = load_file(V1 / "mlp_w8a8_quint8" / "model.safetensors")
    io = load_file(V1 / "mlp_w8a8_quint8" / "io.safetensors")
    model = quantize(mlp(), weights="int8", activations="uint8")
    model.load_state_dict(state)
    assert flags(model) == {"0": True, "1": False, "3": True}
    assert torch.equal(run(model.eval(), io["input"]), io["output"])
