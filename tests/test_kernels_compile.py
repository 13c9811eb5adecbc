"""Every CUDA kernel compiles with NVRTC for sm_80, sm_89 and sm_90 (no GPU needed), through the loader's own
compile function and options, and the compiled-module cache round-trips through disk."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from quanto_backend.kernels import loader

ARCHS = (80, 89, 90)
JOBS = [(source, arch) for arch in ARCHS for source in loader.ENTRY_POINTS]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], loader.CompiledModule | Exception]:
    """Compiles all (source, arch) pairs at once: NVRTC releases the GIL, so two threads halve the wall time."""

    def build(job: tuple[str, int]) -> loader.CompiledModule | Exception:
        try:
            return loader.compile_source(*job)
        except Exception as e:  # reported by the test of that job
            return e

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(JOBS, pool.map(build, JOBS), strict=True))


@pytest.mark.parametrize(("source", "arch"), JOBS, ids=[f"{s}-sm{a}" for s, a in JOBS])
def test_source_compiles(compiled, source: str, arch: int) -> None:
    result = compiled[(source, arch)]
    if isinstance(result, Exception):
        raise result
    assert result.is_cubin, "NVRTC should know these architectures and emit SASS directly"
    assert result.image[:4] == b"\x7fELF"
    loader.check_cubin(result.image)  # whole: every header and section inside the image
    with pytest.raises(loader.KernelUnavailableError, match="truncated"):
        loader.check_cubin(result.image[:-1])
    assert set(result.lowered_names) == set(loader.ENTRY_POINTS[source])
    for entry_point, lowered in result.lowered_names.items():
        assert lowered.encode() in result.image, f"{entry_point} ({lowered}) missing from the {source} cubin"


def test_every_kernel_is_an_entry_point() -> None:
    sources = loader.read_sources()
    c_kernels = set(re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(', sources["quantize.cu"]))
    assert c_kernels == set(loader.ENTRY_POINTS["quantize.cu"])
    assert "qb_gemv(QB_MATMUL_PARAMS)" in sources["gemv.cu"]
    assert "qb_gemm(QB_MATMUL_PARAMS, Acc<AF>* __restrict__ partial, int split_k_tiles)" in sources["gemm.cu"]
    assert "qb_gemm_reduce(const Acc<AF>* __restrict__ partial, int splits," in sources["gemm.cu"]
    assert len(loader.ENTRY_POINTS["gemv.cu"]) == len(loader.MATMUL_FORMATS) == 15
    assert len(loader.ENTRY_POINTS["gemm.cu"]) == 2 * len(loader.MATMUL_FORMATS)  # each GEMM and its reduction


@pytest.mark.parametrize(("arch", "has_fp8_mma"), [(80, False), (89, True)])
def test_float8_mma_only_from_sm89(arch: int, has_fp8_mma: bool) -> None:
    ptx = loader.compile_source("gemv.cu", arch, ptx=True).image.decode()
    assert ("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in ptx) is has_fp8_mma
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx


def test_disk_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTO_BACKEND_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "_compiled", {})
    first = loader.load_compiled("quantize.cu", 80)
    files = list(tmp_path.glob("quantize-sm80-*.bin"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(loader, "_compiled", {})

    def no_compile(*args, **kwargs):
        raise AssertionError("the disk cache should have been used")

    monkeypatch.setattr(loader, "compile_source", no_compile)
    second = loader.load_compiled("quantize.cu", 80)
    assert second == first

    files[0].write_bytes(b"garbage")  # a corrupt entry is recompiled, not trusted
    monkeypatch.setattr(loader, "_compiled", {})
    monkeypatch.undo()
    monkeypatch.setenv("QUANTO_BACKEND_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "_compiled", {})
    assert loader.load_compiled("quantize.cu", 80) == first


def _cuobjdump() -> str:
    """cuobjdump from PATH or from the pip package nvidia-cuda-cuobjdump (the `test` extra)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")  # the namespace package the NVIDIA wheels install into
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    found = shutil.which("cuobjdump") or next((str(p) for r in roots for p in r.glob("*/bin/cuobjdump")), None)
    assert found, "cuobjdump not found: install the test extra (nvidia-cuda-cuobjdump)"
    return found


def test_cuobjdump_reads_the_cubin(compiled, tmp_path) -> None:
    """The cubin the driver gets is the one NVRTC made: CuPy's getCUBIN is a byte short, and cuobjdump then finds
    no device code in it."""
    module = compiled[("quantize.cu", 90)]
    path = tmp_path / "quantize.cubin"
    path.write_bytes(module.image)
    run = subprocess.run([_cuobjdump(), "-elf", str(path)], capture_output=True, text=True, timeout=60)
    listing = run.stdout + run.stderr
    assert "sm=90" in listing, listing[:2000]
    assert "does not contain device code" not in listing
    for lowered in module.lowered_names.values():
        assert f".text.{lowered}" in listing


def test_truncated_cache_entry_is_recompiled(tmp_path, monkeypatch) -> None:
    """An entry whose cubin is cut short (as the version that stored getCUBIN's image wrote them) is not trusted."""
    monkeypatch.setenv("QUANTO_BACKEND_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "_compiled", {})
    good = loader.load_compiled("quantize.cu", 80)
    (path,) = tmp_path.glob("quantize-sm80-*.bin")
    loader._write_cache(path, loader.CompiledModule(good.image[:-1], True, good.lowered_names))
    monkeypatch.setattr(loader, "_compiled", {})
    assert loader._read_cache(path) is None
    assert loader.load_compiled("quantize.cu", 80) == good
    assert loader._read_cache(path) == good
