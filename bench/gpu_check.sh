#!/usr/bin/env bash
# The GPU check of quanto-backend in one command, for one H100/H200 and at most 8 minutes: the GPU tests
# (pytest -m cuda tests/cuda), bench/kernel_speed.py and bench/models.py, each under its own time limit, every log and
# result written under the folder given as the first argument (created; nothing else is written outside it but
# the compiled-kernel cache, which it keeps in that folder too).
#
#   bash bench/gpu_check.sh OUT_DIR              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --fetch-wheels       # on a machine with pip access: puts the missing wheels in .whl/
#
# The GPU image of this workplace (see the device notes) has torch 2.11, cupy-cuda13x, nvidia-cuda-nvrtc,
# transformers, accelerate, pytest and matplotlib, but no diffusers, which `import quanto_backend` needs. When it is
# missing, the wheels in .whl/ (carried with the working tree: name `.whl` in the device call's `carry`) are
# installed into a private folder on PYTHONPATH; quanto_backend itself is imported from the working tree.
# At most 8 files come back from a device call, so a caller archives the folder, e.g.
#   bash bench/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp gc; cp /tmp/gc/summary.txt $OUT/
#
# Per-step limits in seconds (QB_PYTEST_S, QB_KERNEL_SPEED_S, QB_MODELS_S; QB_SETUP_S for the wheel install), each cut
# to what is left of QB_TOTAL_S (470: 8 minutes less a margin) when its step starts. QB_DRY_RUN=1 prints each
# step's command instead of running it.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)  # pure-Python wheels; their other needs are on the image
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
        || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR   (or --fetch-wheels)" >&2
    exit 2
fi
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
TOTAL_S=${QB_TOTAL_S:-470}
SETUP_S=${QB_SETUP_S:-40}
PYTEST_S=${QB_PYTEST_S:-200}
KERNEL_SPEED_S=${QB_KERNEL_SPEED_S:-150}
MODELS_S=${QB_MODELS_S:-100}
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONUNBUFFERED=1
export QUANTO_BACKEND_CACHE="$OUT_DIR/kernel-cache"  # compiled once by the tests, reused by the benchmarks
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: >"$SUMMARY"

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output in OUT_DIR/NAME.log, its status and time
# in the summary. A step that fails or runs out of time does not stop the next one.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit <= 0)); then
        echo "$name: skipped, the ${TOTAL_S}s budget is spent: $*" | tee -a "$SUMMARY"
        return 0
    fi
    if [[ "${QB_DRY_RUN:-0}" == 1 ]]; then
        echo "$name (${limit}s): $*" | tee -a "$SUMMARY"
        return 0
    fi
    local start=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    local verdict=ok
    [[ $rc -ne 0 ]] && verdict="failed (exit $rc)"
    [[ $rc -eq 124 || $rc -eq 137 ]] && verdict="timed out after ${limit}s"
    echo "$name: $verdict in $((SECONDS - start))s: $*" | tee -a "$SUMMARY"
    return 0
}

# The environment report, and diffusers from the carried wheels when the image lacks it (each command timed out).
setup() {
    {
        date -u
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        timeout 60 "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("cupy-cuda13x", "nvidia-cuda-nvrtc", "transformers", "accelerate", "diffusers", "safetensors", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
    } >"$OUT_DIR/environment.txt" 2>&1
    if ! timeout 60 "$PYTHON" -c "import diffusers" 2>/dev/null; then
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "diffusers is missing and no wheels are in .whl/: run 'bash bench/gpu_check.sh --fetch-wheels'" \
                "where pip works, and carry .whl" >&2
            return 1
        fi
        timeout "$SETUP_S" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$OUT_DIR/site" .whl/*.whl || return 1
    fi
    timeout 60 "$PYTHON" -c "import quanto_backend, torch; print(quanto_backend.__file__, torch.cuda.is_available())"
}

export PYTHONPATH="$PYTHONPATH:$OUT_DIR/site"
if [[ "${QB_DRY_RUN:-0}" == 1 ]]; then
    echo "setup: environment.txt; diffusers from .whl/ into $OUT_DIR/site if missing" | tee -a "$SUMMARY"
else
    start=$SECONDS
    if setup >"$OUT_DIR/setup.log" 2>&1; then
        echo "setup: ok in $((SECONDS - start))s" | tee -a "$SUMMARY"
    else
        echo "setup: FAILED in $((SECONDS - start))s (see setup.log); the steps run anyway" | tee -a "$SUMMARY"
    fi
fi

step pytest "$PYTEST_S" "$PYTHON" -m pytest tests/cuda -m cuda -q --junitxml="$OUT_DIR/pytest.xml" -p no:cacheprovider
step kernel_speed "$KERNEL_SPEED_S" "$PYTHON" bench/kernel_speed.py --device cuda --output "$OUT_DIR/kernel_speed-cuda.json"
step models "$MODELS_S" "$PYTHON" bench/models.py --device cuda --no-optional --output-dir "$OUT_DIR"
echo "total: ${SECONDS}s; results and logs in $OUT_DIR" | tee -a "$SUMMARY"
