"""The real ``cuda_kernels/`` sources, built as C++ with the SIMT shim of this folder (simt.h) and run on the CPU.

The shim binary is built once per source hash with g++, AddressSanitizer and UndefinedBehaviorSanitizer, cached in
the temp dir, and started as one server process; :class:`SimtDevice` sends it kernel launches (entry point, grid,
block, arguments) and reads the buffers back. The ``cuda_ops`` fixture is a private copy of
``quanto_backend/ops/cuda.py`` whose launches go to it, so the tests drive the real host code (dispatch, grids,
argument lists) on CPU tensors, and a fallback to the reference fails the test instead of hiding a kernel.

What a CPU-only torch lacks is stood in for as tests/test_kernel_fallback.py does for the host tests: no CUDA-graph
capture, every module "loaded" (the shim serves them all), float8 tensor cores present. The first use of the
kernels, ``_warmup`` with each family's self-test (ops/cuda_self_test.py), runs once per session through the shim
(``first_use``); each test's copy starts with the health that recorded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

import quanto_backend.kernels
import quanto_backend.ops.cuda
from quanto_backend.kernels import ENTRY_POINTS, Int64
from quanto_backend.ops import reference

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "cuda_kernels"
UNITS = ("simt.cpp", "main.cpp", "kernels_quantize.cpp", "kernels_gemv.cpp", "kernels_gemm.cpp")
# The module (the package's `launch` attribute is the function of the same name).
launch_module = sys.modules["quanto_backend.kernels.launch"]
SANITIZERS = "-fsanitize=address,undefined,float-cast-overflow"
# -O1 keeps ASan fast enough; -ffp-contract=off: no fused multiply-add the GPU build would not also have written.
FLAGS = ("-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", SANITIZERS,
         "-fno-sanitize-recover=all", f"-I{KERNELS}", f"-I{HERE}")  # fmt: skip
SMS = 132  # an H100's SMs: a GEMM of fewer output tiles splits along K
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("tests/kernels_cpu needs g++ (Debian: apt-get install g++, which brings libasan/libubsan)")
    return cxx


def build_shim() -> Path:
    """Compiles the shim and the kernels into one executable, or returns the cached one of the same inputs."""
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join((cxx, version, *FLAGS)).encode())
    for path in sorted([*HERE.glob("*.cpp"), *HERE.glob("*.h"), *KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / "quanto_backend_kernels_cpu" / digest.hexdigest()[:20]
    binary = out_dir / "simt_kernels"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))

    def compile_unit(unit: str) -> Path:
        obj = work / (unit + ".o")
        done = subprocess.run([cxx, *FLAGS, "-c", str(HERE / unit), "-o", str(obj)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ failed on tests/kernels_cpu/{unit}:\n{done.stderr[-6000:]}")
        return obj

    # The GEMM unit takes longest: start it first, on one of the two workers.
    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_unit, sorted(UNITS, key=lambda u: u != "kernels_gemm.cpp")))
    linked = work / "simt_kernels"
    subprocess.run([cxx, SANITIZERS, *map(str, objects), "-o", str(linked)], check=True, capture_output=True)
    os.replace(linked, binary)  # atomic: a concurrent session sees no partial binary
    shutil.rmtree(work, ignore_errors=True)
    return binary


class KernelFailure(AssertionError):
    """A kernel run stopped: a sanitizer report, a misaligned access, a divergent warp, a signature mismatch."""


class SimtDevice:
    """One shim server process, restarted after a failure; launches are sequential."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.work = Path(tempfile.mkdtemp(prefix="qb-simt-"))
        self.proc: subprocess.Popen | None = None
        self.launches: list[str] = []
        self._seed = 0

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.stderr = open(self.work / "stderr.txt", "w+")  # noqa: SIM115 (kept for the process' lifetime)
            self.proc = subprocess.Popen(
                [str(self.binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                env={**os.environ, **SANITIZER_ENV},
            )  # fmt: skip
        return self.proc

    def _ask(self, command: str) -> str:
        proc = self._start()
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        if answer.startswith("error ") or not answer:
            proc.wait()
            self.stderr.seek(0)
            report = self.stderr.read()[-8000:]
            self.proc = None
            raise KernelFailure(f"{command}: {answer.strip() or 'the shim process died'}\n{report}")
        return answer.strip()

    def entry_points(self) -> dict[str, str]:
        """Entry name -> parameter kinds, as the binary registered them."""
        proc = self._start()
        proc.stdin.write("list\n")
        proc.stdin.flush()
        entries = {}
        while (line := proc.stdout.readline().rstrip("\n")) != "end":
            if not line:
                raise KernelFailure("the shim process died while listing its entry points")
            name, signature = line.split("\t")
            entries[name] = signature
        return entries

    def launch(self, entry_point: str, grid, block, args, shared_mem: int = 0) -> None:
        """Runs a kernel on CPU tensors as ``quanto_backend.kernels.launch`` would on GPU ones: tensors are passed
        by address (each copied into a heap block that ends where the tensor ends), and written back afterwards."""
        gx, gy, gz = (*grid, 1, 1)[:3]
        bx, by, bz = (*block, 1, 1)[:3]
        self.launches.append(entry_point)
        if gx == 0 or gy == 0 or gz == 0:
            return
        self._seed += 1
        lines = [entry_point, f"grid {gx} {gy} {gz}", f"block {bx} {by} {bz}", f"shared {shared_mem}",
                 f"seed {self._seed}", f"args {len(args)}"]  # fmt: skip
        tensors: list[torch.Tensor] = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                assert arg.device.type == "cpu" and arg.is_contiguous(), "kernels take contiguous tensors"
                lines.append(f"b {arg.numel() * arg.element_size()} {arg.data_ptr() % 64}")
                tensors.append(arg)
            elif arg is None:
                lines.append("0")
            elif isinstance(arg, Int64):
                lines.append(f"l {int(arg)}")
            elif isinstance(arg, bool | int):
                lines.append(f"i {int(arg)}")
            elif isinstance(arg, float):
                lines.append(f"f {struct.unpack('<I', struct.pack('<f', arg))[0]:x}")
            else:
                raise TypeError(f"unsupported kernel argument {arg!r}")
        (self.work / "launch.txt").write_text("\n".join(lines) + "\n")
        with open(self.work / "in.bin", "wb") as f:
            for t in tensors:
                f.write(_bytes_of(t).numpy().tobytes())
        self._ask(f"run {self.work}")
        data = (self.work / "out.bin").read_bytes()
        pos = 0
        for t in tensors:
            view = _bytes_of(t)
            n = view.numel()
            view.copy_(torch.frombuffer(bytearray(data[pos : pos + n]), dtype=torch.uint8))
            pos += n
        assert pos == len(data)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a uint8 view sharing its memory."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


@pytest.fixture(scope="session")
def simt_device():
    device = SimtDevice(build_shim())
    yield device
    device.close()


def _unregistered_cuda_ops() -> types.ModuleType:
    """A fresh copy of quanto_backend/ops/cuda.py whose CUDA implementations stay plain functions: they are
    registered with torch.library for CUDA tensors only, and these tests call them with CPU tensors."""
    spec = importlib.util.find_spec("quanto_backend.ops.cuda")
    module = importlib.util.module_from_spec(spec)  # not put in sys.modules: the real module stays registered

    def register_kernel(op, device_types, func=None, **kwargs):
        return (lambda fn: fn) if func is None else func

    with mock.patch.object(torch.library, "register_kernel", register_kernel):
        spec.loader.exec_module(module)
    return module


def _run_on_the_shim(patch: pytest.MonkeyPatch, simt_device: SimtDevice) -> None:
    """Sends ``quanto_backend.kernels.launch`` to the shim, and stands in for what a CPU-only torch lacks."""

    def launch(source, entry_point, grid, block, args, device, shared_mem=0):
        launch_module.pack_args(args)  # the real launcher accepts these arguments (types, 32-bit ints)
        simt_device.launch(entry_point, grid, block, args, shared_mem)

    def load_modules(device):
        served = set(simt_device.entry_points())
        return {s: None if set(e) <= served else f"the shim lacks {sorted(set(e) - served)}"
                for s, e in ENTRY_POINTS.items()}  # fmt: skip

    patch.setattr(quanto_backend.kernels, "launch", launch)
    patch.setattr(quanto_backend.kernels, "load_modules", load_modules)
    patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    # The self-tests call the kernels of the registered module: float8 pairs included, as on sm_89+.
    patch.setattr(quanto_backend.ops.cuda, "_fp8_tensor_cores", lambda device: True)
    patch.setattr(quanto_backend.ops.cuda, "_multiprocessors", lambda device: SMS)


def _on_the_shim(module: types.ModuleType) -> types.ModuleType:
    """The private copy's checks of the device: every tensor on one device (the CPU here) can run the kernels."""
    module._kernels_ready = lambda *tensors: len({t.device for t in tensors if t is not None}) == 1
    module._fp8_tensor_cores = lambda device: True
    module._multiprocessors = lambda device: SMS
    return module


@dataclass
class FirstUse:
    health: dict
    warnings: list[str]
    launches: list[str]


@pytest.fixture(scope="session")
def first_use(simt_device) -> FirstUse:
    """ops/cuda.py's first use of the kernels on a device (``_warmup``: every module loaded, then each family's
    self-test against the reference), with the self-tests' launches running on the shim."""
    module = _on_the_shim(_unregistered_cuda_ops())
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _run_on_the_shim(patch, simt_device)
        simt_device.launches = []
        module._warmup(torch.device("cpu"))
    return FirstUse(dict(module._health), [str(w.message) for w in record], simt_device.launches)


@pytest.fixture
def cuda_ops(simt_device, first_use, monkeypatch):
    """ops/cuda.py with its launches going to the shim and its tensors on the CPU, its kernel families in the state
    their first use left them. ``simt_device.launches`` lists the entry points the test launched. A fallback to the
    reference fails the test."""
    module = _on_the_shim(_unregistered_cuda_ops())
    _run_on_the_shim(monkeypatch, simt_device)

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"ops/cuda.py fell back to reference.{name}")

        return fail

    names = [n for n in dir(reference) if not n.startswith("_") and callable(getattr(reference, n))]
    module.reference = types.SimpleNamespace(**{n: refuse(n) for n in names})
    module._health = dict(first_use.health)
    simt_device.launches = []
    return module
