"""QLoRA-style training: a frozen quantized base, trainable LoRA adapters (peft), gradients only on the adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama
from transformers import LlamaForCausalLM

from quanto_backend import QLinear, freeze, quantize
from quanto_backend.lora import register_quantized_lora


def _quantized_llama(weights: str) -> LlamaForCausalLM:
    model = tiny_llama().train()
    quantize(model, weights=weights, exclude=["lm_head"])
    freeze(model)
    return model


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_qlora_training_step_trains_only_the_adapters(weights):
    model = _quantized_llama(weights)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, register_quantized_lora(LoraConfig(r=8, lora_alpha=16, target_modules=targets)))
    peft_model.train()
    storage = {
        name: t.detach().clone()
        for name, t in peft_model.named_parameters()
        if "lora_" not in name and not t.requires_grad
    }
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)

    generator = torch.Generator().manual_seed(1)
    # a small fixed batch with structure to learn: each sequence repeats a short random pattern
    pattern = torch.randint(0, 256, (4, 6), generator=generator)
    ids = pattern.repeat(1, 5)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(25):
        optimizer.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
            assert with_grad == set(trainable)  # gradients reach the adapters, and only them
            # B starts at zero (so does the gradient of A): B gets a gradient through the quantized layers
            assert all(peft_model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "lora_B" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # the quantized base is untouched: same storage, still QLinear and frozen
    for name, tensor in peft_model.named_parameters():
        if name in storage:
            assert torch.equal(tensor, storage[name]), name
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert type(q_proj) is QLinear and q_proj.frozen


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
def test_frozen_quantized_linear_keeps_no_float_weight_for_backward(weights):
    torch.manual_seed(0)
    qlinear = QLinear.from_module(torch.nn.Linear(128, 64), weights=weights)
    qlinear.freeze()
    x = torch.randn(2, 5, 128, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qlinear(x)
    assert not any(t.numel() >= 64 * 128 for t in saved)  # no dequantized weight held until backward
    y.square().sum().backward()
    # the same gradient as through the dequantized weight
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, qlinear.qweight.dequantize(), qlinear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
