"""QuantoConfig(optimizer=...): which optimizer quantize-on-load runs (default: the 4-bit clip search)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quanto_backend import HqqOptimizer, MseOptimizer, QuantoConfig, quantize_weight


def test_config_validates_and_records_the_optimizer():
    assert "optimizer" not in QuantoConfig(weights="int4").to_dict()  # default configs are written as before
    config = QuantoConfig(weights="int4", optimizer="HQQ")
    assert config.optimizer == "hqq" and config.to_dict()["optimizer"] == "hqq"
    assert QuantoConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="'hqq' for int8 weights; accepted: absmax"):
        QuantoConfig(weights="int8", optimizer="hqq")
    with pytest.raises(ValueError, match="'gptq' for int4 weights; accepted: mse, minmax, hqq"):
        QuantoConfig(weights="int4", optimizer="gptq")


@pytest.mark.parametrize("optimizer, expected", [(None, MseOptimizer()), ("hqq", HqqOptimizer())])
def test_quantize_on_load_runs_the_chosen_optimizer(llama_dir, optimizer, expected):
    config = QuantoConfig(weights="int4", group_size=32, optimizer=optimizer)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    proj = model.model.layers[0].mlp.down_proj
    float_weight = load_file(llama_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    reference = quantize_weight(float_weight, "int4", 32, expected)
    assert torch.equal(proj.weight, reference.qdata) and torch.equal(proj.weight_scale, reference.scale)
