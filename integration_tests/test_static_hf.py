"""Static quantization with asymmetric uint8 activations and per-axis uint8 weights survives
``save_pretrained`` / ``from_pretrained``: scales, zero-points and weights reload bit for bit."""

from __future__ import annotations

import torch
from transformers import BertModel

from quanto_backend import Calibration, MinMaxObserver, QLinear, QuantoConfig


def _calibrated(bert_dir, tokens):
    model = BertModel.from_pretrained(bert_dir, quantization_config=QuantoConfig(weights="uint8", activations="uint8"))
    with torch.no_grad(), Calibration(observer=MinMaxObserver):
        for seed in range(3):
            model(input_ids=torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)))
    return model


def test_uint8_static_state_round_trips_through_save_pretrained(bert_dir, tokens, tmp_path):
    model = _calibrated(bert_dir, tokens)
    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query, QLinear) and query.weight.dtype == torch.uint8
    assert query.weight_shift.shape == (query.out_features, 1)
    assert query.input_zero_point.dtype == torch.int32 and query.input_scale.item() != 1.0
    with torch.no_grad():
        expected = model(input_ids=tokens).last_hidden_state
    float_model = BertModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        reference = float_model(input_ids=tokens).last_hidden_state
    expected_float = expected.dequantize() if hasattr(expected, "dequantize") else expected
    cosine = torch.nn.functional.cosine_similarity(expected_float.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99

    model.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path)
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert set(state) == set(reloaded_state)
    for key in state:
        if key.endswith(("_zero_point", "_scale", "_shift")) or state[key].dtype == torch.uint8:
            assert reloaded_state[key].dtype == state[key].dtype, key
            assert torch.equal(reloaded_state[key], state[key]), key
    with torch.no_grad():
        got = reloaded(input_ids=tokens).last_hidden_state
    got = got.dequantize() if hasattr(got, "dequantize") else got
    assert torch.equal(got, expected_float)


def test_int8_input_zero_points_round_trip_through_save_pretrained(bert_dir, tokens, tmp_path):
    # Calibration gives the int8 inputs after a GELU a zero-point; the skeleton rebuilt from the config has
    # symmetric inputs, so the reload must take the zero-points from the checkpoint.
    model = BertModel.from_pretrained(bert_dir, quantization_config=QuantoConfig(weights="int8", activations="int8"))
    with torch.no_grad(), Calibration():
        for seed in range(3):
            model(input_ids=torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)))
    dense = model.encoder.layer[0].output.dense  # fed by the intermediate GELU
    assert dense.input_zero_point.dtype == torch.int32
    zero_points = {n: b for n, b in model.named_buffers() if n.endswith("input_zero_point")}
    with torch.no_grad():
        expected = model(input_ids=tokens).last_hidden_state
    model.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path)
    got_zero_points = {n: b for n, b in reloaded.named_buffers() if n.endswith("input_zero_point")}
    assert got_zero_points.keys() == zero_points.keys()
    assert all(torch.equal(got_zero_points[n], zero_points[n]) for n in zero_points)
    with torch.no_grad():
        got = reloaded(input_ids=tokens).last_hidden_state
    assert torch.equal(got, expected)
