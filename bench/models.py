"""Decode latency per token, prefill time and peak memory of a Llama-architecture model built from a config, float
vs each quantized configuration; and the time and peak memory of ``from_pretrained(...,
quantization_config=QuantoConfig(...))`` vs a plain ``from_pretrained``.

The model (random weights, seeded) is saved once as a float32 safetensors checkpoint; each configuration then runs
in its own process, so that its load time and peak memory are its own: it loads the checkpoint (plain, or quantized
on load by ``QuantoConfig``; W8A8 and the optional optimum-quanto/torchao columns quantize after a plain load),
times a prefill of ``--prompt`` tokens (median of 3) and ``--decode`` single-token steps with the KV cache (median
per token), and records the peak memory of that work (CPU: resident set size sampled every 2 ms; GPU:
``torch.cuda.max_memory_allocated``).

    python bench/models.py                         # CPU (~150M parameters) or, with a GPU, ~1B in bfloat16
    python bench/models.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from plot import machine_info, save_report  # bench/plot.py, next to this script

RESULTS = Path(__file__).parent / "results"

# Llama-3 shaped (grouped-query attention, SwiGLU MLP); sizes per device.
CPU_MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "vocab_size": 32000}
GPU_MODEL = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "vocab_size": 128256}
QUICK_MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 512}

# name -> (how it is built, its arguments). "plain": from_pretrained in a dtype; "quanto_config": from_pretrained
# with QuantoConfig(**args), in the device's float dtype unless args name one (the "(bf16)" rows on CPU, whose
# activations, lm_head and attention are bfloat16, as in the bfloat16 row); "quantize": plain float32/bfloat16 load
# then quantize_backend.quantize(**args).
CONFIGS: dict[str, tuple[str, dict]] = {
    "float32": ("plain", {"dtype": "float32"}),
    "bfloat16": ("plain", {"dtype": "bfloat16"}),
    "int8": ("quanto_config", {"weights": "int8"}),
    "int4": ("quanto_config", {"weights": "int4"}),
    "float8": ("quanto_config", {"weights": "float8"}),
    "int8 (bf16)": ("quanto_config", {"weights": "int8", "dtype": "bfloat16"}),
    "int4 (bf16)": ("quanto_config", {"weights": "int4", "dtype": "bfloat16"}),
    "w8a8-dynamic": ("quantize", {"weights": "int8", "activations": "int8", "activation_scales": "dynamic"}),
    "optimum-quanto int8": ("optimum_quanto", {"weights": "qint8"}),
    "optimum-quanto int4": ("optimum_quanto", {"weights": "qint4"}),
    "torchao int8": ("torchao", {}),
}
CPU_CONFIGS = ("float32", "bfloat16", "int8", "int4", "int8 (bf16)", "int4 (bf16)", "w8a8-dynamic")
GPU_CONFIGS = ("bfloat16", "int8", "int4", "float8", "w8a8-dynamic")
OPTIONAL = {"optimum-quanto int8": "optimum.quanto", "optimum-quanto int4": "optimum.quanto", "torchao int8": "torchao"}


class PeakRSS:
    """Peak resident set size (bytes) of this process while the ``with`` block runs, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.002)

    def __enter__(self) -> PeakRSS:
        self.before = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class PeakCuda:
    """Peak memory allocated by torch on the current GPU while the ``with`` block runs."""

    def __enter__(self) -> PeakCuda:
        torch.cuda.synchronize()
        self.before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def build_checkpoint(directory: Path, sizes: dict) -> dict:
    """Save a seeded random Llama model (float32) to ``directory``; return its config summary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(sizes["hidden_size"] // 64, 2)
    config = LlamaConfig(
        **sizes,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters()), **sizes, "attention_heads": heads}


def _load(checkpoint: Path, name: str, device: torch.device, float_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    import quanto_backend

    kind, args = CONFIGS[name]
    device_map = {"": device.index or 0} if device.type == "cuda" else None
    if kind == "plain":
        return AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=getattr(torch, args["dtype"]), device_map=device_map
        )
    if kind == "quanto_config":
        config = quanto_backend.QuantoConfig(**{k: v for k, v in args.items() if k != "dtype"})
        dtype = getattr(torch, args["dtype"]) if "dtype" in args else float_dtype
        return AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, device_map=device_map, quantization_config=config
        )
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=float_dtype, device_map=device_map)
    if kind == "quantize":
        quanto_backend.quantize(model, exclude="lm_head", **args)
        quanto_backend.freeze(model)
    elif kind == "optimum_quanto":
        import optimum.quanto as oq

        oq.quantize(model, weights=getattr(oq, args["weights"]), exclude="lm_head")
        oq.freeze(model)
    elif kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(
            model,
            Int8WeightOnlyConfig(),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn,
        )
    return model


@torch.no_grad()
def worker(
    checkpoint: Path, name: str, device: torch.device, float_dtype: torch.dtype, prompt: int, decode: int
) -> dict:
    """Load one configuration, time it, and return its row (runs in its own process)."""
    from quanto_backend.evaluate import weights_nbytes

    peak_cls = PeakCuda if device.type == "cuda" else PeakRSS
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    with peak_cls() as load_peak:
        model = _load(checkpoint, name, device, float_dtype).eval()
        sync()
    load_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with peak_cls() as run_peak:
        model(ids[:, :8], use_cache=False)  # warmup (also converts cached kernel layouts)
        prefill = statistics.median(timed(lambda: model(ids, use_cache=False)) for _ in range(3))
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode):
            sync()
            t = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            sync()
            steps.append(time.perf_counter() - t)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    kind = CONFIGS[name][0]
    return {
        "config": name,
        "loaded_by": {"plain": "from_pretrained", "quanto_config": "from_pretrained + QuantoConfig"}.get(
            kind, "from_pretrained, then quantize"
        ),
        "decode_ms_per_token": statistics.median(steps) * 1e3,
        "prefill_ms": prefill * 1e3,
        "peak_memory_mb": run_peak.peak / 2**20,
        # CPU: the process's RSS before loading (interpreter, torch, transformers), included in both peaks
        "runtime_mb": load_peak.before / 2**20,
        "weights_mb": weights_nbytes(model) / 2**20,
        "load_s": load_s,
        "load_peak_mb": (load_peak.peak - load_peak.before) / 2**20,
    }


def run(args: argparse.Namespace, device: torch.device) -> dict:
    sizes = QUICK_MODEL if args.quick else (GPU_MODEL if device.type == "cuda" else CPU_MODEL)
    names = list(args.configs or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS))
    if not args.no_optional:
        import importlib.util

        names += [n for n, module in OPTIONAL.items() if importlib.util.find_spec(module.split(".")[0]) is not None]
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        summary = build_checkpoint(Path(tmp), sizes)
        for name in names:
            command = [sys.executable, __file__, "--worker", name, "--checkpoint", tmp, "--device", device.type]
            command += ["--prompt", str(args.prompt), "--decode", str(args.decode), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                rows.append({"config": name, "error": done.stderr.strip().splitlines()[-1][:300]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{name:<22} decode {row['decode_ms_per_token']:8.2f} ms/token  prefill {row['prefill_ms']:9.1f} ms  "
                f"peak {row['peak_memory_mb']:8.1f} MB  weights {row['weights_mb']:8.1f} MB  "
                f"load {row['load_s']:6.2f} s / {row['load_peak_mb']:8.1f} MB ({row['loaded_by']})"
            )
            rows.append(row)
            if row["loaded_by"] != "from_pretrained, then quantize":
                loads.append({k: row[k] for k in ("config", "loaded_by", "load_s", "load_peak_mb")})
    return {
        "benchmark": "models",
        "model": f"Llama-architecture, {summary['parameters'] / 1e6:.0f}M parameters (random, from a config)",
        "model_config": summary,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(float_dtype).removeprefix("torch."),
        "threads": args.threads,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.decode,
        "machine": machine_info(),
        "rows": [r for r in rows if "error" not in r],
        "failed": [r for r in rows if "error" in r],
        "load": loads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--no-optional", action="store_true", help="skip optimum-quanto and torchao")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 8-token prompt, 4 decode steps")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        print(json.dumps(worker(args.checkpoint, args.worker, device, dtype, args.prompt, args.decode)))
        return 0
    if args.quick:
        args.prompt, args.decode = 8, 4
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda:0" if use_cuda else "cpu")
    report = run(args, device)
    save_report(report, args.output_dir / f"models-{device.type}.json", __file__, argv)
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
