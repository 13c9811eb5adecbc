"""Finds, compiles and caches the CUDA sources of ``cuda_kernels/``.

Sources are compiled with NVRTC (through the ``cupy_backends`` bindings that CuPy ships) for one GPU architecture
at a time, straight to a cubin when NVRTC knows the architecture (PTX for a newer one, which the driver then
compiles). A compiled module is cached in memory and on disk, keyed by a hash of the source, the headers it can
include, the architecture, the options and the NVRTC version; the disk cache lives in ``$QUANTO_BACKEND_CACHE``
or ``~/.cache/quanto_backend`` and is written through a temporary file and :func:`os.replace`, so concurrent
processes never read a partial file.

:func:`compile_source` needs no GPU (CI compiles every kernel with it); :func:`get_function` loads a module into
a device's context and needs one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import importlib.resources
import json
import os
import re
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import driver as _driver

__all__ = [
    "COMPILE_OPTIONS",
    "DTYPE_CODES",
    "ENTRY_POINTS",
    "CompiledModule",
    "KernelUnavailableError",
    "KernelsNotLoadedError",
    "MATMUL_FORMATS",
    "U2_CODE",
    "U4_CODE",
    "cache_dir",
    "check_cubin",
    "compile_source",
    "device_arch",
    "device_context",
    "device_index",
    "get_function",
    "in_device_context",
    "kernels_unavailable_reason",
    "load_compiled",
    "load_modules",
    "matmul_entry_point",
    "read_sources",
]

# No CUDA header is included by the sources (see cuda_kernels/common.cuh), so no include path is needed.
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)
# QBK1 entries were written by a version that stored CuPy's getCUBIN, one byte short of the real cubin; the new
# tag changes every cache key (so those files are never looked up again) and their header (so one found under a
# new name is rejected).
_CACHE_FORMAT = b"QBK2"

# The DType enum of cuda_kernels/common.cuh.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.uint8: 4,
    torch.float8_e4m3fn: 5,
    torch.float8_e5m2: 6,
}
U4_CODE, U2_CODE = 7, 8

_F16, _BF16, _I8, _E4M3, _E5M2 = 1, 2, 3, 5, 6
# (activation format, weight format) pairs of the GEMV and GEMM templates: 16-bit activations with every weight
# format (weight-only), and quantized activations with the 8-bit weight of the same family.
MATMUL_FORMATS: tuple[tuple[int, int], ...] = (
    *((a, w) for a in (_F16, _BF16) for w in (_I8, _E4M3, _E5M2, U4_CODE, U2_CODE)),
    (_I8, _I8),
    *((a, w) for a in (_E4M3, _E5M2) for w in (_E4M3, _E5M2)),
)

# Every entry point, by source file: the names (C names or template instantiations) NVRTC is asked to compile.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "quantize.cu": (
        "qb_quantize_symmetric",
        "qb_dequantize_symmetric",
        "qb_quantize_per_token",
        "qb_quantize_affine",
        "qb_dequantize_affine",
        "qb_pack",
        "qb_unpack",
    ),
    "gemv.cu": tuple(f"qb_gemv<{a}, {w}>" for a, w in MATMUL_FORMATS),
    "gemm.cu": tuple(f"qb_{kernel}<{a}, {w}>" for a, w in MATMUL_FORMATS for kernel in ("gemm", "gemm_reduce")),
}


def matmul_entry_point(kind: str, act_format: int, weight_format: int) -> tuple[str, str]:
    """(source, entry point) of the ``kind`` ("gemv" or "gemm") kernel for these formats (``DTYPE_CODES``)."""
    if (act_format, weight_format) not in MATMUL_FORMATS:
        raise ValueError(f"no {kind} kernel for activation format {act_format} and weight format {weight_format}")
    return f"{kind}.cu", f"qb_{kind}<{act_format}, {weight_format}>"


class KernelUnavailableError(RuntimeError):
    """The CUDA kernels cannot be compiled or launched here; the message names what is missing."""


@dataclass(frozen=True)
class CompiledModule:
    """One compiled source: a cubin (or PTX) image and the mangled name of each entry point."""

    image: bytes
    is_cubin: bool
    lowered_names: dict[str, str]


@functools.lru_cache(maxsize=1)
def read_sources() -> dict[str, str]:
    """The text of every ``*.cu``/``*.cuh`` file: from the installed data package ``quanto_backend.cuda_kernels``,
    else from the repository's top-level ``cuda_kernels/``."""
    files: dict[str, str] = {}
    try:
        root = importlib.resources.files("quanto_backend.cuda_kernels")
        files = {p.name: p.read_text() for p in root.iterdir() if p.name.endswith((".cu", ".cuh"))}
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    if not files:
        repo_dir = Path(__file__).resolve().parents[2] / "cuda_kernels"
        if repo_dir.is_dir():
            files = {p.name: p.read_text() for p in sorted(repo_dir.iterdir()) if p.suffix in (".cu", ".cuh")}
    missing = sorted(set(ENTRY_POINTS) - set(files))
    if missing:
        raise KernelUnavailableError(
            f"CUDA sources {missing} not found in the package quanto_backend.cuda_kernels nor in the repository's "
            "cuda_kernels/; reinstall quanto-backend"
        )
    return files


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:
        raise KernelUnavailableError(
            "CuPy is not installed: the CUDA kernels need `pip install 'quanto-backend[cuda]'` "
            f"(cupy-cuda13x and nvidia-cuda-nvrtc) ({e})"
        ) from e
    try:
        nvrtc.getVersion()
    except Exception as e:  # the binding raises RuntimeError/OSError subclasses depending on the CuPy version
        raise KernelUnavailableError(
            f"NVRTC (libnvrtc) could not be loaded: install nvidia-cuda-nvrtc matching cupy-cuda13x ({e})"
        ) from e
    return nvrtc


def _target(nvrtc, arch: int) -> tuple[str, bool]:
    """The -arch option for ``arch`` and whether it produces a cubin."""
    supported = sorted(int(a) for a in nvrtc.getSupportedArchs())
    if arch in supported:
        return f"-arch=sm_{arch}", True
    older = [a for a in supported if a <= arch]
    if not older:
        raise KernelUnavailableError(
            f"NVRTC {nvrtc.getVersion()} cannot compile for sm_{arch}; it supports {supported}"
        )
    # A GPU newer than this NVRTC: PTX for the newest known architecture, which the driver compiles.
    return f"-arch=compute_{older[-1]}", False


def _headers(sources: dict[str, str]) -> dict[str, str]:
    return {name: text for name, text in sorted(sources.items()) if name.endswith(".cuh")}


def compile_source(
    name: str, arch: int, options: tuple[str, ...] = COMPILE_OPTIONS, ptx: bool = False
) -> CompiledModule:
    """Compiles ``cuda_kernels/<name>`` and all its entry points for compute capability ``arch`` (e.g. 90).

    Needs NVRTC, not a GPU. ``ptx=True`` stops at PTX (to inspect the generated code). Raises
    :class:`KernelUnavailableError` with NVRTC's log if compilation fails.
    """
    nvrtc = _nvrtc()
    sources = read_sources()
    headers = _headers(sources)
    arch_option, is_cubin = (f"-arch=compute_{arch}", False) if ptx else _target(nvrtc, arch)
    program = nvrtc.createProgram(
        sources[name], name, [h.encode() for h in headers.values()], [n.encode() for n in headers]
    )
    try:
        for expr in ENTRY_POINTS[name]:
            nvrtc.addNameExpression(program, expr)
        try:
            nvrtc.compileProgram(program, [*options, arch_option])
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(program)
            raise KernelUnavailableError(f"NVRTC failed to compile {name} for sm_{arch}:\n{log}") from e
        lowered = {expr: nvrtc.getLoweredName(program, expr) for expr in ENTRY_POINTS[name]}
        image = _cubin(program) if is_cubin else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    if is_cubin:
        check_cubin(image, name)
    elif not image.endswith(b"\0"):
        image += b"\0"  # cuModuleLoadData reads PTX as a C string
    return CompiledModule(image, is_cubin, lowered)


@functools.lru_cache(maxsize=1)
def _libnvrtc() -> ctypes.CDLL:
    """The libnvrtc that CuPy's binding loaded (the program handles it creates belong to that library)."""
    try:
        with open("/proc/self/maps") as f:
            paths = re.findall(r"\S*/libnvrtc\.so[.\d]*$", f.read(), flags=re.MULTILINE)
    except OSError:
        paths = []
    name = paths[0] if paths else ctypes.util.find_library("nvrtc")
    if name is None:
        raise KernelUnavailableError("libnvrtc is loaded by CuPy but could not be found by name")
    return ctypes.CDLL(name)


def _cubin(program: int) -> bytes:
    """The whole cubin of a compiled program, ``nvrtcGetCUBINSize`` bytes long.

    CuPy's ``getCUBIN`` drops the last byte (it strips a C string's terminator, which a cubin does not have), and
    the driver and cuobjdump reject the truncated ELF, so the two NVRTC calls are made here.
    """
    lib = _libnvrtc()
    size = ctypes.c_size_t()
    status = lib.nvrtcGetCUBINSize(ctypes.c_void_p(program), ctypes.byref(size))
    if status != 0:
        raise KernelUnavailableError(f"nvrtcGetCUBINSize failed with NVRTC status {status}")
    buffer = ctypes.create_string_buffer(size.value)
    status = lib.nvrtcGetCUBIN(ctypes.c_void_p(program), buffer)
    if status != 0:
        raise KernelUnavailableError(f"nvrtcGetCUBIN failed with NVRTC status {status}")
    return buffer.raw


def check_cubin(image: bytes, name: str = "cubin") -> None:
    """Raises :class:`KernelUnavailableError` unless ``image`` is a whole 64-bit ELF: its header, program headers,
    section headers and section contents all lie inside it (a truncated cubin fails here, not in the driver)."""
    try:
        if image[:5] != b"\x7fELF\x02":
            raise ValueError("no 64-bit ELF magic")
        phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
        end = max(0x40, phoff + phentsize * phnum, shoff + shentsize * shnum)
        for i in range(shnum):
            kind, _, _, offset, size = struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize)[1:6]
            if kind != 8:  # SHT_NOBITS occupies no bytes of the file
                end = max(end, offset + size)
    except (ValueError, struct.error) as e:
        raise KernelUnavailableError(f"{name}: the compiled cubin is not a valid ELF image ({e})") from e
    if end > len(image):
        raise KernelUnavailableError(
            f"{name}: the compiled cubin is truncated ({len(image)} bytes, its ELF needs {end})"
        )


def cache_dir() -> Path:
    """Where compiled modules are kept: ``$QUANTO_BACKEND_CACHE``, else ``~/.cache/quanto_backend``."""
    return Path(os.environ.get("QUANTO_BACKEND_CACHE") or Path.home() / ".cache" / "quanto_backend")


def _cache_key(name: str, arch: int, options: tuple[str, ...]) -> str:
    nvrtc = _nvrtc()
    digest = hashlib.sha256(_CACHE_FORMAT)
    sources = read_sources()
    parts = [name, sources[name], str(arch), "\0".join(options), repr(nvrtc.getVersion()), *ENTRY_POINTS[name]]
    for header, text in _headers(sources).items():
        parts += [header, text]
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _read_cache(path: Path) -> CompiledModule | None:
    try:
        data = path.read_bytes()
        if data[:4] != _CACHE_FORMAT:
            return None
        (meta_len,) = struct.unpack("<I", data[4:8])
        meta = json.loads(data[8 : 8 + meta_len])
        module = CompiledModule(data[8 + meta_len :], bool(meta["is_cubin"]), dict(meta["lowered_names"]))
        if module.is_cubin:
            check_cubin(module.image, path.name)
        return module
    except (OSError, ValueError, KeyError, struct.error, KernelUnavailableError):
        return None


def _write_cache(path: Path, module: CompiledModule) -> None:
    meta = json.dumps({"is_cubin": module.is_cubin, "lowered_names": module.lowered_names}).encode()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_CACHE_FORMAT + struct.pack("<I", len(meta)) + meta + module.image)
        os.replace(tmp, path)
    except OSError:
        # A read-only or full disk only costs a recompilation in the next process.
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_lock = threading.RLock()
_compiled: dict[tuple[str, int], CompiledModule] = {}
_functions: dict[tuple[str, str, int], int] = {}
_loaded: dict[tuple[str, int], tuple[int, CompiledModule]] = {}
_failed: dict[tuple[str, int], KernelUnavailableError] = {}


def load_compiled(name: str, arch: int) -> CompiledModule:
    """``compile_source`` through the in-memory and on-disk caches."""
    key = (name, arch)
    module = _compiled.get(key)
    if module is None:
        path = cache_dir() / f"{Path(name).stem}-sm{arch}-{_cache_key(name, arch, COMPILE_OPTIONS)}.bin"
        module = _read_cache(path)
        if module is None or set(module.lowered_names) != set(ENTRY_POINTS[name]):
            module = compile_source(name, arch)
            _write_cache(path, module)
        _compiled[key] = module
    return module


def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number: (9, 0) -> 90."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.lru_cache(maxsize=1)
def kernels_unavailable_reason() -> str | None:
    """Why the kernels cannot run in this process (None when they can): kernels disabled by
    ``QUANTO_BACKEND_DISABLE_KERNELS=1``, CuPy or NVRTC missing, or no CUDA GPU. Checked once per process."""
    if os.environ.get("QUANTO_BACKEND_DISABLE_KERNELS", "") not in ("", "0"):
        return "QUANTO_BACKEND_DISABLE_KERNELS is set"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available to torch"
    try:
        _nvrtc()
    except KernelUnavailableError as e:
        return str(e)
    return None


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (torch's current device when it has none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def device_context(index: int):
    """For the block: torch's current device is ``index`` and its primary context is current on this thread.

    ``torch.cuda.device`` alone is not enough for the driver API: in a thread that never used CUDA (a worker, an
    autograd device thread) the runtime's device is already 0, so entering device 0 sets nothing and the thread
    has no current context. The primary context is pushed when it is not current and popped after, so the
    thread's own context stack is left as it was.
    """
    drv = _driver.driver
    with torch.cuda.device(index):
        context = drv.primary_context(index)
        pushed = drv.current_context() != context
        if pushed:
            drv.push_context(context)
        try:
            yield
        finally:
            if pushed:
                drv.pop_context()


def in_device_context(index: int) -> bool:
    """Whether this thread already runs on device ``index`` with its primary context current (the common case,
    which then needs no :func:`device_context`)."""
    drv = _driver.driver
    return torch.cuda.current_device() == index and drv.current_context() == drv.primary_context(index)


class KernelsNotLoadedError(RuntimeError):
    """A kernel module was first needed during CUDA-graph capture, where it cannot be loaded."""


def _load_module(name: str, index: int) -> None:
    """Compiles (through the caches) and loads ``cuda_kernels/<name>`` on device ``index`` and looks all its
    entry points up, so that later uses, captured ones too, only read ``_functions``. The caller holds ``_lock``.
    A compile or load failure raises :class:`KernelUnavailableError`, and is remembered (not retried)."""
    if (name, index) in _loaded:
        return
    failure = _failed.get((name, index))
    if failure is not None:
        raise failure
    try:
        module = load_compiled(name, device_arch(torch.device("cuda", index)))
        with device_context(index):
            handle = _driver.driver.module_load_data(module.image)
            functions = {
                (name, entry, index): _driver.driver.module_get_function(handle, lowered)
                for entry, lowered in module.lowered_names.items()
            }
    except _driver.DriverError as e:
        _failed[(name, index)] = KernelUnavailableError(f"loading the {name} kernels on cuda:{index} failed: {e}")
        raise _failed[(name, index)] from e
    except KernelUnavailableError as e:
        _failed[(name, index)] = e
        raise
    _functions.update(functions)
    _loaded[(name, index)] = (handle, module)


def load_modules(device: torch.device) -> dict[str, KernelUnavailableError | None]:
    """Compiles and loads every kernel module on ``device`` (all of ``ENTRY_POINTS``), outside any CUDA-graph
    capture; returns, per source, the error that made it unavailable, or None. Idempotent."""
    index = device_index(device)
    if torch.cuda.is_current_stream_capturing():
        _raise_not_loaded(sorted(n for n in ENTRY_POINTS if (n, index) not in _loaded), index)
    errors: dict[str, KernelUnavailableError | None] = {}
    with _lock:
        missing = [n for n in ENTRY_POINTS if (n, index) not in _loaded and (n, index) not in _failed]
        _compile_in_parallel(missing, index)
        for name in ENTRY_POINTS:
            try:
                _load_module(name, index)
                errors[name] = None
            except KernelUnavailableError as e:
                errors[name] = e
    return errors


def _compile_in_parallel(names: list[str], index: int) -> None:
    """Fills the compile cache for ``names`` at once (NVRTC releases the GIL, and a first use compiles all three
    sources); a failure is remembered for :func:`_load_module` to report. The caller holds ``_lock``."""
    if len(names) < 2:
        return
    arch = device_arch(torch.device("cuda", index))

    def compile_one(name: str) -> None:
        try:
            load_compiled(name, arch)
        except KernelUnavailableError as e:
            _failed[(name, index)] = e

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(compile_one, names))


def _raise_not_loaded(names: list[str], index: int) -> None:
    if names:
        raise KernelsNotLoadedError(
            f"the quanto_backend kernels {names} are not loaded on cuda:{index} and a CUDA graph is being captured, "
            "where a module cannot be loaded: run the model once before capturing, or call "
            f"quanto_backend.ops.warmup(torch.device('cuda', {index})) first"
        )


def get_function(name: str, entry_point: str, device: torch.device) -> int:
    """The ``CUfunction`` handle of an entry point on ``device``.

    The first use of any kernel on a device loads every module there (:func:`load_modules`), so that a kernel
    first needed later, during CUDA-graph capture (decode graphs after a prefill that ran only the GEMM), is
    already loaded; inside a capture a module that is not loaded raises :class:`KernelsNotLoadedError`. Later
    calls only look a dictionary up. Every driver call runs in :func:`device_context`.
    """
    index = device_index(device)
    key = (name, entry_point, index)
    handle = _functions.get(key)
    if handle is not None:
        return handle
    if torch.cuda.is_current_stream_capturing():
        _raise_not_loaded([name], index)
    errors = load_modules(device)
    if errors.get(name) is not None:
        raise errors[name]
    handle = _functions.get(key)
    if handle is None:
        raise KernelUnavailableError(f"{entry_point} is not an entry point of {name}")
    return handle
