"""Quantize-on-load in the first minute: the time and peak memory of ``from_pretrained(...,
quantization_config=...)`` of a float32 Llama checkpoint, and the logits' cosine to the float model; ours against
optimum-quanto's ``QuantoConfig`` through transformers when it is importable; and the cost of ``import
quanto_backend`` over ``import torch``.

Every configuration runs in its own fresh process, and the configurations are interleaved over ``--repeats``
rounds (the machine is shared: compare rows of one run, not across runs). Peak memory is the resident set size
sampled every 2 ms during ``from_pretrained``, minus the RSS before it, both in all (``VmRSS``) and in the memory the
process allocated itself (``RssAnon``, without the page cache of the memory-mapped checkpoint).

    python bench/load.py                                   # 70M-parameter Llama (4 layers, hidden 1024)
    PYTHONPATH=/tmp/oq python bench/load.py                # with optimum-quanto installed there (--no-deps)
    python bench/load.py --layers 16                       # 205M parameters
    python bench/load.py --quick --output /tmp/load.json
    git archive <commit> | tar -x -C /tmp/before && python bench/load.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from plot import machine_info  # bench/plot.py, next to this script

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


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs, sampled every 2 ms: ``rss`` (all
    resident pages, including the pages of the memory-mapped checkpoint that were read) and ``anon`` (``RssAnon``:
    memory the process allocated itself; the mapped checkpoint's pages are page cache the kernel can drop)."""

    def __init__(self) -> None:
        self.peak = {"rss": 0, "anon": 0}
        self._stop = threading.Event()

    @staticmethod
    def _read() -> dict[str, int]:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, value = line.split(":")
                    fields["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) * 1024
        return fields

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            self.peak = {k: max(self.peak[k], now[k]) for k in self.peak}
            self._stop.wait(0.002)

    def __enter__(self) -> PeakMemory:
        self.before = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = self._read()
        self.peak = {k: max(self.peak[k], now[k]) for k in self.peak}

    def delta_mb(self, key: str) -> float:
        return (self.peak[key] - self.before[key]) / 2**20


def worker(checkpoint: Path, name: str, logits_path: Path) -> dict:
    """One load, in this (fresh) process: its time, peak memory over the process before it, and the logits."""
    from transformers import AutoModelForCausalLM

    library, args = CONFIGS[name]
    # Imported before the measurement, so that the peaks count the load, not the import of the code it runs.
    import transformers.models.llama.modeling_llama  # noqa: F401

    if library == "quanto_backend":
        import quanto_backend
        import quanto_backend.integrations.transformers_quantizer  # noqa: F401

        kwargs = {"quantization_config": quanto_backend.QuantoConfig(**args)}
    elif library == "optimum-quanto":
        import optimum.quanto  # noqa: F401
        from transformers import QuantoConfig

        kwargs = {"quantization_config": QuantoConfig(**args)}
    else:
        kwargs = {}
    start = time.perf_counter()
    with PeakMemory() as peak:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()
    load_s = time.perf_counter() - start
    # The largest float decoder layer of the checkpoint: the "one float layer" a quantize-on-load may hold.
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    layer = max(
        sum(4 * math.prod(shape) for k, shape in shapes.items() if k.startswith(f"model.layers.{i}."))
        for i in range(model.config.num_hidden_layers)
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    torch.save(logits, logits_path)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "config": name,
        "load_s": load_s,
        "load_peak_mb": peak.delta_mb("rss"),
        "load_peak_anon_mb": peak.delta_mb("anon"),
        "model_mb": size / 2**20,
        "float_layer_mb": layer / 2**20,
    }


def _env(baseline: Path | None) -> dict[str, str] | None:
    """The environment of a process that imports the quanto_backend found in ``baseline`` (a source tree)."""
    if baseline is None:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(baseline), os.environ.get("PYTHONPATH")]))}


# `python -c` puts its working directory first on sys.path: run it where no quanto_backend source tree is.
_NEUTRAL_DIR = tempfile.gettempdir()


def import_seconds(statement: str, baseline: Path | None = None) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env(baseline), cwd=_NEUTRAL_DIR
    )
    return float(done.stdout.strip().splitlines()[-1])


def measure_import(repeats: int, baseline: Path | None) -> dict:
    """``import torch`` and ``import quanto_backend`` (and the baseline's) alternately in fresh processes
    (medians), and the heavy modules that ``import quanto_backend`` leaves out of ``sys.modules``."""
    versions = {"this tree": None, **({"baseline": baseline} if baseline else {})}
    samples: dict[str, list[float]] = {"torch": [], **{name: [] for name in versions}}
    for _ in range(repeats):
        samples["torch"].append(import_seconds("import torch"))
        for name, path in versions.items():
            samples[name].append(import_seconds("import quanto_backend", path))
    result = {"import_torch_s": statistics.median(samples["torch"]), "samples_s": samples}
    for name, path in versions.items():
        code = f"import sys, quanto_backend; print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
        command = [sys.executable, "-c", code]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=_env(path), cwd=_NEUTRAL_DIR)
        result[name] = {
            "import_quanto_backend_s": statistics.median(samples[name]),
            "extra_over_torch_s": statistics.median(samples[name]) - result["import_torch_s"],
            "heavy_modules_loaded": done.stdout.strip(),
        }
    return result


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(args: argparse.Namespace) -> dict:
    import importlib.util

    names = list(args.configs or CONFIGS)
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        names = [n for n in names if CONFIGS[n][0] != "optimum-quanto"]
    runs_of = [(name, None) for name in names]
    if args.baseline is not None:  # the same configurations with the baseline's code (those it can express)
        runs_of += [
            (name, args.baseline)
            for name in names
            if CONFIGS[name][0] == "quanto_backend" and not CONFIGS[name][1].get("optimizer")
        ]
    label = {(name, path): name if path is None else f"{name} [baseline]" for name, path in runs_of}
    samples: dict[str, list[dict]] = {label[r]: [] for r in runs_of}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        sizes = QUICK_MODEL if args.quick else dict(MODEL, num_hidden_layers=args.layers or MODEL["num_hidden_layers"])
        summary = build_checkpoint(checkpoint, sizes)
        for round_ in range(args.repeats):
            for name, path in runs_of:
                logits_path = Path(tmp) / f"{label[name, path]}.pt"
                command = [sys.executable, __file__, "--worker", name, "--checkpoint", str(checkpoint)]
                command += ["--logits", str(logits_path), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, env=_env(path))
                name = label[name, path]
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-2000:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if round_ == 0:
                    row["logits"] = str(logits_path)
                samples[name].append(row)
                print(
                    f"{name:<22} load {row['load_s']:6.2f} s  peak RSS +{row['load_peak_mb']:7.1f} MB  "
                    f"anon +{row['load_peak_anon_mb']:7.1f} MB  model {row['model_mb']:6.1f} MB"
                )
        reference = torch.load(Path(tmp) / "float32.pt") if "float32" in names else None
        rows = []
        for name, runs in samples.items():
            if not runs:
                continue
            config = name.removesuffix(" [baseline]")
            row = {
                "config": name,
                "library": CONFIGS[config][0],
                "args": CONFIGS[config][1],
                "load_s_median": statistics.median(r["load_s"] for r in runs),
                "load_s_samples": [r["load_s"] for r in runs],
                "load_peak_mb_median": statistics.median(r["load_peak_mb"] for r in runs),
                "load_peak_mb_samples": [r["load_peak_mb"] for r in runs],
                "load_peak_anon_mb_median": statistics.median(r["load_peak_anon_mb"] for r in runs),
                "load_peak_anon_mb_samples": [r["load_peak_anon_mb"] for r in runs],
                "model_mb": runs[0]["model_mb"],
                "float_layer_mb": runs[0]["float_layer_mb"],
            }
            if reference is not None:
                row["logits_cosine_vs_float32"] = cosine(torch.load(runs[0]["logits"]), reference)
            rows.append(row)
    return {
        "benchmark": "load",
        "model": f"Llama-architecture, {summary['parameters'] / 1e6:.0f}M parameters (random, float32 checkpoint)",
        "model_config": summary,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rows": rows,
        "baseline": None if args.baseline is None else str(args.baseline),
        "import": measure_import(args.repeats, args.baseline) if not args.no_import else None,
        "command": "python bench/load.py " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 16 make 205M parameters)")
    parser.add_argument("--no-import", action="store_true", help="skip the import-time measurement")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a source tree of another quanto_backend version: its rows too"
    )
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
