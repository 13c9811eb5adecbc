"""Static SASS report of every kernel: registers, shared memory, spills, and the issue ceiling of the matmul loops.

Each ``cuda_kernels/*.cu`` is compiled by NVRTC (the loader's sources and options) for ``--arch`` (default sm_90)
to a cubin, read whole with ``nvrtcGetCUBINSize`` (CuPy's ``getCUBIN`` drops the last byte), and disassembled with
``cuobjdump -sass`` / ``-res-usage`` (pip: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm). Spills are ptxas's own
"spill stores/loads" (``-Xptxas -v``), checked against the local-memory instructions (LDL/STL) in the SASS.

Main loop of a GEMV/GEMM: the largest backward branch of the kernel. Its *hot* instructions are those of the loop
body minus the slow-path blocks (a block that calls an out-of-line bounds-checked load, and the block its call
returns to), i.e. the instructions a warp issues per iteration when every load is in bounds and aligned. The
weight bytes one iteration consumes per warp follow from the kernel's design and the 16-byte global loads found in
the loop (``gemv_loop_shape``, ``gemm_loop_shape``: which loop it is, how many steps an iteration runs). The GEMV
has three: the unchecked loop for M <= 8 (the decode case, the headline numbers), the unchecked loop for
8 < M <= 16, and the bounds-checked loop (tails, unaligned tensors); each is in the JSON.

Issue-ceiling model (a bound, not a prediction): a decode GEMV streams each weight byte once, and an SM issues at
most one warp instruction per cycle per scheduler. With the H100 SXM's 132 SMs x 4 schedulers at its 1.98 GHz
maximum boost clock, the loop can consume at most

    ceiling = 132 * 4 * 1.98e9 * (weight bytes per iteration per warp) / (hot instructions per iteration)

bytes of weights per second, reported as a percentage of the H100's 3.35 TB/s HBM3 bandwidth. A ceiling of 100 %
means that instruction issue cannot be what keeps the kernel from the memory roofline; below it, the kernel cannot
reach the roofline whatever the memory system does. The model ignores instructions outside the loop (prologue,
cross-warp reduction, epilogue: small for large K), dual-issue restrictions and latency, so real kernels land
below it. For the GEMM (compute-bound at the M it serves) the same number is printed for reference only.

    python bench/sass.py                    # writes bench/results/sass.json
    python bench/sass.py --arch 90 --output /tmp/sass.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quanto_backend.kernels import loader

H100_SMS = 132
SCHEDULERS_PER_SM = 4
H100_MAX_CLOCK_HZ = 1.98e9
H100_HBM_BYTES_PER_S = 3.35e12
_F16, _BF16, _I8, _E4M3, _E5M2 = 1, 2, 3, 5, 6
_FORMAT_NAMES = {_F16: "f16", _BF16: "bf16", _I8: "i8", _E4M3: "e4m3", _E5M2: "e5m2",
                 loader.U4_CODE: "u4", loader.U2_CODE: "u2"}  # fmt: skip


@dataclass
class KernelReport:
    entry_point: str
    source: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    local_memory_instructions: int
    loop_instructions: int | None = None
    loop_hot_instructions: int | None = None
    loop_weight_bytes_per_warp: int | None = None
    instructions_per_512_weight_bytes: float | None = None
    instructions_per_weight_byte: float | None = None
    issue_ceiling_pct_of_h100_hbm: float | None = None
    main_loop: str | None = None
    loops: list[dict] = field(default_factory=list)


# --- tools -----------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A CUDA binary tool from PATH or from the pip wheels' ``nvidia/cu*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for candidate in sorted(Path(root).glob(f"cu*/bin/{name}"), reverse=True):
                return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def _run_cuobjdump(args: list[str]) -> str:
    cuobjdump = _tool("cuobjdump")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(_tool("nvdisasm")).parent), env.get("PATH", "")])  # cuobjdump runs it
    return subprocess.run([cuobjdump, *args], capture_output=True, text=True, check=True, env=env).stdout


def _libnvrtc() -> ctypes.CDLL:
    """The libnvrtc that CuPy's binding loaded (the program handles are its pointers)."""
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if re.search(r"/libnvrtc\.so[.\d]*$", line.strip())})
    if not paths:
        raise RuntimeError("libnvrtc is not loaded")
    return ctypes.CDLL(paths[0])


def compile_cubin(name: str, arch: int) -> tuple[bytes, dict[str, str], str]:
    """(cubin, entry point -> lowered name, ptxas -v log) of ``cuda_kernels/<name>`` for sm_<arch>."""
    from cupy_backends.cuda.libs import nvrtc

    sources = loader.read_sources()
    headers = {n: t for n, t in sorted(sources.items()) if n.endswith(".cuh")}
    program = nvrtc.createProgram(
        sources[name], name, [h.encode() for h in headers.values()], [*map(str.encode, headers)]
    )
    try:
        for expr in loader.ENTRY_POINTS[name]:
            nvrtc.addNameExpression(program, expr)
        nvrtc.compileProgram(program, [*loader.COMPILE_OPTIONS, f"-arch=sm_{arch}", "-Xptxas", "-v"])
        log = nvrtc.getProgramLog(program)
        lowered = {expr: nvrtc.getLoweredName(program, expr) for expr in loader.ENTRY_POINTS[name]}
        lib = _libnvrtc()
        size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(ctypes.c_void_p(program), ctypes.byref(size)) != 0:
            raise RuntimeError("nvrtcGetCUBINSize failed")
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(ctypes.c_void_p(program), buf) != 0:
            raise RuntimeError("nvrtcGetCUBIN failed")
        cubin = buf.raw
    finally:
        nvrtc.destroyProgram(program)
    if cubin[:4] != b"\x7fELF":
        raise RuntimeError(f"{name}: NVRTC did not return an ELF cubin")
    return cubin, lowered, log


# --- parsing ---------------------------------------------------------------------------------------------------


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    usage, function = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            function = m.group(1)
            continue
        if function and "REG:" in line:
            usage[function] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def parse_spills(log: str) -> dict[str, tuple[int, int]]:
    """Mangled function -> (spill store bytes, spill load bytes), from ptxas -v."""
    spills, function = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            function = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and function:
            spills[function] = (int(m.group(1)), int(m.group(2)))
            function = None
    return spills


@dataclass
class Instruction:
    address: int
    text: str

    @property
    def opcode(self) -> str:
        body = re.sub(r"^@!?U?P\w+\s+", "", self.text)
        return body.split()[0] if body else ""


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(2).strip()))
    return functions


def _branch_target(ins: Instruction) -> int | None:
    m = re.search(r"\b(?:BRA|CALL\.REL(?:\.NOINC)?)\b.*?(0x[0-9a-f]+)", ins.text)
    return int(m.group(1), 16) if m else None


@dataclass
class Loop:
    body: list[Instruction]
    hot: list[Instruction]
    calls: bool  # the loop calls an out-of-line (bounds-checked) load: the checked loop
    wide_loads: int  # 16-byte global loads on the hot path
    scale_loads: int  # 2-byte global loads on the hot path (scales and shifts of 2/4-bit groups)


def find_loops(code: list[Instruction]) -> list[Loop]:
    """The innermost loops (backward branches whose body holds no other loop), with their hot instructions."""
    ranges = []
    for i, ins in enumerate(code):
        if ins.opcode == "BRA":
            target = _branch_target(ins)
            if target is not None and target < ins.address:
                ranges.append((next(j for j, x in enumerate(code) if x.address >= target), i))
    innermost = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = []
    for start, end in innermost:
        body = code[start : end + 1]
        # Basic blocks: split at branch targets and after branches/calls.
        targets = {t for x in body if (t := _branch_target(x)) is not None}
        blocks, block = [], []
        for ins in body:
            if ins.address in targets and block:
                blocks.append(block)
                block = []
            block.append(ins)
            if ins.opcode.startswith(("BRA", "CALL", "EXIT", "RET")):
                blocks.append(block)
                block = []
        if block:
            blocks.append(block)
        cold = set()
        for b, blk in enumerate(blocks):
            if any(x.opcode.startswith("CALL") for x in blk):
                cold.add(b)
                if b + 1 < len(blocks):
                    cold.add(b + 1)  # where the call returns: moves its results, then jumps back to the hot path
        hot = [x for b, blk in enumerate(blocks) if b not in cold for x in blk if x.opcode != "NOP"]
        calls = any(x.opcode.startswith("CALL") for x in body)
        wide = sum(bool(re.match(r"LDG\.E\.(128|ENL2\.256)", x.opcode)) for x in hot)
        scales = sum(x.opcode.startswith("LDG.E.U16") for x in hot)
        loops.append(Loop(body, hot, calls, wide, scales))
    return loops


def gemv_loop_shape(loop: Loop, act: int, weight: int) -> tuple[str, int]:
    """(which GEMV loop this is, warp steps per iteration), from its 16-byte loads and the design of gemv.cu:
    a step loads 16 weight bytes per lane and, per 16 bytes of activation values, one row-g chunk plus one
    row-(g+8) chunk when M > 8 (the checked loop always loads both). The unchecked loop runs 2 steps at a time."""
    bits = {loader.U4_CODE: 4, loader.U2_CODE: 2}.get(weight, 8)
    act_bytes = 2 if act in (_F16, _BF16) else 1
    chunks = (128 // bits) * act_bytes // 16
    if loop.calls:
        per_step, kind = 1 + 2 * chunks, "checked"
    else:
        # 2-bit weights have two loops per M range: one scale per lane's 16 bytes (groups of 64 or more), or two.
        pieces = "" if bits != 2 else ", groups >= 64" if loop.scale_loads == 2 * 2 else ", groups of 32"
        for rows, kind in ((1, "unchecked, M <= 8"), (2, "unchecked, M > 8")):
            if loop.wide_loads == 2 * (1 + rows * chunks):
                return kind + pieces, 2
        raise RuntimeError(f"an unchecked GEMV loop with {loop.wide_loads} 16-byte loads fits no known shape")
    if loop.wide_loads == 0 or loop.wide_loads % per_step:
        raise RuntimeError(f"a checked GEMV loop with {loop.wide_loads} 16-byte loads, not a multiple of {per_step}")
    return kind, loop.wide_loads // per_step


def gemm_loop_shape(loop: Loop, act: int, weight: int) -> tuple[str, int]:
    """A 128 x 128 x (64 bytes of activations) tile per iteration: per thread 2 16-byte chunks of A, and 2 of B
    (8-bit activations) or 16 weight values of B (16 bytes for 8-bit weights, less for 2/4-bit ones)."""
    bits = {loader.U4_CODE: 4, loader.U2_CODE: 2}.get(weight, 8)
    per_tile = 4 if act not in (_F16, _BF16) else 2 + (bits == 8)
    if loop.wide_loads == 0 or loop.wide_loads % per_tile:
        raise RuntimeError(f"a GEMM loop with {loop.wide_loads} 16-byte loads, not a multiple of {per_tile}")
    return "k-tile", loop.wide_loads // per_tile


def weight_bytes_per_step(kind: str, act: int, weight: int) -> int:
    """Weight bytes per warp per GEMV step (16 per lane) or per GEMM k-tile (128 rows x 64 activation bytes'
    worth of weight values, over 8 warps)."""
    if kind == "gemv":
        return 32 * 16
    bits = {loader.U4_CODE: 4, loader.U2_CODE: 2}.get(weight, 8)
    act_bytes = 2 if act in (_F16, _BF16) else 1
    return 128 * (64 // act_bytes) * bits // 8 // 8


def ceiling_pct(weight_bytes: int, instructions: int) -> float:
    rate = H100_SMS * SCHEDULERS_PER_SM * H100_MAX_CLOCK_HZ * weight_bytes / instructions
    return round(100 * rate / H100_HBM_BYTES_PER_S, 1)


# --- report ----------------------------------------------------------------------------------------------------


def analyse(arch: int = 90) -> list[KernelReport]:
    reports = []
    for source, entry_points in loader.ENTRY_POINTS.items():
        cubin, lowered, log = compile_cubin(source, arch)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{Path(source).stem}.cubin"
            path.write_bytes(cubin)
            usage = parse_res_usage(_run_cuobjdump(["-res-usage", str(path)]))
            sass = parse_sass(_run_cuobjdump(["-sass", str(path)]))
        spills = parse_spills(log)
        for entry in entry_points:
            mangled = lowered[entry]
            code = sass[mangled]
            use = usage[mangled]
            store, load = spills.get(mangled, (0, 0))
            report = KernelReport(
                entry_point=entry,
                source=source,
                registers=use["REG"],
                shared_bytes=use["SHARED"],
                stack_bytes=use["STACK"],
                spill_store_bytes=store,
                spill_load_bytes=load,
                local_memory_instructions=sum(x.opcode.startswith(("LDL", "STL")) for x in code),
            )
            m = re.fullmatch(r"qb_(gemv|gemm)<(\d+), (\d+)>", entry)
            if m:
                kind, act, weight = m.group(1), int(m.group(2)), int(m.group(3))
                shape = gemv_loop_shape if kind == "gemv" else gemm_loop_shape
                for loop in find_loops(code):
                    if loop.wide_loads == 0 and not loop.calls:
                        continue  # a setup loop (the GEMV's group-size log2), not a pass over the weights
                    name, steps = shape(loop, act, weight)
                    per_warp = weight_bytes_per_step(kind, act, weight) * steps
                    report.loops.append({
                        "loop": name, "instructions": len(loop.body), "hot_instructions": len(loop.hot),
                        "weight_bytes_per_warp": per_warp,
                        "instructions_per_512_weight_bytes": round(len(loop.hot) * 512 / per_warp, 1),
                        "issue_ceiling_pct_of_h100_hbm": ceiling_pct(per_warp, len(loop.hot)),
                    })  # fmt: skip
                # The headline: the decode loop (unchecked, M <= 8; for 2-bit weights with groups of 64 or more,
                # the usual sizes) where there is one, else the largest loop.
                decode = [
                    lp for lp in report.loops if lp["loop"] in ("unchecked, M <= 8", "unchecked, M <= 8, groups >= 64")
                ]
                main = decode[0] if decode else max(report.loops, key=lambda lp: lp["instructions"])
                report.main_loop = main["loop"]
                report.loop_instructions = main["instructions"]
                report.loop_hot_instructions = main["hot_instructions"]
                report.loop_weight_bytes_per_warp = main["weight_bytes_per_warp"]
                report.instructions_per_512_weight_bytes = main["instructions_per_512_weight_bytes"]
                report.instructions_per_weight_byte = round(main["hot_instructions"] / main["weight_bytes_per_warp"], 4)
                report.issue_ceiling_pct_of_h100_hbm = main["issue_ceiling_pct_of_h100_hbm"]
            reports.append(report)
    return reports


def format_table(reports: list[KernelReport]) -> str:
    header = f"{'kernel':26} {'regs':>4} {'smem':>6} {'spill':>5} {'loop':>5} {'hot':>5} {'B/warp':>6} " \
             f"{'ins/512B':>8} {'ceiling':>8}"  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in reports:
        name = r.entry_point
        m = re.fullmatch(r"qb_(gemv|gemm)<(\d+), (\d+)>", name)
        if m:
            name = f"{m.group(1)} {_FORMAT_NAMES[int(m.group(2))]} x {_FORMAT_NAMES[int(m.group(3))]}"
        loop = "" if r.loop_instructions is None else str(r.loop_instructions)
        hot = "" if r.loop_hot_instructions is None else str(r.loop_hot_instructions)
        per_warp = "" if r.loop_weight_bytes_per_warp is None else str(r.loop_weight_bytes_per_warp)
        per_512 = "" if r.instructions_per_512_weight_bytes is None else f"{r.instructions_per_512_weight_bytes:.0f}"
        ceiling = "" if r.issue_ceiling_pct_of_h100_hbm is None else f"{r.issue_ceiling_pct_of_h100_hbm:.0f}%"
        lines.append(
            f"{name:26} {r.registers:>4} {r.shared_bytes:>6} {r.spill_store_bytes + r.spill_load_bytes:>5} "
            f"{loop:>5} {hot:>5} {per_warp:>6} {per_512:>8} {ceiling:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "sass.json")
    args = parser.parse_args(argv)
    reports = analyse(args.arch)
    print(f"sm_{args.arch} SASS (NVRTC {'.'.join(map(str, _nvrtc_version()))}); ceiling: issue-bound weight "
          f"bandwidth as % of H100 HBM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s")  # fmt: skip
    print(format_table(reports))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "arch": f"sm_{args.arch}",
        "nvrtc": list(_nvrtc_version()),
        "model": {
            "sms": H100_SMS,
            "schedulers_per_sm": SCHEDULERS_PER_SM,
            "clock_hz": H100_MAX_CLOCK_HZ,
            "hbm_bytes_per_s": H100_HBM_BYTES_PER_S,
            "ceiling": "sms * schedulers * clock * loop_weight_bytes_per_warp / loop_hot_instructions / hbm",
        },
        "kernels": [asdict(r) for r in reports],
    }
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


def _nvrtc_version() -> tuple[int, int]:
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


if __name__ == "__main__":
    sys.exit(main())
