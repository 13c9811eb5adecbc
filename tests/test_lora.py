"""LoRA (peft) on quantized modules: merge requantizes into the same format, unmerge restores the storage exactly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from tiny_llama import tiny_llama
from torch import nn

from quanto_backend import QConv2d, QLinear, freeze, quantize
from quanto_backend.lora import QuantizedLoraConv2d, QuantizedLoraLinear, convert_lora_layers, register_quantized_lora

# Merged vs unmerged logits of the tiny Llama with the large random adapters of the mechanics tests below (about half
# the weights' spread): regression bounds (measured 0.0147, 0.0544, 0.163, 0.536). The error targets are asserted
# with trained adapters in test_merge_error_with_a_trained_adapter.
MERGE_BOUNDS = {"int8": 0.02, "float8": 0.07, "int4": 0.2, "int2": 0.65}
OWN_ERROR_FACTOR = 1.3
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _randomize_adapters(model: nn.Module, seed: int) -> None:
    """Adapters of a realistic size: deltas about half the weights' spread (peft initialises B to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                std = 0.1 if "lora_A" in name else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _quantized_peft_llama(weights: str, freeze_model: bool = True, adapter_seed: int = 1):
    model = tiny_llama()
    quantize(model, weights=weights, exclude=["lm_head"])
    if freeze_model:
        freeze(model)
    config = register_quantized_lora(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    peft_model = get_peft_model(model, config).eval()
    _randomize_adapters(peft_model, adapter_seed)
    return peft_model


def _storage(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{p}": t.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, (QLinear, QConv2d))
        for p, t in m.named_parameters(recurse=False)
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
def test_merge_unmerge_merge_and_unload_llama(weights):
    peft_model = _quantized_peft_llama(weights)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(lora_layers) == 2 * len(TARGETS)
    before = _storage(peft_model)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
        with peft_model.disable_adapter():
            base_only = peft_model(IDS).logits
    assert _rel(unmerged, base_only) > 0.05  # the adapters really change the model

    peft_model.merge_adapter()
    merged_storage = _storage(peft_model)
    for layer in lora_layers:
        base = layer.get_base_layer()
        assert layer.merged and base.frozen
        name = next(k for k in before if k.endswith("weight") and before[k].shape == base.weight.shape)
        assert base.weight.dtype == before[name].dtype  # still quantized, same format
    assert any(not torch.equal(merged_storage[k], before[k]) for k in before if k.endswith(".weight"))
    with torch.no_grad():
        merged = peft_model(IDS).logits
    assert _rel(merged, unmerged) <= MERGE_BOUNDS[weights], _rel(merged, unmerged)

    peft_model.unmerge_adapter()
    after = _storage(peft_model)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key  # exact restore
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, unmerged, rtol=0, atol=0)

    unloaded = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in unloaded.modules())
    q_proj = unloaded.model.layers[0].self_attn.q_proj
    assert type(q_proj) is QLinear and q_proj.frozen
    with torch.no_grad():
        torch.testing.assert_close(unloaded(IDS).logits, merged, rtol=0, atol=0)


SUCCESSOR = torch.randperm(256, generator=torch.Generator().manual_seed(0))


def _task_batch(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a deterministic language: each token is followed by ``SUCCESSOR[token]``."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, 256, (n,), generator=generator)
    for t in range(1, length):
        ids[:, t] = SUCCESSOR[ids[:, t - 1]]
    return ids


def _train_adapters(model: nn.Module, steps: int = 30, lr: float = 5e-4) -> None:
    """QLoRA-style: AdamW on the adapters of a frozen (quantized) base, from peft's default init (B = 0)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = _task_batch(8, 32, generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# Trained adapters (above): ||delta|| / ||W|| = 0.11-0.12, the 0.06-0.11 the LoRA paper reports for GPT-3's W_q
# (random B of a chosen norm would not say which norm is realistic; training says it). Merged vs unmerged logits,
# measured on this exact setup: int8 0.0104, float8 0.0403, int4 0.157, int2 0.407; bench/lora_merge.py (three
# seeds, bench/results/lora_merge-cpu.json): 0.0106, 0.040, 0.143, 0.402. Issue 15 asks int8 <= 0.01 and
# int4 <= 0.05: neither is met. What is lost is the rounding of the merged weight onto the format's grid, which is
# the format's own quantization error on this model (float vs quantized, same adapters: int8 0.0103, int4 0.145):
# rounding onto the module's existing grid instead measured higher ("grid": int8 0.0164, int4 0.169, clipping what
# the adapter moves out of the old range), and choosing per row/group the better of the two no lower ("best":
# 0.0109, 0.144). Asserted: these bounds, just above what is measured, and the format's own error.
TRAINED_MERGE_BOUNDS = {"int8": 0.011, "float8": 0.043, "int4": 0.165, "int2": 0.43}


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
def test_merge_error_with_a_trained_adapter(weights):
    model = tiny_llama()
    quantize(model, weights=weights, exclude=["lm_head"])
    freeze(model)
    peft_model = get_peft_model(model, register_quantized_lora(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)))
    _train_adapters(peft_model)
    ids = _task_batch(4, 64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        with peft_model.disable_adapter():
            base_only = peft_model(ids).logits
        assert _rel(unmerged, base_only) > 0.3  # the adapter matters: dropping it would miss every bound below
        adapters = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
        merged = peft_model.merge_and_unload()(ids).logits
    error = _rel(merged, unmerged)
    assert error <= TRAINED_MERGE_BOUNDS[weights], error
    # the same adapters merged into the float model, which is then quantized: the format's own error there
    float_model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    loaded = float_model.load_state_dict(adapters, strict=False)
    assert not loaded.unexpected_keys
    float_merged = float_model.merge_and_unload()
    with torch.no_grad():
        reference = float_merged(ids).logits
        quantize(float_merged, weights=weights, exclude=["lm_head"])
        freeze(float_merged)
        own_error = _rel(float_merged(ids).logits, reference)
    assert error <= OWN_ERROR_FACTOR * own_error, (error, own_error)


def test_merge_on_unfrozen_modules_and_exact_restore():
    # before freeze() the weight is float and quantized at each call: merged, W + delta is quantized; unmerged,
    # W is, and the delta added in float, so they differ by two independent roundings
    peft_model = _quantized_peft_llama("int8", freeze_model=False)
    before = _storage(peft_model)
    assert all(t.is_floating_point() for t in before.values())
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
        peft_model.merge_adapter()
        merged = peft_model(IDS).logits
        peft_model.unmerge_adapter()
        restored = peft_model(IDS).logits
    assert _rel(merged, unmerged) <= 2**0.5 * MERGE_BOUNDS["int8"]
    after = _storage(peft_model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(restored, unmerged, rtol=0, atol=0)


def test_set_adapter_and_delete_adapter():
    peft_model = _quantized_peft_llama("int8")
    peft_model.add_adapter("second", register_quantized_lora(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    _randomize_adapters(peft_model, 2)  # both adapters get new values
    before = _storage(peft_model)
    with torch.no_grad():
        first = peft_model(IDS).logits
        peft_model.set_adapter("second")
        second = peft_model(IDS).logits
        assert _rel(second, first) > 0.01
        peft_model.merge_adapter()  # merges the active adapter only
        assert _rel(peft_model(IDS).logits, second) <= MERGE_BOUNDS["int8"]
        peft_model.unmerge_adapter()
        peft_model.set_adapter("default")
        peft_model.delete_adapter("second")
        torch.testing.assert_close(peft_model(IDS).logits, first, rtol=0, atol=0)
    assert all(torch.equal(t, before[k]) for k, t in _storage(peft_model).items())
    assert not any("second" in name for name, _ in peft_model.named_parameters())


def test_layer_delete_of_a_merged_adapter_keeps_the_others_merged():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    qlinear = QLinear.from_module(linear, weights="int4")
    qlinear.freeze()
    original = {k: v.clone() for k, v in qlinear.named_parameters()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["x"], init_lora_weights=False)
    layer = QuantizedLoraLinear(qlinear, "a", config=config, r=4, lora_alpha=8)
    layer.update_layer("b", 4, lora_alpha=8, config=config)
    x = torch.randn(3, 64)
    layer.merge(adapter_names=["a"])
    only_a = layer(x)
    layer.merge(adapter_names=["b"])
    assert layer.merged_adapters == ["a", "b"]
    layer.delete_adapter("b")
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), only_a, rtol=0, atol=0)  # requantized from the original, not twice
    layer.unmerge()
    assert all(torch.equal(t, original[k]) for k, t in qlinear.named_parameters())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
def test_conv2d_merge_unmerge(weights):
    torch.manual_seed(0)
    model = _ConvNet().eval()
    quantize(model, weights=weights)
    freeze(model)
    config = register_quantized_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2"]))
    peft_model = get_peft_model(model, config).eval()
    _randomize_adapters(peft_model, 3)
    layers = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraConv2d)]
    assert len(layers) == 2 and all(type(m.lora_A["default"]) is nn.Conv2d for m in layers)
    x = torch.randn(2, 8, 10, 10)
    before = _storage(peft_model)
    with torch.no_grad():
        unmerged = peft_model(x)
        peft_model.merge_adapter()
        merged = peft_model(x)
        peft_model.unmerge_adapter()
        restored = peft_model(x)
    assert all(type(m.get_base_layer()) is QConv2d and m.get_base_layer().frozen for m in layers)
    assert _rel(merged, unmerged) <= MERGE_BOUNDS[weights]
    assert all(torch.equal(t, before[k]) for k, t in _storage(peft_model).items())
    torch.testing.assert_close(restored, unmerged, rtol=0, atol=0)
    unloaded = peft_model.merge_and_unload()
    assert type(unloaded.conv1) is QConv2d
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x), merged, rtol=0, atol=0)


def test_convert_lora_layers_created_without_registration():
    model = tiny_llama()
    quantize(model, weights="int4", exclude=["lm_head"])
    freeze(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    _randomize_adapters(peft_model, 1)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    assert convert_lora_layers(peft_model) == 2 * len(TARGETS)
    unloaded = peft_model.merge_and_unload()
    with torch.no_grad():
        assert _rel(unloaded(IDS).logits, unmerged) <= MERGE_BOUNDS["int4"]


def test_convert_float8_layers_and_refuse_merged_ones():
    model = tiny_llama()
    quantize(model, weights="float8", exclude=["lm_head"])
    freeze(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj"])).eval()
    _randomize_adapters(peft_model, 1)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    assert convert_lora_layers(peft_model) == 2 and type(q_proj) is QuantizedLoraLinear
    peft_model.merge_adapter()
    assert q_proj.get_base_layer().weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert _rel(peft_model(IDS).logits, unmerged) <= MERGE_BOUNDS["float8"]
    assert convert_lora_layers(peft_model) == 0  # already converted
    float_peft = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj"]))
    assert convert_lora_layers(float_peft) == 0  # LoRA around float nn.Linear: left to peft
    float8 = tiny_llama()
    quantize(float8, weights="float8", exclude=["lm_head"])
    merged = get_peft_model(float8, LoraConfig(r=8, target_modules=["q_proj"]))
    merged.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters.append("default")
    with pytest.raises(ValueError, match="unmerged"):
        convert_lora_layers(merged)


def test_bad_input():
    with pytest.raises(TypeError, match="LoraConfig"):
        register_quantized_lora({"r": 8})
    qlinear = QLinear.from_module(nn.Linear(64, 32), weights="int8")
    qlinear.freeze()
    config = LoraConfig(r=4, target_modules=["x"], use_dora=True)
    layer = QuantizedLoraLinear(qlinear, "a", config=config, r=4, lora_alpha=8)
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer.merge()
    with pytest.raises(ValueError, match="NaNs"):
        plain = QuantizedLoraLinear(qlinear, "b", config=LoraConfig(r=4, target_modules=["x"]), r=4, lora_alpha=8)
        with torch.no_grad():
            plain.lora_B["b"].weight.fill_(float("nan"))
        plain.merge(safe_merge=True)
