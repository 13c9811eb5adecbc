"""QuantizedCache: a transformers cache whose older tokens are stored quantized by quanto_backend's ops."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_llama import tiny_llama as build_tiny_llama
from tiny_llama import tiny_llama_config
from transformers import DynamicCache, LlamaForCausalLM

from quanto_backend import QuantizedCache
from quanto_backend.kv_cache import QuantizedLayer

# transformers 5.25 renamed generate's and forward's past_key_values to cache (the old name warns, and goes from
# forward in 5.40): the tests pass the cache by the name this transformers takes; the README's example keeps the old
# name, which every transformers 5.x accepts.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama(vocab_size=320, max_position_embeddings=512)  # random init: realistic KV statistics


def _teacher_forced_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of every position, feeding the tokens one at a time through ``forward`` with ``cache``."""
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(("nbits", "bound"), [(8, 0.01), (4, 0.04), (2, 0.2)])
def test_teacher_forced_logits_error(tiny_llama, nbits, bound):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 80))
    reference = _teacher_forced_logits(tiny_llama, ids, DynamicCache(config=tiny_llama.config))
    cache = QuantizedCache(tiny_llama.config, nbits=nbits, q_group_size=32, residual_length=16)
    logits = _teacher_forced_logits(tiny_llama, ids, cache)
    assert cache.get_seq_length() == 80
    assert cache.layers[0].quantized_keys.length == 80  # 5 flushes of 16: all of it went through quantization
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error <= bound, f"int{nbits}: relative logits error {error:.4f} > {bound}"
    assert error > 0  # the quantized path was really taken


def test_float8_codes(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 40))
    reference = _teacher_forced_logits(tiny_llama, ids, DynamicCache(config=tiny_llama.config))
    cache = QuantizedCache(tiny_llama.config, nbits=8, float8=True, q_group_size=32, residual_length=8)
    logits = _teacher_forced_logits(tiny_llama, ids, cache)
    assert cache.layers[0].quantized_keys.codes.dtype == torch.float8_e4m3fn
    assert 0 < ((logits - reference).norm() / reference.norm()).item() <= 0.02


def test_residual_longer_than_the_sequence_is_exact(tiny_llama):
    torch.manual_seed(2)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 12))
    reference = _teacher_forced_logits(tiny_llama, ids, DynamicCache(config=tiny_llama.config))
    cache = QuantizedCache(tiny_llama.config, nbits=2, q_group_size=32, residual_length=64)
    torch.testing.assert_close(_teacher_forced_logits(tiny_llama, ids, cache), reference, rtol=0, atol=0)


@pytest.mark.parametrize("axis", [0, -1])
def test_greedy_generate_uses_the_cache(tiny_llama, axis):
    torch.manual_seed(3)
    prompt = torch.randint(0, tiny_llama.config.vocab_size, (2, 10))
    kwargs = dict(nbits=4, q_group_size=16, residual_length=16, axis_key=axis, axis_value=0)
    cache = QuantizedCache(tiny_llama.config, **kwargs)
    out = tiny_llama.generate(prompt, **{CACHE_ARG: cache}, max_new_tokens=30, do_sample=False, min_new_tokens=30)
    assert out.shape == (2, 40)
    assert cache.get_seq_length() == 39  # the last token is sampled, not cached
    assert cache.layers[0].quantized_keys.length >= 16
    # generate's loop is the same computation as a manual greedy loop over forward with a fresh cache
    manual_cache = QuantizedCache(tiny_llama.config, **kwargs)
    ids = prompt
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids, **{CACHE_ARG: manual_cache}).logits[:, -1]
        for _ in range(30):
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            logits = tiny_llama(input_ids=ids[:, -1:], **{CACHE_ARG: manual_cache}).logits[:, -1]
    torch.testing.assert_close(out, ids, rtol=0, atol=0)


def test_beam_search_matches_dynamic_cache_while_unquantized(tiny_llama):
    torch.manual_seed(4)
    prompt = torch.randint(0, tiny_llama.config.vocab_size, (1, 6))
    kwargs = dict(max_new_tokens=12, num_beams=3, do_sample=False, min_new_tokens=12)
    reference = tiny_llama.generate(prompt, **{CACHE_ARG: DynamicCache(config=tiny_llama.config)}, **kwargs)
    cache = QuantizedCache(tiny_llama.config, nbits=4, q_group_size=32, residual_length=64)
    torch.testing.assert_close(tiny_llama.generate(prompt, **{CACHE_ARG: cache}, **kwargs), reference)


def test_beam_search_with_quantized_tokens(tiny_llama):
    torch.manual_seed(5)
    prompt = torch.randint(0, tiny_llama.config.vocab_size, (1, 6))
    cache = QuantizedCache(tiny_llama.config, nbits=8, q_group_size=32, residual_length=4)
    out = tiny_llama.generate(
        prompt, **{CACHE_ARG: cache}, max_new_tokens=16, num_beams=3, do_sample=False, min_new_tokens=16
    )
    assert out.shape == (1, 22)
    assert cache.layers[0].quantized_keys.length >= 16


@pytest.mark.parametrize(("axis_key", "axis_value", "nbits"), [(0, 0, 4), (-1, 0, 2), (-1, -1, 8)])
def test_reorder_selects_quantized_rows_exactly(axis_key, axis_value, nbits):
    torch.manual_seed(6)
    layer = QuantizedLayer(nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=8, residual_length=8)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    layer.update(k, v)
    # per token, all 20 are quantized; per channel, whole groups of 8 (16 tokens), 4 left in the residual
    quantized = 20 if axis_key == axis_value == 0 else 16
    assert layer.quantized_keys.length == quantized and layer.keys.shape[-2] == 20 - quantized
    before_k, before_v = layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
    beam_idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam_idx)
    new_k, new_v = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)
    after_k, after_v = layer.update(new_k, new_v)
    torch.testing.assert_close(after_k, torch.cat([before_k[beam_idx], new_k], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(after_v, torch.cat([before_v[beam_idx], new_v], dim=-2), rtol=0, atol=0)


def test_quantized_states_are_appended_not_requantized():
    torch.manual_seed(7)
    layer = QuantizedLayer(nbits=4, q_group_size=16, residual_length=4)
    layer.update(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32))
    first_codes = layer.quantized_keys.codes.clone()
    for _ in range(8):
        layer.update(torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32))
    assert layer.quantized_keys.length == 12
    torch.testing.assert_close(layer.quantized_keys.codes[:, :, :4], first_codes, rtol=0, atol=0)


def test_bytes_at_4096_tokens_int4():
    # A Llama-3-8B-like layer geometry: 8 KV heads of head_dim 128, stored in bfloat16.
    config = tiny_llama_config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=2)
    cache = QuantizedCache(config, nbits=4)  # defaults: q_group_size 64, residual_length 128
    reference = DynamicCache(config=config)
    torch.manual_seed(8)
    # a 3996-token prompt, then 100 decoded tokens (so the residual is not empty)
    steps = [3996] + [1] * 100
    for n in steps:
        for layer_idx in range(2):
            k = torch.randn(1, 8, n, 128, dtype=torch.bfloat16)
            v = torch.randn(1, 8, n, 128, dtype=torch.bfloat16)
            cache.update(k, v, layer_idx)
            reference.update(k, v, layer_idx)
    assert cache.get_seq_length() == reference.get_seq_length() == 4096
    reference_bytes = sum(
        t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values)
    )
    assert cache.nbytes <= 0.3 * reference_bytes, cache.nbytes / reference_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(nbits=3), "nbits 3"),
        (dict(nbits=4, float8=True), "nbits must be 8"),
        (dict(axis_key=1), "axis_key 1"),
        (dict(axis_value=2), "axis_value 2"),
        (dict(q_group_size=24), r"q_group_size \(24\) must divide the model's head_dim \(32\)"),
        (dict(q_group_size=0), "positive integer"),
        (dict(residual_length=-1), "non-negative"),
        (dict(axis_key=-1, q_group_size=32, residual_length=16), "at least q_group_size"),
        (dict(optimizer="absmax"), "optimizer 'absmax'"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizedCache(tiny_llama_config(), **kwargs)


def test_crop_is_refused():
    cache = QuantizedCache(tiny_llama_config(), nbits=4, q_group_size=32)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("nbits", [8, 4, 2])
@pytest.mark.parametrize("axis", [0, -1])
def test_dequantization_matches_the_reference_op(nbits, axis):
    from quanto_backend import ops

    torch.manual_seed(9)
    layer = QuantizedLayer(nbits=nbits, axis_key=axis, axis_value=axis, q_group_size=16, residual_length=16)
    states = torch.randn(2, 3, 32, 32) * 3 + 1
    layer.update(states, states)
    stored = layer.quantized_keys
    shift = -stored.offset.float() / stored.scale.float()
    flat = ops.dequantize_affine(stored.codes.flatten(0, -2), stored.scale.flatten(0, -2), shift.flatten(0, -2), nbits)
    reference = flat.reshape(*stored.codes.shape[:-1], -1)
    if nbits < 8:  # planar order within each group: value i * n_bytes + j sits at packed position (j, i)
        reference = reference.unflatten(-1, (-1, 16 * nbits // 8, 8 // nbits)).transpose(-1, -2).flatten(-3)
    reference = reference if axis == 0 else reference.transpose(-1, -2)
    torch.testing.assert_close(stored.dequantize(torch.float32), reference, rtol=1e-5, atol=1e-5)
    bound = {8: 0.01, 4: 0.1, 2: 0.5}[nbits]
    assert _relative(stored.dequantize(torch.float32), states) < bound


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float8_dequantization_is_exact(dtype):
    # every finite e4m3 code (subnormals and both zeros included; two zeros pad 254 codes to 256) times a
    # per-group scale, against torch's own float8 conversion
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = torch.cat([codes[~codes.float().isnan()], torch.zeros(2, dtype=torch.float8_e4m3fn)])
    layer = QuantizedLayer(nbits=8, float8=True, q_group_size=16, residual_length=0)
    layer.update(torch.ones(1, 2, 8, 16, dtype=dtype), torch.ones(1, 2, 8, 16, dtype=dtype))
    stored = layer.quantized_keys
    stored.codes = codes.reshape(1, 2, 8, 16)
    stored.scale = torch.tensor([0.5, 3.0], dtype=dtype).reshape(1, 2, 1, 1).expand(1, 2, 8, 1).contiguous()
    expected = (stored.codes.float() * stored.scale.float()).to(dtype)
    torch.testing.assert_close(stored.dequantize(dtype), expected, rtol=0, atol=0)
