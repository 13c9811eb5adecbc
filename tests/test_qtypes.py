import pytest
import torch

from quanto_backend import qfloat8, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8
from quanto_backend.qtypes import as_qtype


@pytest.mark.parametrize(
    "name, expected",
    [
        ("int8", qint8),
        ("qint8", qint8),
        ("INT4", qint4),
        ("int2", qint2),
        ("float8", qfloat8_e4m3fn),
        ("qfloat8", qfloat8_e4m3fn),
        ("float8_e5m2", qfloat8_e5m2),
        ("qfloat8_e4m3fn", qfloat8_e4m3fn),
    ],
)
def test_names_resolve(name, expected):
    assert as_qtype(name) is expected


def test_qfloat8_is_e4m3fn():
    assert qfloat8 is qfloat8_e4m3fn
    assert qfloat8.dtype == torch.float8_e4m3fn


def test_formats():
    assert (qint8.bits, qint8.dtype, qint8.qmin, qint8.qmax) == (8, torch.int8, -127, 127)
    assert (qint4.bits, qint4.qmax, qint4.is_packed) == (4, 15, True)
    assert (qint2.bits, qint2.qmax) == (2, 3)
    assert qfloat8_e4m3fn.qmax == 448 and qfloat8_e5m2.qmax == 57344


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError, match="int3.*accepted.*int8"):
        as_qtype("int3")


def test_restricted_set_rejects_others():
    with pytest.raises(ValueError, match="activations"):
        as_qtype("int4", (qint8, qfloat8), "activations")


def test_wrong_type_is_type_error():
    with pytest.raises(TypeError, match="QType or a string"):
        as_qtype(8)
