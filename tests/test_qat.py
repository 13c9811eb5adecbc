"""Quantization-aware training, the seed's loop verbatim, on a small classifier."""

import torch
import torch.nn.functional as F
from torch import nn

from quanto_backend import Calibration, QActivation, freeze, qint8, quantize


def _data(n=512):
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 20, generator=g) * 2
    target = torch.randint(0, 4, (n,), generator=g)
    data = centers[target] + torch.randn(n, 20, generator=g)
    return list(zip(data.split(64), target.split(64), strict=False))


def _accuracy(model, loader):
    with torch.no_grad():
        correct = sum((model(d).dequantize().argmax(-1) == t).sum().item() for d, t in loader)
    return correct / sum(len(t) for _, t in loader)


def test_qat_loop_trains_and_freeze_keeps_accuracy():
    train_loader = _data()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    quantize(model, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration(momentum=0.9):
        for data, _ in train_loader:
            model(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []

    model.train()
    for _epoch in range(3):
        for data, target in train_loader:
            optimizer.zero_grad()
            output = model(data).dequantize()
            loss = F.cross_entropy(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])
    model.eval()
    before = _accuracy(model, train_loader)
    freeze(model)
    assert isinstance(model(train_loader[0][0]), QActivation)
    after = _accuracy(model, train_loader)
    assert before > 0.9 and abs(after - before) <= 0.02
