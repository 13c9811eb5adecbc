"""Quantize-on-load gives the C heap's free memory back only beyond what the next weights' temporaries reuse."""

import ctypes
import sys

import pytest

from quanto_backend.integrations import loading

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux only")


class FakeLibc:
    def __init__(self, free_bytes):
        self.trims = 0
        self.free_bytes = free_bytes

    def malloc_trim(self, pad):
        self.trims += 1
        return 1


@pytest.mark.parametrize(
    ("free_bytes", "keep_bytes", "trims"),
    [(100, 1000, 0), (1001, 1000, 1), (100, 0, 1), (None, 1000, 1)],  # None: no mallinfo2, trim as before
)
def test_trim_heap_keeps_up_to_keep_bytes(monkeypatch, free_bytes, keep_bytes, trims):
    libc = FakeLibc(free_bytes)
    monkeypatch.setattr(loading.ctypes, "CDLL", lambda *_: libc)
    monkeypatch.setattr(loading, "_free_heap_bytes", lambda lib: lib.free_bytes)
    loading.trim_heap(keep_bytes)
    assert libc.trims == trims


def test_free_heap_bytes_reads_glibc():
    free = loading._free_heap_bytes(ctypes.CDLL(None))
    assert free is None or free >= 0
    loading.trim_heap()  # really trims: never raises
