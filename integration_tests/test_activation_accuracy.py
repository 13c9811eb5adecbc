"""Accuracy of activation quantization (W8A8) on the real all-MiniLM-L6-v2: mean cosine of mean-pooled sentence
embeddings vs float32, over the project's 124 English sentences (the first 32 are the calibration samples).

Every configuration has int8 per-axis weights; the bounds are a few thousandths below the cosines measured here
(CPU, torch 2.13). Print the table with ``pytest integration_tests/test_activation_accuracy.py -s``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModel

from quanto_backend import (
    Calibration,
    HistogramObserver,
    convert_static,
    freeze,
    insert_observers,
    qfloat8,
    qint8,
    quantize,
    quint8,
    smooth_quant,
)
from quanto_backend.evaluate import mean_cosine, sentence_embeddings

N_CALIBRATION = 32


def _calibrated(activations, observer=None, alpha=None, **calibration):
    def build(model, tokenizer, samples):
        quantize(model, weights=qint8, activations=activations)
        if alpha is not None:
            batches = [dict(tokenizer(samples[i : i + 16], padding=True, return_tensors="pt")) for i in (0, 16)]
            smooth_quant(model, batches, alpha=alpha)
        with torch.no_grad(), Calibration(observer=observer, **calibration):
            sentence_embeddings(model, tokenizer, samples)

    return build


def _dynamic(activations):
    def build(model, tokenizer, samples):
        quantize(model, weights=qint8, activations=activations, activation_scales="dynamic")

    return build


def _static_workflow(model, tokenizer, samples):
    insert_observers(model, activations=quint8, types=torch.nn.Linear)
    sentence_embeddings(model, tokenizer, samples)
    convert_static(model, weights=quint8)


# (name, how the model is quantized, lower bound of the mean cosine, measured)
CONFIGS = [
    # The default static configuration: int8 inputs get a zero-point where mostly one-sided (0.9841 without).
    ("int8 static per-tensor (default)", _calibrated(qint8), 0.990),  # 0.9922
    ("int8 static per-tensor symmetric", _calibrated(qint8, input_zero_points=False), 0.981),  # 0.9841
    ("uint8 static per-tensor asymmetric", _calibrated(quint8), 0.990),  # 0.9936
    ("int8 static, percentile observer 99.99", _calibrated(qint8, HistogramObserver), 0.985),  # 0.9887
    (
        "int8 static, percentile observer 99.9",
        _calibrated(qint8, functools.partial(HistogramObserver, percentile=99.9)),
        0.920,  # 0.9245: clipping 0.1% clips BERT's meaningful LayerNorm outliers
    ),
    ("int8 dynamic per-token", _dynamic(qint8), 0.994),  # 0.9974
    ("int8 static + SmoothQuant 0.5", _calibrated(qint8, alpha=0.5), 0.993),  # 0.9964 (0.9890 symmetric)
    ("float8 static per-tensor", _calibrated(qfloat8), 0.995),  # 0.9988
    ("float8 dynamic per-token", _dynamic(qfloat8), 0.996),  # 0.9989
    ("uint8 A + uint8 W, insert_observers/convert_static", _static_workflow, 0.990),  # 0.9939
]


@pytest.mark.parametrize("name, build, bound", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_activation_cosine_bound(minilm, name, build, bound):
    path, tokenizer, sentences, reference = minilm
    model = AutoModel.from_pretrained(path).eval()
    build(model, tokenizer, sentences[:N_CALIBRATION])
    freeze(model)
    cosine = mean_cosine(reference, sentence_embeddings(model, tokenizer, sentences))
    print(f"\n| {name} | {cosine:.5f} |")
    assert cosine >= bound, f"{name}: mean cosine {cosine:.5f} < {bound}"


def test_smoothing_is_measurably_closer_to_float(minilm):
    path, tokenizer, sentences, reference = minilm
    cosines = {}
    for alpha in (None, 0.5):
        model = AutoModel.from_pretrained(path).eval()
        _calibrated(qint8, alpha=alpha)(model, tokenizer, sentences[:N_CALIBRATION])
        freeze(model)
        cosines[alpha] = mean_cosine(reference, sentence_embeddings(model, tokenizer, sentences))
    print(f"\nW8A8 static: without smoothing {cosines[None]:.5f}, with SmoothQuant 0.5 {cosines[0.5]:.5f}")
    assert cosines[0.5] > cosines[None] + 0.002
