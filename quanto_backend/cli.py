"""The ``quanto-backend`` command: quantize a model several ways and report size, accuracy and CPU latency.

With no arguments it quantizes the embedded all-MiniLM-L6-v2 to int8, int4 and float8 weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from .evaluate import (
    default_model_dir,
    linear_nbytes,
    load_sentences,
    mean_cosine,
    median_latency,
    sentence_embeddings,
    weights_nbytes,
)
from .qtypes import as_qtype
from .quantize import freeze, quantize
from .tensor import WEIGHT_QTYPES

DEFAULT_WEIGHTS = ("int8", "int4", "float8")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quanto-backend", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a local transformers model folder")
    parser.add_argument(
        "--weights",
        default=",".join(DEFAULT_WEIGHTS),
        help=f"comma-separated weight qtypes (default: {','.join(DEFAULT_WEIGHTS)})",
    )
    parser.add_argument("--group-size", type=int, default=None, help="inputs per group for int2/int4 (default 128)")
    parser.add_argument("--exclude", action="append", default=None, help="fnmatch pattern of modules to keep float")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="save each quantized model to OUTPUT/<weights> (safetensors + config.json with its quantization_config)"
        " for transformers' from_pretrained after `import quanto_backend`",
    )
    args = parser.parse_args(argv)
    args.weights = [as_qtype(w.strip(), WEIGHT_QTYPES, "weights") for w in args.weights.split(",") if w.strip()]
    return args


def _load(model_dir: Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # ours is the one that tells the user how far along the run is

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a transformers model folder (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    model_cls = AutoModelForCausalLM if causal else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (lambda: model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()), tokenizer


def _save(model_dir: Path, tokenizer, qtype, args: argparse.Namespace) -> None:
    """Save ``model_dir`` quantized to ``qtype`` as transformers' quantize-on-load makes it (the format that
    ``from_pretrained`` reloads), with its tokenizer, into ``args.output / <weights>``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .integrations import QuantoConfig

    config = AutoConfig.from_pretrained(model_dir)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    model_cls = AutoModelForCausalLM if causal else AutoModel
    group_size = args.group_size if qtype.is_packed else None
    qconfig = QuantoConfig(weights=qtype, group_size=group_size, modules_to_not_convert=args.exclude)
    out = args.output / qtype.name.removeprefix("q")
    model_cls.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qconfig).save_pretrained(out)
    tokenizer.save_pretrained(out)


def run(argv: list[str] | None = None) -> list[dict]:
    """Run the command and return its table rows (one dict per configuration, float first)."""
    args = _parse_args(argv)
    model_dir = args.model or default_model_dir()
    load, tokenizer = _load(model_dir)
    sentences = load_sentences()
    timed_batch = sentences[:16]
    rows = []
    configs = [None, *args.weights]
    with tqdm(configs, desc="quantizing", disable=args.quiet, unit="config") as progress:
        for qtype in progress:
            progress.set_postfix_str(str(qtype or "float32"))
            model = load()
            if qtype is not None:
                group_size = args.group_size if qtype.is_packed else None  # 8-bit weights take no group size
                quantize(model, weights=qtype, group_size=group_size, exclude=args.exclude)
                freeze(model)
                if args.output is not None:
                    _save(model_dir, tokenizer, qtype, args)
            embeddings = sentence_embeddings(model, tokenizer, sentences)
            if qtype is None:
                reference = embeddings
            latency = median_latency(lambda m=model: sentence_embeddings(m, tokenizer, timed_batch), repeats=5)
            rows.append(
                {
                    "weights": str(qtype or "float32"),
                    "linear_mb": linear_nbytes(model) / 2**20,
                    "size_mb": weights_nbytes(model) / 2**20,
                    "cosine": mean_cosine(embeddings, reference),
                    "latency_ms": latency * 1e3,
                }
            )
    _print_table(model_dir, rows, len(sentences), len(timed_batch))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))
    return rows


def _print_table(model_dir: Path, rows: list[dict], n_sentences: int, batch: int) -> None:
    print(f"model: {model_dir}")
    print(f"cosine: mean over {n_sentences} sentences of mean-pooled last hidden states vs float32")
    print(f"latency: median CPU time of one forward pass over {batch} sentences ({torch.get_num_threads()} threads)")
    print("size: MB of the Linear/Conv2d layers (those quantized) and of the whole model")
    print(f"{'weights':<16}{'layers (MB)':>12}{'model (MB)':>12}{'cosine':>10}{'latency (ms)':>14}")
    for r in rows:
        print(
            f"{r['weights']:<16}{r['linear_mb']:>12.2f}{r['size_mb']:>12.2f}{r['cosine']:>10.5f}{r['latency_ms']:>14.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        run(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"quanto-backend: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
