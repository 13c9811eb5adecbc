"""The contracts of the CPU kernels: loaded storage is made to meet them once, and outside them the reference runs.

A crash here (a SIGSEGV in ``torch._weight_int8pack_mm``) is what these tests guard against on AVX-512 CPUs:
misaligned int8 storage from ``safetensors``, and in_features that are not a multiple of 16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from quanto_backend import Calibration, freeze, ops, quantization_map, quantize, requantize
from quanto_backend.nn import quantize_module
from quanto_backend.ops import cpu, reference


def _misaligned(state: dict[str, torch.Tensor]) -> bool:
    return any(t.data_ptr() % cpu.ALIGNMENT for t in state.values() if t.dtype == torch.int8)


def _misaligned_copy(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """An int8 copy of ``t`` that starts ``offset_bytes`` into a larger buffer (as checkpoint views do)."""
    buffer = torch.empty(t.numel() + offset_bytes, dtype=torch.int8)
    return buffer[offset_bytes:].view_as(t).copy_(t)


def _w8a8(in_features: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize(model, weights="int8", activations="int8")
    with torch.no_grad(), Calibration():
        model(torch.randn(16, in_features))
    return freeze(model)


def test_safetensors_reload_of_w8a8_is_aligned_once_and_takes_the_kernel(tmp_path, monkeypatch):
    model = _w8a8()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    loaded = load_file(path)
    # safetensors hands out views into one buffer; an odd-sized tensor before the int8 one shifts it off alignment.
    loaded = {"0.aaa_odd": torch.zeros(3, dtype=torch.int8), **loaded}
    save_file(loaded, path)
    loaded = load_file(path)
    del loaded["0.aaa_odd"]
    assert _misaligned(loaded)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    reloaded = requantize(skeleton, loaded, json.loads(json.dumps(quantization_map(model))))
    assert all(reloaded[i].weight.data_ptr() % cpu.ALIGNMENT == 0 for i in (0, 2))

    bounds = [cpu.a8w8_kernel_max_rows(*reloaded[i].weight.shape) for i in (0, 2)]
    rows = max(1, min(4, *bounds))  # within the int8pack kernel's rows where it has any
    x = torch.randn(rows, 256)
    with torch.no_grad():
        expected = model(x).dequantize()
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        assert torch.equal(reloaded(x).dequantize(), expected)
    assert len(calls) == (sum(rows <= bound for bound in bounds) if cpu.INT8PACK.holds() else 0)


def test_load_state_dict_with_assign_aligns_the_assigned_storage():
    model = _w8a8()
    state = model.state_dict()
    misaligned = _misaligned_copy(state["0.weight"], 4)
    target = _w8a8()
    target.load_state_dict({**state, "0.weight": misaligned}, assign=True)
    assert target[0].weight.data_ptr() % cpu.ALIGNMENT == 0
    assert torch.equal(target[0].weight, state["0.weight"])


def _close_to_reference(out: torch.Tensor, expected: torch.Tensor) -> bool:
    # The dequantizing path rounds like the reference, in another order: bfloat16 rounding at most.
    return out.dtype == expected.dtype and ((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2


@pytest.mark.parametrize("in_features", [40, 264, 1000])
@pytest.mark.parametrize("rows", [1, 2, 7])
def test_in_features_outside_the_contract_never_reach_the_kernel(monkeypatch, in_features, rows):
    q, scale = ops.quantize_per_token(torch.randn(24, in_features), torch.int8)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    expected = reference.linear_w8(x, q, scale.to(torch.bfloat16), None)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: pytest.fail("kernel called outside its contract"))
    assert _close_to_reference(ops.linear_w8(x, q, scale.to(torch.bfloat16), None), expected)


def test_a_misaligned_weight_given_directly_is_not_trusted(monkeypatch):
    q, scale = ops.quantize_per_token(torch.randn(32, 64), torch.int8)
    weight = _misaligned_copy(q, 8)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: pytest.fail("kernel called on misaligned storage"))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert _close_to_reference(ops.linear_w8(x, weight, scale, None), reference.linear_w8(x, weight, scale, None))


@pytest.mark.parametrize(
    "capability, amx, kind",
    [
        ("AVX512", True, "AVX512_AMX"),
        ("AVX512", False, "AVX512"),
        ("AVX2", None, "AVX2"),
        ("DEFAULT", False, "DEFAULT"),
    ],
)
def test_cpu_kind_tells_amx_apart(monkeypatch, capability, amx, kind):
    # Sapphire Rapids and Zen 4 both report "AVX512"; only AMX tiles tell their tables apart. A torch without the
    # private probe (amx None) is taken as having no AMX.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if amx is None:
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    cpu.cpu_kind.cache_clear()
    try:
        assert cpu.cpu_kind() == kind
    finally:
        cpu.cpu_kind.cache_clear()


def test_an_unmeasured_cpu_kind_takes_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_kind", lambda: "DEFAULT")
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm"):
        monkeypatch.setattr(torch, name, lambda *a, _n=name: pytest.fail(f"{_n} called on an unmeasured CPU"))
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 64), nn.Linear(64, 32))
    quantize(model[0:1], weights="int8")
    quantize(model[1:2], weights="int4", group_size=32)
    quantize(model[2:3], weights="int8", activations="int8", activation_scales="dynamic")
    freeze(model)
    with torch.no_grad():
        out = model(torch.randn(3, 256, dtype=torch.float32))
    assert torch.isfinite(out).all()


def _saturating(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` as oneDNN computes it without VNNI: products summed in pairs, each pair clamped to int16."""
    pairs = F.pad(x.int(), (0, x.shape[1] % 2)).unflatten(1, (-1, 2)).unsqueeze(-1)
    products = pairs * F.pad(weight.int(), (0, 0, 0, weight.shape[0] % 2)).unflatten(0, (-1, 2))
    return products.sum(2).clamp(-(2**15), 2**15 - 1).sum(1).int()


@pytest.mark.parametrize("fake", ["saturating", "raising"])
def test_int_mm_is_trusted_only_where_its_sums_are_exact(monkeypatch, fake):
    # The kind alone does not settle _int_mm: with oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA=AVX2 on Zen 4) its
    # sums saturate. A torch._int_mm that saturates, or raises, is not trusted, and int8 x int8 still comes out exact.
    def raising(*args):
        raise RuntimeError("no int8 GEMM here")

    monkeypatch.setattr(torch, "_int_mm", _saturating if fake == "saturating" else raising)
    monkeypatch.setattr(cpu, "cpu_kind", lambda: "AVX512")  # where INT_MM's kinds hold
    cpu.int_mm_is_exact.cache_clear()
    try:
        assert not cpu.int_mm_is_exact()
        assert not cpu.INT_MM.holds() and not cpu.INT_MM_WEIGHT_FIRST.holds()
        x_q = torch.randint(-128, 128, (40, 96), dtype=torch.int8)
        weight = torch.randint(-128, 128, (24, 96), dtype=torch.int8)
        x_q[::2], weight[::2] = -128, -128  # pairs of -128 x -128 products: 32768, one past int16
        x_scale, weight_scale = torch.tensor(0.5), torch.full((24, 1), 0.25)
        out = ops.linear_a8w8(x_q, x_scale, weight, weight_scale, None, torch.float32)
        expected = reference.linear_a8w8(x_q, x_scale, weight, weight_scale, None, torch.float32)
        assert torch.equal(out, expected)
    finally:
        cpu.int_mm_is_exact.cache_clear()
    assert not torch.equal(_saturating(x_q, weight.t()), (x_q.double() @ weight.double().t()).int())  # it saturates
    assert torch.equal(_saturating(x_q // 4, weight.t() // 4), (x_q // 4).int() @ (weight.t() // 4).int())


def test_int_mm_is_exact_on_this_machine_in_each_onednn_isa():
    # On the real machine: with oneDNN at its full ISA and capped at AVX2 (a no-op on a CPU without AVX-512), the
    # contract holds only where torch._int_mm's sums are exact on products that overflow int16 pairs.
    script = (
        "import torch; from quanto_backend.ops import cpu\n"
        "x = torch.full((3, 64), 127, dtype=torch.int8); w = torch.full((64, 16), 127, dtype=torch.int8)\n"
        "exact = torch.equal(torch._int_mm(x, w), torch.full((3, 16), 64 * 127 * 127, dtype=torch.int32))\n"
        "print(cpu.int_mm_is_exact() == exact, not cpu.INT_MM.holds() or exact)\n"
    )
    for isa in ("ALL", "AVX2"):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split() == ["True", "True"], (isa, out.stdout, out.stderr[-2000:])


def test_quantize_refuses_a_bare_supported_module_instead_of_ignoring_it():
    linear = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="quantize_module"):
        quantize(linear, weights="int8")
    qlinear = quantize_module(linear, weights="int8")  # what the message points to
    assert qlinear.weight_qtype.name == "qint8"
