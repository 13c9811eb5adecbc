"""Quantize-on-load in the first minute: the time and peak memory of ``from_pretrained(...,
quantization_config=...)`` of a float32 Llama checkpoint, and the logits' cosine to the float model; ours against
optimum-quanto's ``QuantoConfig`` through transformers when it is importable; and the cost of ``import
quanto_backend`` over ``import torch``.

Every configuration runs in its own fresh process, and the configurations are interleaved over ``--repeats``
rounds (the machine is shared: compare rows of one run, not across runs). Peak memory is the resident set size
sampled every 2 ms during ``from_pretrained``, minus the RSS before it.

    python bench/load.py                                   # 70M-parameter Llama (4 layers, hidden 1024)
    PYTHONPATH=/tmp/oq python bench/load.py                # with optimum-quanto installed there (--no-deps)
    python bench/load.py --quick --output /tmp/load.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# 4 layers of hidden 1024 (Llama-3 shaped: grouped-query attention, SwiGLU), untied head: 70M parameters.
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "vocab_size": 12000}
QUICK_MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 512}

# name -> (library, config arguments). "quanto_backend": quanto_backend.QuantoConfig; "optimum-quanto":
# transformers.QuantoConfig (quant_method "quanto", needs optimum-quanto); "float": a plain load.
CONFIGS: dict[str, tuple[str, dict]] = {
    "float32": ("float", {}),
    "int4": ("quanto_backend", {"weights": "int4"}),
    "int4 (hqq)": ("quanto_backend", {"weights": "int4", "optimizer": "hqq"}),
    "int4 (minmax)": ("quanto_backend", {"weights": "int4", "optimizer": "minmax"}),
    "int8": ("quanto_backend", {"weights": "int8"}),
    "optimum-quanto int4": ("optimum-quanto", {"weights": "int4"}),
    "optimum-quanto int8": ("optimum-quanto", {"weights": "int8"}),
}
HEAVY_MODULES = ("transformers", "diffusers", "torch._dynamo", "accelerate")


def build_checkpoint(directory: Path, sizes: dict) -> dict:
    """Save a seeded random Llama (float32) to ``directory``; return its config summary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(sizes["hidden_size"] // 64, 2)
    config = LlamaConfig(
        **sizes, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), tie_word_embeddings=False
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {"parameters": n, **sizes, "attention_heads": heads}


def worker(checkpoint: Path, name: str, logits_path: Path) -> dict:
    """One load, in this (fresh) process: its time, peak RSS over the process before it, and the logits."""
    from models import PeakRSS  # bench/models.py
    from transformers import AutoModelForCausalLM

    library, args = CONFIGS[name]
    if library == "quanto_backend":
        import quanto_backend

        kwargs = {"quantization_config": quanto_backend.QuantoConfig(**args)}
    elif library == "optimum-quanto":
        from transformers import QuantoConfig

        kwargs = {"quantization_config": QuantoConfig(**args)}
    else:
        kwargs = {}
    start = time.perf_counter()
    with PeakRSS() as peak:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()
    load_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    torch.save(logits, logits_path)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"config": name, "load_s": load_s, "load_peak_mb": (peak.peak - peak.before) / 2**20, "model_mb": size / 2**20}


def import_seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure_import(repeats: int) -> dict:
    """``import torch`` and ``import quanto_backend`` alternately in fresh processes (medians), and the heavy
    modules that ``import quanto_backend`` leaves out of ``sys.modules``."""
    torch_s, ours_s = [], []
    for _ in range(repeats):
        torch_s.append(import_seconds("import torch"))
        ours_s.append(import_seconds("import quanto_backend"))
    code = f"import sys, quanto_backend; print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return {
        "import_torch_s": statistics.median(torch_s),
        "import_quanto_backend_s": statistics.median(ours_s),
        "extra_s": statistics.median(ours_s) - statistics.median(torch_s),
        "samples_torch_s": torch_s,
        "samples_quanto_backend_s": ours_s,
        "heavy_modules_loaded": loaded,
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(args: argparse.Namespace) -> dict:
    import importlib.util

    names = list(args.configs or CONFIGS)
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        names = [n for n in names if CONFIGS[n][0] != "optimum-quanto"]
    samples: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        summary = build_checkpoint(checkpoint, QUICK_MODEL if args.quick else MODEL)
        for round_ in range(args.repeats):
            for name in names:
                logits_path = Path(tmp) / f"{name}.pt"
                command = [sys.executable, __file__, "--worker", name, "--checkpoint", str(checkpoint)]
                command += ["--logits", str(logits_path), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-2000:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if round_ == 0:
                    row["logits"] = str(logits_path)
                samples[name].append(row)
                print(f"{name:<22} load {row['load_s']:6.2f} s  peak +{row['load_peak_mb']:7.1f} MB")
        reference = torch.load(Path(tmp) / "float32.pt") if "float32" in names else None
        rows = []
        for name, runs in samples.items():
            if not runs:
                continue
            row = {
                "config": name,
                "library": CONFIGS[name][0],
                "args": CONFIGS[name][1],
                "load_s_median": statistics.median(r["load_s"] for r in runs),
                "load_s_samples": [r["load_s"] for r in runs],
                "load_peak_mb_median": statistics.median(r["load_peak_mb"] for r in runs),
                "load_peak_mb_samples": [r["load_peak_mb"] for r in runs],
                "model_mb": runs[0]["model_mb"],
            }
            if reference is not None:
                row["logits_cosine_vs_float32"] = cosine(torch.load(runs[0]["logits"]), reference)
            rows.append(row)
    from plot import machine_info  # bench/plot.py

    return {
        "benchmark": "load",
        "model": f"Llama-architecture, {summary['parameters'] / 1e6:.0f}M parameters (random, float32 checkpoint)",
        "model_config": summary,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rows": rows,
        "import": measure_import(args.repeats) if not args.no_import else None,
        "command": "python bench/load.py " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    parser.add_argument("--no-import", action="store_true", help="skip the import-time measurement")
    parser.add_argument("--output", type=Path, default=RESULTS / "load-cpu.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.worker, args.logits)))
        return 0
    report = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
