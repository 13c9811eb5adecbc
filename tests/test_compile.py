"""torch.compile(fullgraph=True) of quantized models gives the eager outputs (CPU)."""

import pytest
import torch
from torch import nn

from quanto_backend import Calibration, QActivation, freeze, quantize


def _as_float(t):
    return t.dequantize() if isinstance(t, QActivation) else t


@pytest.mark.parametrize(
    "weights, activations",
    [("int8", None), ("int4", None), ("int2", None), ("float8", None), ("int8", "int8"), ("float8", "float8")],
)
def test_compile_fullgraph_matches_eager(weights, activations):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.LayerNorm(32)).eval()
    x = torch.randn(4, 64)
    quantize(model, weights=weights, activations=activations, group_size=32 if weights in ("int4", "int2") else None)
    if activations:
        with torch.no_grad(), Calibration():
            model(x)
    freeze(model)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert isinstance(compiled, QActivation) == isinstance(eager, QActivation)
    torch.testing.assert_close(_as_float(compiled), _as_float(eager), rtol=1e-5, atol=1e-5)
