"""Charts of the benchmark results (one function per benchmark JSON) and the machine description, shared by the
bench scripts.

Each bench script calls its function after writing its JSON; to redraw from a JSON file (e.g. the one
``bench/kernel_speed.py`` writes):

    python bench/plot.py bench/results/kernel_speed-cpu.json      # writes bench/results/kernel_speed-cpu.png

The kind of chart is read from the JSON's ``benchmark`` field, or from the file name (``kernel_speed-*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch

from quanto_backend.ops.cpu import cpu_kind

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "machine_info",
    "plot_accuracy",
    "plot_cpu_dispatch",
    "plot_cpu_linear",
    "plot_file",
    "plot_kernel_speed",
    "plot_models",
    "save_report",
]


CODE_PATH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, load, library versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kind": cpu_kind(),  # what quanto_backend's CPU contracts and dispatch tables are keyed by
        # the environment that picks other code paths than the CPU's own (see tests/test_cpu_differential.py)
        "code_path_env": {k: os.environ[k] for k in CODE_PATH_ENV if k in os.environ},
        "torch": torch.__version__,
        "loadavg_1m_5m_15m": load,
    }


def _bar_group(ax, labels: list[str], series: dict[str, list[float]], ylabel: str, fmt: str = "{:.2f}") -> None:
    """Grouped bars: one group per label, one bar per series, each bar annotated with its value."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) if v == v else "" for v in values], fontsize=6, rotation=90)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.2)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kernel_speed(report: dict, path: Path) -> Path:
    """``bench/kernel_speed.py``: speedup over each float baseline (bfloat16 on a GPU; float32 and bfloat16 on CPU) and
    achieved bandwidth, per shape, qtype/mode and M."""
    rows = report["linear"]
    shapes = sorted({(r["in_features"], r["out_features"]) for r in rows})
    cases = list(dict.fromkeys((r["qtype"], r["mode"]) for r in rows))
    baselines = [b for b in ("float32", "bfloat16") if any(f"speedup_vs_{b}" in r for r in rows)]
    use_peak = all("peak_fraction" in r for r in rows)
    bw_key, bw_label = ("peak_fraction", "fraction of peak bandwidth") if use_peak else ("gbps", "achieved GB/s")
    n_rows = len(baselines) + 1
    fig, axes = plt.subplots(n_rows, len(shapes), figsize=(5 * len(shapes), 3.5 * n_rows), squeeze=False)
    for col, (k, n) in enumerate(shapes):
        by_key = {(r["qtype"], r["mode"], r["m"]): r for r in rows if (r["in_features"], r["out_features"]) == (k, n)}
        ms = sorted({m for _, _, m in by_key})
        labels = [f"M={m}" for m in ms]

        picked = {f"{q} {mode}": [by_key.get((q, mode, m)) for m in ms] for q, mode in cases}
        for row, key in enumerate([f"speedup_vs_{b}" for b in baselines] + [bw_key]):
            series = {label: [r[key] if r else float("nan") for r in rs] for label, rs in picked.items()}
            ylabel = bw_label if key == bw_key else f"speedup vs {baselines[row]} F.linear"
            _bar_group(axes[row][col], labels, series, ylabel)
            if key != bw_key:
                axes[row][col].axhline(1.0, color="black", linewidth=0.8)
        axes[0][col].set_title(f"{k} -> {n}")
    axes[0][0].legend(fontsize=7)
    torch_version = report.get("machine", {}).get("torch", report.get("torch", "?"))
    fig.suptitle(f"quantized linear kernels on {report.get('device', '?')} (torch {torch_version})")
    return _save(fig, path)


def plot_cpu_linear(report: dict, path: Path) -> Path:
    """``bench/cpu_linear.py``: median time per configuration and M, with the speedup over float32."""
    rows = report["rows"]
    ms = sorted({r["m"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(ms), figsize=(6 * len(ms), 4.5), squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        picked = {r["config"]: r for r in rows if r["m"] == m}
        names = [c for c in configs if c in picked]
        times = [picked[c]["median_ms"] for c in names]
        bars = ax.barh(
            names,
            times,
            xerr=[
                [picked[c]["median_ms"] - picked[c]["q1_ms"] for c in names],
                [picked[c]["q3_ms"] - picked[c]["median_ms"] for c in names],
            ],
        )
        ax.bar_label(
            bars,
            labels=[f"{t:.2f} ms  x{picked[c]['speedup_vs_float32']:.2f}" for t, c in zip(times, names, strict=True)],
            fontsize=7,
            padding=3,
        )
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms), bar = interquartile range")
        ax.set_title(f"M={m}")
        ax.margins(x=0.45)
    shape = f"{report['in_features']} -> {report['out_features']}"
    fig.suptitle(
        f"CPU linear {shape}, {report['threads']} threads, {report['machine']['cpu']} (x = speedup vs float32)"
    )
    return _save(fig, path)


def plot_cpu_dispatch(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = sorted({(r["weights"], r.get("dtype", "float32")) for r in report["results"]})
    for name, dtype in series:
        results = sorted(
            (r for r in report["results"] if r["weights"] == name and r.get("dtype", "float32") == dtype),
            key=lambda r: r["in_features"] * r["out_features"],
        )
        size = [(r["in_features"] * r["out_features"]) ** 0.5 for r in results]
        line = ax.plot(size, [r["measured_crossover_rows"] for r in results], "o", label=f"{name} {dtype}: measured")
        ax.plot(size, [r["kernel_max_rows"] for r in results], "--", color=line[0].get_color(), label="bound in use")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("sqrt(in_features * out_features)")
    ax.set_ylabel("rows")
    machine = report.get("machine", {})
    kind = machine.get("cpu_kind", machine.get("cpu_capability", ""))
    ax.set_title(f"CPU ({kind}): largest batch where the packed kernel beats the other path")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_models(report: dict, path: Path) -> Path:
    """``bench/models.py``: decode, prefill, peak memory, and from_pretrained load time and memory."""
    rows = report["rows"]
    names = [r["config"] for r in rows]
    panels = [
        ("decode_ms_per_token", "decode (ms / token)"),
        ("prefill_ms", f"prefill of {report['prompt_tokens']} tokens (ms)"),
        ("peak_memory_mb", "peak memory, generate (MB)"),
        ("weights_mb", "weights (MB)"),
    ]
    loads = report.get("load", [])
    fig, axes = plt.subplots(1, len(panels) + (2 if loads else 0), figsize=(4 * (len(panels) + 2), 4))
    for ax, (key, title) in zip(axes, panels, strict=False):
        values = [r.get(key, float("nan")) for r in rows]
        bars = ax.bar(names, values)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    if loads:
        load_names = [r["config"] for r in loads]
        for ax, (key, title) in zip(
            axes[len(panels) :],
            [("load_s", "from_pretrained time (s)"), ("load_peak_mb", "load peak RSS (MB)")],
            strict=True,
        ):
            values = [r[key] for r in loads]
            bars = ax.bar(load_names, values, color="tab:orange")
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(f"{report['model']} on {report['device']} ({report['dtype']})")
    return _save(fig, path)


def plot_accuracy(report: dict, path: Path) -> Path:
    """``bench/accuracy.py``: cosine of quantized vs float sentence embeddings, per configuration."""
    rows = report["rows"]
    names = [r["config"] for r in rows]
    gaps = [max(1.0 - r["cosine"], 1e-7) for r in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 3, 4.5))
    bars = ax.bar(names, gaps)
    ax.bar_label(bars, labels=[f"{r['cosine']:.5f}" for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("1 - cosine (log scale; label: cosine)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.set_title(f"{report['model_name']}: mean cosine over {report['sentences']} sentences vs float32")
    return _save(fig, path)


PLOTTERS: dict[str, Callable[[dict, Path], Path]] = {
    "kernel_speed": plot_kernel_speed,
    "cpu_linear": plot_cpu_linear,
    "cpu_dispatch": plot_cpu_dispatch,
    "models": plot_models,
    "accuracy": plot_accuracy,
}


def plot_file(json_path: Path, png_path: Path | None = None) -> Path:
    """Draw the chart of one results JSON (next to it, as ``.png``, unless ``png_path`` is given)."""
    report = json.loads(json_path.read_text())
    kind = report.get("benchmark") or json_path.stem.split("-")[0]
    if kind not in PLOTTERS:
        raise ValueError(f"{json_path}: unknown benchmark {kind!r}; known: {', '.join(PLOTTERS)}")
    return PLOTTERS[kind](report, png_path or json_path.with_suffix(".png"))


def save_report(report: dict, json_path: Path, script: str, argv: list[str] | None) -> None:
    """Record the command line (``script``: the bench script's ``__file__``; ``argv``: its arguments, ``None`` for
    the process's) in ``report``, write it to ``json_path`` and draw its chart next to it."""
    report["command"] = f"python bench/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path} and {PLOTTERS[report['benchmark']](report, json_path.with_suffix('.png'))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the PNG chart of benchmark JSON files.")
    parser.add_argument("json", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for path in args.json:
        print(f"wrote {plot_file(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
