"""device_map and max_memory with quantize-on-load and with pre-quantized checkpoints (CPU machine)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from quanto_backend import QuantoConfig


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


EXPLICIT_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu"}
EXPLICIT_MAP |= {"model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(device_map="auto"),
        dict(device_map={"": "cpu"}),
        dict(device_map=EXPLICIT_MAP),
        dict(device_map="auto", max_memory={"cpu": "1GiB"}),
    ],
    ids=["auto", "all-cpu", "explicit", "max_memory"],
)
def test_device_maps_give_the_same_outputs(llama_dir, tokens, kwargs):
    config = QuantoConfig(weights="int8")
    expected = logits(AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config), tokens)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config, **kwargs)
    assert torch.equal(logits(model, tokens), expected)


def test_auto_map_sizes_the_quantized_storage(llama_dir):
    from transformers.integrations.accelerate import compute_module_sizes

    float_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights="int4"))
    float_sizes = compute_module_sizes(float_model)[0]
    sizes = compute_module_sizes(model, model.hf_quantizer)[0]
    # down_proj: 64 x 128 float32 = 32 KiB -> 64 x 64 packed bytes + 64 x 1 scale and shift (float32)
    assert sizes["model.layers.0.mlp.down_proj"] == 64 * 64 + 2 * 64 * 4
    assert float_sizes["model.layers.0.mlp.down_proj"] == 64 * 128 * 4
    assert sizes[""] < float_sizes[""]


def test_quantize_on_load_with_disk_offload_fails_early(llama_dir, tmp_path):
    config = QuantoConfig(weights="int8")
    with pytest.raises(ValueError, match="cannot quantize on load with disk offload.*save_pretrained"):
        AutoModelForCausalLM.from_pretrained(
            llama_dir,
            quantization_config=config,
            device_map=EXPLICIT_MAP | {"model.layers.1": "disk"},
            offload_folder=tmp_path,
        )
    # max_memory too small for the model: the inferred map offloads to disk, refused the same way
    with pytest.raises(ValueError, match="cannot quantize on load with disk offload"):
        AutoModelForCausalLM.from_pretrained(
            llama_dir,
            quantization_config=config,
            device_map="auto",
            max_memory={"cpu": 20_000},
            offload_folder=tmp_path,
        )


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_disk_offload_of_a_prequantized_checkpoint(llama_dir, tmp_path, tokens, weights):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights=weights))
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path / "q")
    for kwargs in (
        dict(device_map=EXPLICIT_MAP | {"model.layers.1": "disk", "lm_head": "disk"}),
        dict(device_map="auto", max_memory={"cpu": 60_000}),
    ):
        offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", offload_folder=tmp_path / "off", **kwargs)
        assert "disk" in offloaded.hf_device_map.values()
        assert torch.equal(logits(offloaded, tokens), expected)
