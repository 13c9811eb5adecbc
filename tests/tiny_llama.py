"""The tiny Llama of the LoRA, QLoRA and KV-cache tests, in the shapes of the anchor measurements of their issue
(hidden 128, 2 layers, 4 heads of 32, 2 KV heads). Its in_features, 128 and 256, are multiples of 64: inside the
int8 CPU kernel's contract."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """transformers' own random init (normal, std ``initializer_range``) from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
