import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, OPTConfig, OPTModel

from quanto_backend import (
    Calibration,
    MinMaxObserver,
    QLinear,
    freeze,
    qint8,
    quantization_map,
    quantize,
    requantize,
    smooth_quant,
)


class _PreNormBlock(nn.Module):
    """A pre-norm block: the LayerNorm output feeds only q/k/v (the residual is taken before it)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)


class _PostNormBlock(nn.Module):
    """A post-norm block (BERT): the LayerNorm output is also the residual."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc(h)


class _OnePlusRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), so dividing the weight does not divide the output."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _with_outliers(model: nn.Module, norm: nn.Module) -> nn.Module:
    """Give the normalization a few huge output channels, like real LLM/BERT LayerNorms."""
    with torch.no_grad():
        norm.weight[:3] = 40.0
    return model


def _samples(n: int = 4, dim: int = 32) -> list[torch.Tensor]:
    return [torch.randn(64, dim) for _ in range(n)]


def _w8a8_error(model: nn.Module, alpha: float | None, samples, test) -> float:
    model = quantize(copy.deepcopy(model), weights=qint8, activations=qint8)
    if alpha is not None:
        assert smooth_quant(model, samples, alpha=alpha)
    # Min-max ranges: the error then measures the resolution of the codes, not the clipping of a small sample.
    with torch.no_grad(), Calibration(observer=MinMaxObserver):
        for x in samples:
            model(x)
    freeze(model)
    with torch.no_grad():
        out = model(test)
    return out.dequantize() if hasattr(out, "dequantize") else out


def test_pre_norm_block_is_folded_into_the_norm_and_unchanged():
    block = _PreNormBlock()
    _with_outliers(block, block.norm)
    x = torch.randn(16, 32)
    expected = block(x)
    norm_weight = block.norm.weight.detach().clone()
    report = smooth_quant(block, _samples())
    assert report == {name: "folded into norm" for name in ("q", "k", "v")}
    assert not torch.equal(block.norm.weight, norm_weight)
    assert block.norm.weight[:3].abs().max() < 40.0  # the outlier channels were divided down
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)


def test_smoothing_reduces_w8a8_error():
    block = _PreNormBlock()
    _with_outliers(block, block.norm)
    samples, test = _samples(), torch.randn(16, 32)
    expected = block(test)
    plain = (_w8a8_error(block, None, samples, test) - expected).abs().mean()
    smoothed = (_w8a8_error(block, 0.5, samples, test) - expected).abs().mean()
    assert smoothed < 0.7 * plain  # measured: 0.32-0.59 over seeds 0-4


def test_post_norm_block_keeps_factors_on_the_quantized_linear():
    block = _PostNormBlock()
    _with_outliers(block, block.norm)
    x = torch.randn(16, 32)
    expected = block(x)
    norm_weight = block.norm.weight.detach().clone()
    qblock = quantize(copy.deepcopy(block), weights=qint8, activations=qint8)
    assert smooth_quant(qblock, _samples(), alpha=0.6) == {"fc": "input_smooth"}
    assert torch.equal(qblock.norm.weight, norm_weight)  # folding would have changed the residual
    smooth = qblock.fc.input_smooth
    assert smooth.shape == (32,) and smooth[:3].min() > smooth[3:].max()
    assert quantization_map(qblock)["fc"]["input_smooth"] is True
    # Same function, with the activations not quantized yet (scales uncalibrated): compare unquantized paths.
    with torch.no_grad():
        torch.testing.assert_close(
            torch.nn.functional.linear(qblock.fc.smooth_input(block.norm(x)), qblock.fc.weight, qblock.fc.bias),
            block.fc(block.norm(x)),
            rtol=1e-4,
            atol=1e-4,
        )
    samples, test = _samples(), torch.randn(16, 32)
    expected = block(test)
    plain = (_w8a8_error(block, None, samples, test) - expected).abs().mean()
    smoothed = (_w8a8_error(block, 0.5, samples, test) - expected).abs().mean()
    assert smoothed < 0.7 * plain  # measured: 0.28-0.36 over seeds 0-4


def test_post_norm_float_model_is_left_alone_with_a_warning():
    block = _PostNormBlock()
    weight = block.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match="quantize"):
        assert smooth_quant(block, _samples()) == {}
    assert torch.equal(block.fc.weight, weight)


def test_a_norm_that_does_not_fold_falls_back_to_runtime_factors():
    model = nn.Sequential(_OnePlusRMSNorm(32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight[:2] = 20.0
    x = torch.randn(8, 32)
    expected = model(x)
    qmodel = quantize(copy.deepcopy(model), weights=qint8)  # weight-only: the output stays comparable
    assert smooth_quant(qmodel, _samples()) == {"1": "input_smooth"}
    torch.testing.assert_close(qmodel[0].weight, model[0].weight)
    torch.testing.assert_close(qmodel(x), expected, rtol=0.05, atol=0.05)


def test_smoothed_state_round_trips_through_requantize():
    block = _PostNormBlock()
    _with_outliers(block, block.norm)
    qblock = quantize(block, weights=qint8, activations=qint8)
    smooth_quant(qblock, _samples())
    with torch.no_grad(), Calibration():
        qblock(torch.randn(8, 32))
    freeze(qblock)
    with torch.device("meta"):
        skeleton = _PostNormBlock()
    requantize(skeleton, qblock.state_dict(), quantization_map(qblock), device="cpu")
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(skeleton(x).dequantize(), qblock(x).dequantize())


def _tiny_llama():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaModel(config).eval()


def _tiny_opt():
    config = OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32,
    )  # fmt: skip
    return OPTModel(config).eval()


def _tiny_bert():
    config = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.mark.parametrize(
    "build, expected",
    [
        (
            _tiny_llama,
            {
                **{
                    f"layers.{i}.self_attn.{p}_proj": f"folded into layers.{i}.input_layernorm"
                    for i in range(2)
                    for p in "qkv"
                },
                **{
                    f"layers.{i}.mlp.{p}_proj": f"folded into layers.{i}.post_attention_layernorm"
                    for i in range(2)
                    for p in ("gate", "up")
                },
            },
        ),
        (
            _tiny_opt,
            {
                **{
                    f"decoder.layers.{i}.self_attn.{p}_proj": f"folded into decoder.layers.{i}.self_attn_layer_norm"
                    for i in range(2)
                    for p in "qkv"
                },
                **{f"decoder.layers.{i}.fc1": f"folded into decoder.layers.{i}.final_layer_norm" for i in range(2)},
            },
        ),
    ],
)
def test_llama_and_opt_blocks_fold_and_keep_their_outputs(build, expected):
    model = build()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    samples = [{"input_ids": torch.randint(0, 64, (2, 10))} for _ in range(2)]
    assert smooth_quant(model, samples, alpha=0.5) == expected
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, rtol=1e-4, atol=1e-4)


def test_bert_blocks_smooth_at_runtime_and_keep_their_outputs():
    model = _tiny_bert()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    qmodel = quantize(copy.deepcopy(model), weights=qint8)
    samples = [{"input_ids": torch.randint(0, 64, (2, 10))} for _ in range(2)]
    report = smooth_quant(qmodel, samples, alpha=0.5)
    # Every LayerNorm output is also a residual: q/k/v and the FFN up-projection keep runtime factors.
    assert set(report.values()) == {"input_smooth"}
    assert {f"encoder.layer.{i}.{n}" for i in range(2) for n in ("attention.self.query", "intermediate.dense")} <= set(
        report
    )
    assert all(isinstance(qmodel.get_submodule(name), QLinear) for name in report)
    reference = quantize(copy.deepcopy(model), weights=qint8)
    with torch.no_grad():
        torch.testing.assert_close(
            qmodel(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state, rtol=0.05, atol=0.05
        )
        torch.testing.assert_close(qmodel(input_ids=ids).last_hidden_state, before, rtol=0.05, atol=0.05)


def test_smooth_quant_errors():
    block = _PreNormBlock()
    with pytest.raises(ValueError, match="alpha"):
        smooth_quant(block, _samples(), alpha=1.5)
    with pytest.raises(ValueError, match="sample"):
        smooth_quant(block, [])
    frozen = freeze(quantize(_PreNormBlock(), weights=qint8))
    with pytest.raises(ValueError, match="freeze"):
        smooth_quant(frozen, _samples())


def test_include_and_exclude_choose_the_linears():
    block = _PreNormBlock()
    report = smooth_quant(block, _samples(), include=["q", "k", "v"], exclude="v")
    # v still reads the norm's output, unsmoothed: folding would change it, so nothing is folded.
    assert report == {}
