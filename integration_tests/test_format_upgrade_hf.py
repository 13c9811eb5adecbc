"""transformers save_pretrained / from_pretrained keep which outputs streamline left float (the output_quantized
buffers, format 2), and checkpoints written in format 1 (tests/fixtures/format_v1, which dropped output_scale
instead) still load, compute what they computed, and save again in the current format."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from quanto_backend import Calibration, QLayerNorm, QuantoConfig
from quanto_backend.integrations import FORMAT_VERSION
from quanto_backend.nn import QModuleMixin
from quanto_backend.ops import cpu

BERT_V1 = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "format_v1" / "bert_w8a8"


def flags(model) -> dict[str, bool]:
    return {name: m.quantizes_output for name, m in model.named_modules() if isinstance(m, QModuleMixin)}


def saved_keys(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_streamline_choice_survives_save_pretrained(bert_dir, tmp_path, tokens):
    model = AutoModel.from_pretrained(bert_dir, quantization_config=QuantoConfig(weights="int8", activations="int8"))
    with torch.no_grad(), Calibration(streamline=True):
        model(tokens)
    before = flags(model)
    assert False in before.values()  # e.g. every LayerNorm: its output also feeds a residual add
    norm = model.encoder.layer[0].attention.output.LayerNorm
    assert isinstance(norm, QLayerNorm) and not norm.quantizes_output and "output_scale" in norm._buffers
    with torch.no_grad():
        out = model(tokens).last_hidden_state
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == FORMAT_VERSION == 2
    keys = saved_keys(tmp_path)
    for name in before:
        assert {f"{name}.input_scale", f"{name}.output_scale", f"{name}.output_quantized"} <= keys, name

    reloaded = AutoModel.from_pretrained(tmp_path)
    assert flags(reloaded) == before
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).last_hidden_state, out)


def test_format_1_checkpoint_loads_and_saves_as_format_2(tmp_path):
    saved = json.loads((BERT_V1 / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 1
    assert not any(k.endswith((".output_scale", ".output_quantized")) for k in saved_keys(BERT_V1))
    io = load_file(BERT_V1 / "io.safetensors")
    model, info = AutoModel.from_pretrained(BERT_V1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert flags(model) and not any(flags(model).values())  # format 1 had no output scale: none was quantized
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            assert module.output_scale.device.type == "cpu" and module.input_scale.device.type == "cpu"
    with torch.no_grad():
        out = model(io["input_ids"]).last_hidden_state
    assert torch.equal(out, io["last_hidden_state"])

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format_version"] == 2
    assert any(k.endswith(".output_quantized") for k in saved_keys(tmp_path))
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert flags(reloaded) == flags(model)
    with torch.no_grad():
        assert torch.equal(reloaded(io["input_ids"]).last_hidden_state, out)


def test_streamline_choice_survives_diffusers_save_pretrained(pixart_dir, tmp_path):
    from conftest import pixart_inputs
    from diffusers import PixArtTransformer2DModel

    config = QuantoConfig(weights="int8", activations="int8")
    model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=config)
    with torch.no_grad(), Calibration(streamline=True):
        model(**pixart_inputs(), return_dict=False)
    assert not any(flags(model).values())  # every output here feeds a float operation
    model.transformer_blocks[0].attn1.to_q.enable_output_quantization()  # one quantized output, saved as such
    before = flags(model)
    with torch.no_grad():
        out = model(**pixart_inputs(), return_dict=False)[0]
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert all(f"{name}.output_quantized" in keys for name in before)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert flags(reloaded) == before
    with torch.no_grad():
        assert torch.equal(reloaded(**pixart_inputs(), return_dict=False)[0], out)


def test_format_1_diffusers_checkpoint_loads_and_saves_as_format_2(tmp_path):
    from diffusers import PixArtTransformer2DModel

    pixart_v1 = BERT_V1.parent / "pixart_w8a8"
    assert json.loads((pixart_v1 / "config.json").read_text())["quantization_config"]["format_version"] == 1
    io = load_file(pixart_v1 / "io.safetensors")
    inputs = {k: io[k] for k in ("hidden_states", "encoder_hidden_states", "timestep")}
    model = PixArtTransformer2DModel.from_pretrained(pixart_v1)
    assert flags(model) and not any(flags(model).values())
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    # The fixture was written where one-row int8 x int8 products (the timestep embedding) go through
    # _weight_int8pack_mm, which rounds its sums to bfloat16. Where they still do, the output is the same bit for bit;
    # where they take exact sums (Zen 4), it is 4.1e-3 from it.
    if cpu.INT8PACK.holds() and cpu.a8w8_kernel_max_rows(64, 64) >= 1:
        assert torch.equal(out, io["sample"])
    else:
        assert ((out - io["sample"]).norm() / io["sample"].norm()).item() < 1e-2
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format_version"] == 2
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert flags(reloaded) == flags(model)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs, return_dict=False)[0], out)


def test_format_2_checkpoint_without_its_flag_names_the_tensor(bert_dir, tmp_path, tokens):
    model = AutoModel.from_pretrained(bert_dir, quantization_config=QuantoConfig(weights="int8", activations="int8"))
    with torch.no_grad(), Calibration():
        model(tokens)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "encoder.layer.0.intermediate.dense.output_quantized"
    del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks tensor '{key}'.*format_version 2"):
        AutoModel.from_pretrained(tmp_path)
