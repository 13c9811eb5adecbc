"""Each benchmark script runs end to end in its quick mode (CPU, tiny sizes) and writes its JSON and its chart, so
the scripts cannot rot. Timings are never asserted; sizes and accuracies, which do not depend on load, are."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args: str | Path) -> None:
    """Run ``bench/<name>``'s ``main`` in this process (importing quanto_backend again in a subprocess would cost
    more than the quick run itself); models.py still starts one process per configuration, as it always does."""
    spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCH))  # the scripts import bench/plot.py as `plot`
    try:
        spec.loader.exec_module(module)
        assert module.main([str(a) for a in args]) == 0
    finally:
        sys.path.remove(str(BENCH))
        torch.set_num_threads(threads)


def read(path: Path) -> dict:
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    return json.loads(path.read_text())


def test_cpu_linear(tmp_path):
    run_script("cpu_linear.py", "--quick", "--no-optional", "--output-dir", tmp_path)
    report = read(tmp_path / "cpu_linear.json")
    configs = {r["config"] for r in report["rows"]}
    assert {"float32 F.linear", "int8 QLinear (fp32 act)", "int4 QLinear (bf16 act)"} <= configs
    assert {r["m"] for r in report["rows"]} == {1, 4}
    assert all(r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["median_ms"] > 0 for r in report["rows"])
    assert report["machine"]["cores"] >= 1 and report["threads"] == 2


def test_models(tmp_path):
    run_script("models.py", "--quick", "--no-optional", "--configs", "float32", "int8", "--output-dir", tmp_path)
    report = read(tmp_path / "models-cpu.json")
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"float32", "int8"} and not report["failed"]
    assert rows["int8"]["loaded_by"] == "from_pretrained + QuantoConfig"
    # int8 weights (lm_head and embeddings stay float) take less memory than float32 ones.
    assert rows["int8"]["weights_mb"] < 0.8 * rows["float32"]["weights_mb"]
    assert {r["config"] for r in report["load"]} == {"float32", "int8"}
    assert all(r["decode_ms_per_token"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())


def test_accuracy(tmp_path):
    run_script("accuracy.py", "--quick", "--no-optional", "--output-dir", tmp_path)
    report = read(tmp_path / "accuracy-cpu.json")
    cosine = {r["config"]: r["cosine"] for r in report["rows"]}
    assert cosine["float32"] == 1.0 and report["sentences"] == 16
    assert cosine["int8"] > 0.99 and 0.9 < cosine["int4 (g128, hqq)"] < 1.0
    assert cosine["W8A8 int8 static"] > 0.95


def test_kernels(tmp_path):
    out = tmp_path / "kernels-cpu.json"
    run_script("kernels.py", "--quick", "--device", "cpu", "--repeats", "2", "--output", out)
    report = read(out)
    assert report["benchmark"] == "kernels" and report["command"].startswith("python bench/kernels.py --quick")
    out.with_suffix(".png").unlink()
    run_script("plot.py", out)  # redraws the chart from the JSON alone
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
