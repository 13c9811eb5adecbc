"""Each benchmark script runs end to end in its quick mode (CPU, tiny sizes) and writes its JSON and its chart, so
the scripts cannot rot. Timings are never asserted; sizes and accuracies, which do not depend on load, are."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType

import pytest
import torch

from quanto_backend.ops import cpu

BENCH = Path(__file__).resolve().parent.parent / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name: str) -> ModuleType:
    """Import ``bench/<name>`` as a module (the scripts import bench/plot.py as ``plot``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_no_script_shadows_an_installed_module():
    """A script runs with bench/ first on sys.path, so a script named like an installed module replaces it for every
    library the script imports: bench/kernels.py did, for the Hugging Face ``kernels`` package that transformers
    (5.25 and up) imports at start-up."""
    here = {str(BENCH), str(BENCH.parent), str(BENCH.parent / "tests"), ""}
    elsewhere = [p for p in sys.path if p not in here]
    stems = sorted(p.stem for p in BENCH.glob("*.py"))
    shadowing = [n for n in stems if n in sys.stdlib_module_names or PathFinder.find_spec(n, elsewhere) is not None]
    assert not shadowing, f"bench scripts named like installed modules: {shadowing}"


def run_script(script: str | ModuleType, *args: str | Path) -> None:
    """Run a bench script's ``main`` in this process (importing quanto_backend again in a subprocess would cost
    more than the quick run itself); models.py still starts one process per configuration, as it always does."""
    module = load_script(script) if isinstance(script, str) else script
    threads = torch.get_num_threads()
    try:
        assert module.main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)


def read(path: Path) -> dict:
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    return json.loads(path.read_text())


def test_cpu_linear(tmp_path):
    run_script("cpu_linear.py", "--quick", "--no-optional", "--output-dir", tmp_path)
    report = read(tmp_path / f"cpu_linear-{cpu.cpu_kind().lower()}.json")
    configs = {r["config"] for r in report["rows"]}
    assert {"float32 F.linear", "int8 QLinear (fp32 act)", "int4 QLinear (bf16 act)"} <= configs
    assert {r["m"] for r in report["rows"]} == {1, 4}
    assert all(r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["median_ms"] > 0 for r in report["rows"])
    assert report["machine"]["cores"] >= 1 and report["threads"] == 2
    same = {r["config"]: r["speedup_vs_same_dtype"] for r in report["rows"] if r["m"] == 1}
    assert same["float16 F.linear"] == same["bfloat16 F.linear"] == same["float32 F.linear"] == 1.0
    assert "int8 QLinear (fp16 act)" in same


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


def test_kernel_speed(tmp_path, monkeypatch):
    bench = load_script("kernel_speed.py")
    monkeypatch.setattr(bench, "QUICK_CPU_SHAPES", ((128, 96),))
    monkeypatch.setattr(bench, "QUICK_CPU_M_VALUES", (1, 3))
    out = tmp_path / "kernel_speed-cpu.json"
    run_script(bench, "--device", "cpu", "--quick", "--repeats", "2", "--output", out)
    report = read(out)
    assert report["benchmark"] == "kernel_speed"
    assert report["command"].startswith("python bench/kernel_speed.py --device cpu")
    assert report["device"] == "cpu" and report["quick"] is True
    cases = {(r["qtype"], r["mode"]) for r in report["linear"]}
    assert cases == set(bench.CASES)
    assert len(report["linear"]) == len(bench.CASES) * 2
    for row in report["linear"]:
        assert row["in_features"] == 128 and row["out_features"] == 96 and row["m"] in (1, 3)
        assert row["time_ms"] > 0 and row["bytes"] > 128 * 96 // 4
        for name in ("float32", "bfloat16"):
            assert row[f"speedup_vs_{name}"] == pytest.approx(row[f"{name}_linear_ms"] / row["time_ms"])
    assert {r["qtype"] for r in report["quantize"]} == {"int8", "int4", "int2", "float8"}
    assert all(r["gbps"] > 0 for r in report["quantize"])
    out.with_suffix(".png").unlink()
    run_script("plot.py", out)  # redraws the chart from the JSON alone
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_kernel_speed_peak_bandwidth_override():
    bench = load_script("kernel_speed.py")
    assert bench.peak_bandwidth_gbps(torch.device("cpu"), 100.0) == 100.0
    assert bench.peak_bandwidth_gbps(torch.device("cpu"), None) is None
    assert bench.device_label(torch.device("cpu")) == "cpu"


def test_cpu_contracts(tmp_path):
    # In its own process: the probe forks one child per case, which needs a parent that has run no parallel region.
    script = BENCH / "cpu_contracts.py"
    subprocess.run([sys.executable, str(script), "--quick", "--output-dir", str(tmp_path)], check=True, timeout=300)
    report = json.loads((tmp_path / f"cpu_contracts-{cpu.cpu_kind().lower()}.json").read_text())
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["cpu_kind"] == cpu.cpu_kind()
    results = {(r["op"], r["result"]) for r in report["cases"]}
    assert {op for op, _ in results} == {"int8pack", "int4pack", "int_mm", "int_mm_weight_first"}
    assert {result for _, result in results} <= {"ok", "wrong", "error", "crash"}
    # Inside the contract of ops/cpu.py, every probed case is correct on this machine.
    inside = [
        r for r in report["cases"]
        if r["op"] == "int8pack" and r["dtype"] == "bfloat16" and r["k"] % 16 == 0 and not r["x_offset"] + r["w_offset"]
    ]  # fmt: skip
    assert inside and all(r["result"] == "ok" for r in inside)


def test_cpu_dispatch(tmp_path):
    run_script("cpu_dispatch.py", "--quick", "--output-dir", tmp_path)
    report = read(tmp_path / f"cpu_dispatch-{cpu.cpu_kind().lower()}.json")
    assert report["machine"]["cpu_kind"] == cpu.cpu_kind()
    kinds = {(r["weights"], r["dtype"]) for r in report["results"]}
    assert kinds == {("int8", "float32"), ("int8", "bfloat16"), ("int4", "float32"), ("int4", "bfloat16"),
                     ("w8a8", "float32")}  # fmt: skip
    for r in report["results"]:
        assert [t["rows"] for t in r["timings"]] == [1, 32, 256]
        assert all(t["kernel_ms"] > 0 and t["other_ms"] > 0 and t["dequantized_ms"] > 0 for t in r["timings"])
        sliced = r["weights"] == "int8" and cpu.INT_MM.holds()  # int8 weights beyond the kernel: torch._int_mm
        assert all(("sliced_ms" in t) == sliced for t in r["timings"])
        int_mm_alone = r["weights"] == "w8a8" and not cpu.INT_MM.holds()  # timed where it is not trusted
        assert all(("int_mm_ms" in t) == int_mm_alone for t in r["timings"])


def test_kv_cache(tmp_path, monkeypatch):
    bench = load_script("kv_cache.py")
    monkeypatch.setattr(bench, "CONFIGS", (("int4", dict(nbits=4)), ("float8", dict(nbits=8, float8=True))))
    out = tmp_path / "kv.json"
    run_script(bench, "--quick", "--output", out)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "kv_cache" and report["machine"]["cpu_capability"]
    assert 0 < report["error"]["int4"] < 0.1 and set(report["error"]) == {"int4", "float8"}
    assert 0 < report["bytes"]["ratio_to_bf16"]["int4"] < 1  # sizes do not depend on load
    assert set(report["step_time"]["min_ms_per_step"]) == {"DynamicCache", "int4", "float8"}


def test_lora_merge(tmp_path):
    out = tmp_path / "lm.json"
    run_script("lora_merge.py", "--quick", "--formats", "int4", "--output", out)
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_capability"] and set(report["mean"]) == {"int4"}
    row = report["rows"]["int4"][0]
    assert 0 < row["delta_over_W"] and 0 < row["adapter_effect"]
    assert all(0 < row[k] < 1 for k in ("fresh", "grid", "best", "own_error"))


def test_qlora_memory(tmp_path):
    out = tmp_path / "q.json"
    run_script("qlora_memory.py", "--quick", "--configs", "bfloat16", "int4", "--output", out)
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["int4"]["base_storage_MiB"] < rows["bfloat16"]["base_storage_MiB"]
    assert rows["int4"]["trainable_params"] == rows["bfloat16"]["trainable_params"] > 0
    assert rows["bfloat16"]["peak_above_imports_vs_bfloat16"] == 1.0


def test_load(tmp_path):
    out = tmp_path / "load.json"
    run_script("load.py", "--quick", "--repeats", "1", "--no-import", "--configs", "float32", "int4", "--output", out)
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"float32", "int4"} and report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert abs(rows["float32"]["logits_cosine_vs_float32"] - 1) < 1e-9
    assert 0.5 < rows["int4"]["logits_cosine_vs_float32"] < 0.9999
    assert rows["int4"]["model_mb"] < rows["float32"]["model_mb"]
    assert all(r["load_s_median"] > 0 and r["float_layer_mb"] > 0 for r in rows.values())


def test_cpu_blocks(tmp_path):
    run_script("cpu_blocks.py", "--quick", "--output-dir", tmp_path)
    report = json.loads((tmp_path / f"cpu_blocks-{cpu.cpu_kind().lower()}.json").read_text())
    assert report["machine"]["cpu_kind"] == cpu.cpu_kind()
    assert report["block_bytes_in_use"] == cpu._BLOCK_BYTES.get(cpu.cpu_kind(), cpu.DEFAULT_BLOCK_BYTES)
    assert {(r["out_features"], r["rows"], r["dtype"]) for r in report["results"]} == {
        (out, rows, dtype) for out in (384, 1536) for rows in (16, 64) for dtype in ("float32", "bfloat16")
    }
    assert all(set(r["block_ms"]) == set(report["geomean_over_best"]) for r in report["results"])
    assert min(report["geomean_over_best"].values()) >= 1.0
