"""Launch arguments are packed into one buffer laid out as the CUDA ABI lays out the kernel's parameters, and the
arguments ops/cuda.py passes to each kernel match that kernel's parameter list in the compiled cubin (the offsets
and sizes NVRTC recorded, read back with cuobjdump)."""

from __future__ import annotations

import ctypes
import re
import struct
import subprocess
import sys

import pytest
import torch
from fake_cuda import H100_SMS, emulate_launch
from test_kernels_compile import _cuobjdump

import quanto_backend.kernels as kernels
import quanto_backend.ops.cuda as cuda_ops
from quanto_backend.kernels import driver, loader

launch_module = sys.modules["quanto_backend.kernels.launch"]

MATMUL = "P" * 7 + "i" * 12


@pytest.mark.parametrize(
    ("codes", "offsets", "size"),
    [
        # qb_quantize_symmetric(ptr, int, ptr, int, int, ptr, int, long long, int): the long long moves to 48
        ("PiPiiPiqi", (0, 8, 16, 24, 28, 32, 40, 48, 56), 60),
        ("PPqi", (0, 8, 16, 24), 28),  # qb_pack
        (MATMUL, (*range(0, 56, 8), *range(56, 104, 4)), 104),
        ("iPfqi", (0, 8, 16, 24, 32), 36),
    ],
)
def test_layout_follows_the_abi(codes, offsets, size):
    layout = launch_module.param_layout(codes)
    assert layout.offsets == offsets and layout.size == size


def test_packed_buffer_holds_each_argument_at_its_offset():
    x = torch.arange(8, dtype=torch.float32)
    args = (x, 3, None, -7, 1, x[2:], 5, kernels.Int64(2**40 + 3), 2**31 - 1)
    layout, buffer, extra = launch_module.pack_args(args)
    raw = bytes(buffer)[: layout.size]
    assert layout.codes == "PiPiiPiqi" and len(raw) == 60
    read = {o: raw[o : o + n] for o, n in zip(layout.offsets, (8, 4, 8, 4, 4, 8, 4, 8, 4), strict=True)}
    assert int.from_bytes(read[0], "little") == x.data_ptr()
    assert int.from_bytes(read[8], "little", signed=True) == 3
    assert int.from_bytes(read[16], "little") == 0
    assert int.from_bytes(read[24], "little", signed=True) == -7
    assert int.from_bytes(read[32], "little") == x.data_ptr() + 8
    assert int.from_bytes(read[48], "little", signed=True) == 2**40 + 3
    assert int.from_bytes(read[56], "little", signed=True) == 2**31 - 1
    # extra = {BUFFER_POINTER, &buffer, BUFFER_SIZE, &size, END}
    words = list(extra)
    assert words[0] == driver.CU_LAUNCH_PARAM_BUFFER_POINTER and words[1] == ctypes.addressof(buffer)
    assert words[2] == driver.CU_LAUNCH_PARAM_BUFFER_SIZE and not words[4]
    assert ctypes.c_size_t.from_address(words[3]).value == 60


def test_float_argument_and_errors():
    layout, buffer, _ = launch_module.pack_args((1.5,))
    assert struct.unpack_from("<f", bytes(buffer)) == (1.5,)
    with pytest.raises(ValueError, match="does not fit a 32-bit int"):
        launch_module.pack_args((2**31,))
    with pytest.raises(TypeError, match="unsupported kernel argument type str"):
        launch_module.pack_args(("x",))


def test_buffers_are_per_thread():
    import threading

    mine = launch_module.pack_args((1, 2))[1]
    other = []
    thread = threading.Thread(target=lambda: other.append(launch_module.pack_args((3, 4))[1]))
    thread.start()
    thread.join()
    assert ctypes.addressof(mine) != ctypes.addressof(other[0])
    assert struct.unpack_from("<ii", bytes(mine)) == (1, 2)


def _ops_signatures(monkeypatch) -> dict[str, str]:
    """The argument codes ops/cuda.py passes to every entry point, from its self-tests run on CPU through the
    kernel emulator."""
    seen: dict[str, str] = {}

    def record(source, entry_point, grid, args, device):
        seen[entry_point] = launch_module.pack_args(args)[0].codes
        emulate_launch(source, entry_point, grid, args, device)

    monkeypatch.setattr(cuda_ops, "_launch", record)
    monkeypatch.setattr(cuda_ops, "_fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(cuda_ops, "_multiprocessors", lambda device: H100_SMS)
    from quanto_backend.ops import cuda_self_test

    for family in cuda_ops.FAMILIES:
        assert cuda_self_test.run(family, torch.device("cpu")) is None
    return seen


def _cubin_params(image: bytes, tmp_path) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """Per mangled kernel name: [(offset, size)] by parameter ordinal, and the parameter bank's size."""
    path = tmp_path / "module.cubin"
    path.write_bytes(image)
    listing = subprocess.run([_cuobjdump(), "-elf", str(path)], capture_output=True, text=True, timeout=120).stdout
    kernels_found = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", listing)[1:]:
        name = section.split("\n", 1)[0][len(".nv.info.") :].strip()
        params = re.findall(
            r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x([0-9a-f]+)\s+Size\s*:\s*0x([0-9a-f]+)", section
        )
        bank = re.search(r"EIATTR_CBANK_PARAM_SIZE\s+Format:\s*EIFMT_HVAL\s+Value:\s*0x([0-9a-f]+)", section)
        by_ordinal = sorted((int(o, 16), int(off, 16), int(n, 16)) for o, off, n in params)
        kernels_found[name] = ([(off, n) for _, off, n in by_ordinal], int(bank.group(1), 16) if bank else -1)
    return kernels_found


def test_ops_arguments_match_every_kernels_parameters(monkeypatch, tmp_path):
    signatures = _ops_signatures(monkeypatch)
    assert set(signatures) == {e for entries in loader.ENTRY_POINTS.values() for e in entries}
    for source in loader.ENTRY_POINTS:
        module = loader.load_compiled(source, 90)
        params = _cubin_params(module.image, tmp_path)
        for entry_point, lowered in module.lowered_names.items():
            layout = launch_module.param_layout(signatures[entry_point])
            expected = list(zip(layout.offsets, (launch_module._SIZES[c] for c in layout.codes), strict=True))
            assert params[lowered] == (expected, layout.size), entry_point


def test_launch_overhead_bench_quick(tmp_path):
    from test_bench_scripts import load_script

    out = tmp_path / "launch.json"
    assert load_script("launch_overhead.py").main(["--quick", "--output", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["benchmark"] == "launch_overhead" and report["machine"]["cpu_capability"]
    assert set(report["best_us"]) == {"per_argument_us", "one_buffer_us", "launch_with_stub_driver_us"}
    assert torch.cuda.current_stream is not None and driver.driver.__class__.__name__ == "CUDADriver"  # restored
