"""bench/gpu_check.sh, the one-call GPU check, is valid bash, runs every step it names with options the scripts
have, keeps each step inside its limit and the 8-minute budget, and writes everything under its argument.

Run on CPU with a stand-in for ``python3`` (PYTHON=...) that records its arguments, so the script's own logic
(logs, summary, timeouts, budget) runs for real."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *(args or (str(out),))], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )  # fmt: skip


def test_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_steps_reference_existing_files_and_options(tmp_path):
    run = _run(tmp_path, {"QB_DRY_RUN": "1"})
    assert run.returncode == 0, run.stderr
    steps = dict(re.findall(r"^(\w+) \(\d+s\): (.*)$", run.stdout, flags=re.MULTILINE))
    assert set(steps) == {"pytest", "kernel_speed", "models"}
    pytest_args = shlex.split(steps["pytest"])
    assert pytest_args[1:4] == ["-m", "pytest", "tests/cuda"] and (ROOT / "tests" / "cuda").is_dir()
    assert pytest_args[pytest_args.index("-m", 2) + 1] == "cuda"
    assert 'markers = ["cuda:' in (ROOT / "pyproject.toml").read_text()
    for name in ("kernel_speed", "models"):
        args = shlex.split(steps[name])
        script = ROOT / args[1]
        assert args[1] == f"bench/{name}.py" and script.is_file()
        source = script.read_text()
        for option in (a for a in args[2:] if a.startswith("--")):
            assert f'"{option}"' in source, f"{args[1]} has no option {option}"
        assert args[args.index("--device") + 1] in re.search(r'"--device", choices=\(([^)]*)\)', source).group(1)
        assert all(str(tmp_path) in a for a in args if a.startswith(str(tmp_path)[:4]))
    assert (tmp_path / "summary.txt").is_file()


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """A python3 stand-in: prints its arguments, sleeps QB_FAKE_SLEEP seconds when the command is bench/models.py,
    and fails for bench/kernel_speed.py."""
    path = tmp_path / "python3"
    path.write_text(
        "#!/usr/bin/env bash\n"
        'echo "fake python: $*"\n'
        'if [[ "${1:-}" == bench/models.py ]]; then sleep "${QB_FAKE_SLEEP:-0}"; fi\n'
        'if [[ "${1:-}" == bench/kernel_speed.py ]]; then exit 3; fi\n'
        "exit 0\n"
    )
    path.chmod(0o755)
    return path


def test_runs_each_step_under_its_limit_and_writes_under_the_folder(tmp_path, fake_python):
    out = tmp_path / "results"
    run = _run(out, {"PYTHON": str(fake_python), "QB_MODELS_S": "1", "QB_FAKE_SLEEP": "30"})
    assert run.returncode == 0, run.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^setup: ok", summary, flags=re.MULTILINE)
    assert re.search(r"^pytest: ok in \d+s: .* -m pytest tests/cuda -m cuda", summary, flags=re.MULTILINE)
    assert re.search(r"^kernel_speed: failed \(exit 3\)", summary, flags=re.MULTILINE)
    assert re.search(r"^models: timed out after 1s", summary, flags=re.MULTILINE)
    assert "fake python: -m pytest tests/cuda" in (out / "pytest.log").read_text()
    assert f"--output {out}/kernel_speed-cuda.json" in (out / "kernel_speed.log").read_text()
    assert (out / "environment.txt").is_file() and (out / "models.log").is_file()


def test_budget_skips_steps_that_no_longer_fit(tmp_path, fake_python):
    run = _run(tmp_path / "r", {"PYTHON": str(fake_python), "QB_TOTAL_S": "0"})
    summary = (tmp_path / "r" / "summary.txt").read_text()
    assert run.returncode == 0
    assert summary.count("skipped, the 0s budget is spent") == 3


def test_usage_error(tmp_path):
    run = _run(tmp_path, {}, "--bogus")
    assert run.returncode == 2 and "usage" in run.stderr


def test_default_limits_fit_eight_minutes():
    text = SCRIPT.read_text()
    limit = {k: int(v) for k, v in re.findall(r"^(\w+_S)=\$\{QB_\w+:-(\d+)\}", text, flags=re.MULTILINE)}
    assert limit["PYTEST_S"] + limit["KERNEL_SPEED_S"] + limit["MODELS_S"] <= limit["TOTAL_S"] <= 8 * 60
