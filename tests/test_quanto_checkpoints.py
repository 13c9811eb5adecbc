"""Checkpoints written by optimum-quanto 0.2.7 load with quanto_backend alone, and compute what optimum-quanto
computes on them.

The fixtures and their expected outputs were made by tests/fixtures/optimum_quanto/make_fixtures.py in a
throw-away venv with optimum-quanto installed; optimum-quanto is not needed (nor imported) here.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from quanto_backend import QLayerNorm, QLinear, requantize
from quanto_backend.ops import cpu

sys.path.insert(0, str(Path(__file__).parent))
from cpu_differential import reference_only  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "optimum_quanto"


def mlp(layernorm: bool = False) -> nn.Sequential:
    layers = [nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)]
    if layernorm:
        layers.insert(1, nn.LayerNorm(128))
    return nn.Sequential(*layers)


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))


def load(name: str, build) -> nn.Module:
    with torch.device("meta"):
        model = build()
    with open(FIXTURES / name / "quanto_qmap.json") as f:
        qmap = json.load(f)
    return requantize(model, load_file(FIXTURES / name / "model.safetensors"), qmap, device="cpu").eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    return y.dequantize() if hasattr(y, "qtype") else y


def in_float64(model: nn.Module) -> nn.Module:
    """float32 scales, biases and float weights to float64 (quantized storage untouched): the CPU kernels, which
    round float32 activations to bfloat16, then give way to the exact reference."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.dtype == torch.float32:
                    store[name] = type(t)(t.detach().double()) if isinstance(t, nn.Parameter) else t.double()
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


WEIGHT_ONLY = [
    ("mlp_qint8", mlp),
    ("mlp_qint4", mlp),
    ("mlp_qint2", mlp),
    ("mlp_qfloat8_e4m3fn", mlp),
    ("mlp_qfloat8_e5m2", mlp),
    ("conv_qint8", convnet),
    ("conv_qint4", convnet),
]


@pytest.mark.parametrize("name, build", WEIGHT_ONLY, ids=[n for n, _ in WEIGHT_ONLY])
def test_weight_only_checkpoints_match_optimum_quanto(name, build):
    io = load_file(FIXTURES / name / "io.safetensors")
    model = load(name, build)
    assert any(isinstance(m, QLinear) or type(m).__name__ == "QConv2d" for m in model.modules())
    # As loaded (float32; small batches take the bfloat16-rounding CPU kernels): the kernels' rounding only.
    assert rel(run(model, io["input"]), io["output"]) < 1e-2
    # Exactly computed, the converted weights give optimum-quanto's outputs.
    assert rel(run(in_float64(model), io["input"].double()), io["output"]) < 1e-3


def test_w8a8_checkpoint_with_layernorm_matches_optimum_quanto():
    io = load_file(FIXTURES / "mlp_w8a8_layernorm" / "io.safetensors")
    model = load("mlp_w8a8_layernorm", lambda: mlp(layernorm=True))
    assert isinstance(model[1], QLayerNorm) and model[1].weight_qtype is None  # its map said weights "none"
    assert "input_scale" in model[1]._buffers  # kept, as optimum-quanto keeps it
    assert model[3].quantizes_output  # optimum-quanto quantizes every output once reloaded
    # On the reference ops (exact int32 sums, as optimum-quanto's), the outputs are optimum-quanto's, bit for bit:
    # both clamp int8 codes to [-128, 127] (with -127, the codes of values beyond the calibrated range differed:
    # 2.3e-3 relative here).
    with reference_only():
        assert torch.equal(run(model, io["input"]), io["output"])
    out = run(model, io["input"])
    rows = io["input"].shape[0]
    weights = [m.weight for m in model.modules() if isinstance(m, QLinear)]
    if not any(cpu.INT8PACK.admits_weight(w) and rows <= cpu.a8w8_kernel_max_rows(*w.shape) for w in weights):
        # Exact sums, as optimum-quanto's: torch._int_mm where trusted, else float32 matmuls of the codes.
        assert rel(out, io["output"]) < 1e-6
    else:
        # _weight_int8pack_mm rounds its int32 sums to bfloat16, so an output code may differ by one (1.1e-2
        # relative here), never by more.
        assert (out - io["output"]).abs().max() <= model[3].output_scale * 1.001
        assert rel(out, io["output"]) < 2e-2


def _fixture_state(name):
    with open(FIXTURES / name / "quanto_qmap.json") as f:
        return load_file(FIXTURES / name / "model.safetensors"), json.load(f)


def _skeleton(build=mlp):
    with torch.device("meta"):
        return build()


def test_unknown_qtype_names_the_module():
    state, qmap = _fixture_state("mlp_qint8")
    qmap["2"]["weights"] = "qint3"
    with pytest.raises(ValueError, match=r"module '2' has weights 'qint3'.*qint8"):
        requantize(_skeleton(), state, qmap)
    state, qmap = _fixture_state("mlp_w8a8_layernorm")
    qmap["3"]["activations"] = "qint4"
    with pytest.raises(ValueError, match=r"module '3' has activations 'qint4'"):
        requantize(_skeleton(lambda: mlp(True)), state, qmap)


def test_wrong_dtype_names_the_tensor():
    state, qmap = _fixture_state("mlp_qint8")
    state["0.weight._data"] = state["0.weight._data"].view(torch.uint8)
    with pytest.raises(ValueError, match=r"'0\.weight\._data' has dtype torch\.uint8.*int8"):
        requantize(_skeleton(), state, qmap)


def test_last_axis_layout_names_the_tensor():
    state, qmap = _fixture_state("mlp_qint8")
    state["0.weight._scale"] = torch.ones(1, 256)  # a scale per input: quantized along the last axis
    with pytest.raises(ValueError, match=r"'0\.weight\._scale'.*axis 0"):
        requantize(_skeleton(), state, qmap)


def test_unreadable_packing_names_the_tensor():
    state, qmap = _fixture_state("mlp_qint4")
    state["0.weight._data._data"] = state["0.weight._data._data"][:, :64]
    with pytest.raises(ValueError, match=r"'0\.weight\._data\._data' has shape \(128, 64\)"):
        requantize(_skeleton(), state, qmap)
    state, qmap = _fixture_state("mlp_qint4")
    state["0.weight._data._packed"] = state.pop("0.weight._data._data")  # another packing (e.g. a kernel's)
    with pytest.raises(ValueError, match=r"'0\.weight\._data\._packed'.*layout"):
        requantize(_skeleton(), state, qmap)


def test_unsupported_group_size_names_the_tensor():
    state, qmap = _fixture_state("mlp_qint4")
    # 256 inputs in 64 groups of 4: no group of a multiple of 8.
    state["0.weight._scale"] = torch.ones(128 * 64, 1)
    state["0.weight._shift"] = torch.zeros(128 * 64, 1)
    with pytest.raises(ValueError, match=r"'0\.weight\._data\._data' has groups of 4 inputs"):
        requantize(_skeleton(), state, qmap)


def test_missing_tensor_is_named():
    state, qmap = _fixture_state("mlp_qint4")
    del state["2.weight._shift"]
    with pytest.raises(KeyError, match=r"2\.weight\._shift"):
        requantize(_skeleton(), state, qmap)
