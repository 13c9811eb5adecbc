"""quantize include/exclude, quantization_map, requantize, safetensors round trip."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quanto_backend import Calibration, QLinear, freeze, qint4, qint8, quantization_map, quantize, requantize


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.mlp(self.attn(x)))


def test_include_exclude():
    model = quantize(Block(), weights=qint8, include="mlp.*", exclude="*.2")
    assert isinstance(model.mlp[0], QLinear)
    assert type(model.mlp[2]) is nn.Linear and type(model.attn) is nn.Linear and type(model.head) is nn.Linear
    model = quantize(Block(), weights=qint8, exclude=["head", "attn"])
    assert type(model.head) is nn.Linear and isinstance(model.mlp[2], QLinear)


def test_quantize_needs_something_and_patterns_typed():
    with pytest.raises(ValueError, match="neither"):
        quantize(Block())
    with pytest.raises(TypeError, match="include"):
        quantize(Block(), weights=qint8, include=3)


def test_quantization_map():
    model = quantize(Block(), weights=qint4, group_size=32, exclude="head")
    qmap = quantization_map(model)
    assert set(qmap) == {"attn", "mlp.0", "mlp.2"}
    assert qmap["attn"]["weights"] == "qint4" and qmap["attn"]["group_size"] == 32


@pytest.mark.parametrize("weights, activations", [(qint8, None), (qint4, None), ("float8", None), (qint8, qint8)])
def test_safetensors_round_trip_is_bit_identical(tmp_path, weights, activations):
    group_size = 32 if weights == qint4 else None
    model = quantize(Block(), weights=weights, activations=activations, group_size=group_size)
    x = torch.randn(4, 32)
    if activations:
        with torch.no_grad(), Calibration():
            model(x)
    freeze(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    qmap = quantization_map(model)

    with torch.device("meta"):
        skeleton = Block()
    reloaded = requantize(skeleton, load_file(tmp_path / "model.safetensors"), qmap, device="cpu")
    with torch.no_grad():
        a, b = model(x), reloaded(x)
    a, b = (t.dequantize() if hasattr(t, "qtype") else t for t in (a, b))
    assert torch.equal(a, b)
    for key, value in model.state_dict().items():
        assert torch.equal(
            reloaded.state_dict()[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        )


def _saved(tmp_path):
    model = freeze(quantize(Block(), weights=qint4, group_size=32))
    return load_file_after_save(model, tmp_path), quantization_map(model)


def load_file_after_save(model, tmp_path):
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    return load_file(tmp_path / "m.safetensors")


def _meta_block():
    with torch.device("meta"):
        return Block()


def test_missing_tensor_is_named(tmp_path):
    state, qmap = _saved(tmp_path)
    del state["mlp.0.weight_scale"]
    with pytest.raises(KeyError, match="mlp.0.weight_scale"):
        requantize(_meta_block(), state, qmap)


def test_misshaped_tensor_is_named(tmp_path):
    state, qmap = _saved(tmp_path)
    state["attn.weight"] = state["attn.weight"][:, :4]
    with pytest.raises(ValueError, match="attn.weight.*shape"):
        requantize(_meta_block(), state, qmap)


def test_wrong_dtype_is_named(tmp_path):
    state, qmap = _saved(tmp_path)
    state["head.weight"] = state["head.weight"].float()
    with pytest.raises(ValueError, match="head.weight.*dtype"):
        requantize(_meta_block(), state, qmap)


def test_unknown_module_in_map(tmp_path):
    state, qmap = _saved(tmp_path)
    qmap["nope"] = qmap["attn"]
    with pytest.raises(KeyError, match="nope"):
        requantize(_meta_block(), state, qmap)


@pytest.mark.parametrize("weights", ["int8", "float8"])
def test_group_size_refused_for_8bit_weights_as_quanto_config_does(weights):
    # quantize() and QuantoConfig (from_pretrained) give the same answer to the same options.
    from quanto_backend import QuantoConfig

    message = "group_size=64 applies only to int4/int2 weights"
    with pytest.raises(ValueError, match=message):
        quantize(Block(), weights=weights, group_size=64)
    with pytest.raises(ValueError, match=message):
        QuantoConfig(weights=weights, group_size=64)
    # Both accept it where it means something.
    assert QuantoConfig(weights="int4", group_size=64).group_size == 64
    assert quantization_map(quantize(Block(), weights="int4", group_size=64))["attn"]["group_size"] == 64


def test_requantize_accepts_a_map_recording_a_group_size_for_int8(tmp_path):
    model = freeze(quantize(Block(), weights=qint8))
    qmap = {name: {**qconfig, "group_size": 32} for name, qconfig in quantization_map(model).items()}
    with torch.device("meta"):
        skeleton = Block()
    reloaded = requantize(skeleton, model.state_dict(), qmap, device="cpu")
    x = torch.randn(2, 32)
    torch.testing.assert_close(reloaded(x), model(x))
