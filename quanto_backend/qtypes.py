"""The qtype registry: small frozen descriptions of the quantized number formats.

Everything that takes a qtype accepts either the object (``qint8``) or one of its names (``"int8"``,
``"qint8"``); :func:`as_qtype` is the one place that turns a name into a qtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QType",
    "as_qtype",
    "qfloat8",
    "qfloat8_e4m3fn",
    "qfloat8_e4m3fnuz",
    "qfloat8_e5m2",
    "qint2",
    "qint4",
    "qint8",
    "quint8",
    "qtypes",
]


@dataclass(frozen=True)
class QType:
    """A quantized number format.

    Attributes:
        name: canonical name, e.g. ``"qint4"``.
        bits: bits per value.
        is_floating_point: float8 formats are; integer formats are not.
        dtype: torch dtype of one unpacked value (``uint8`` for the affine 2/4-bit formats).
        qmin, qmax: the representable range of the unpacked values.
    """

    name: str
    bits: int
    is_floating_point: bool
    dtype: torch.dtype
    qmin: float
    qmax: float

    @property
    def is_packed(self) -> bool:
        """2/4-bit values are packed several to a byte."""
        return self.bits < 8

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


def _float8(name: str, dtype: torch.dtype) -> QType:
    info = torch.finfo(dtype)
    return QType(name, 8, True, dtype, float(info.min), float(info.max))


# int8 is symmetric: scales map the largest magnitude to 127 (qmin = -qmax, so that observers and optimizers choose
# symmetric scales); quantization still clamps to int8's -128 (see ops/reference.py), which only values beyond a
# static scale's calibrated range reach.
qint8 = QType("qint8", 8, False, torch.int8, -127.0, 127.0)
# uint8 with a zero-point: the asymmetric activation format of static quantization.
quint8 = QType("quint8", 8, False, torch.uint8, 0.0, 255.0)
# The 2/4-bit formats are affine (scale and shift): unsigned codes in [0, 2**bits - 1].
qint4 = QType("qint4", 4, False, torch.uint8, 0.0, 15.0)
qint2 = QType("qint2", 2, False, torch.uint8, 0.0, 3.0)
qfloat8_e4m3fn = _float8("qfloat8_e4m3fn", torch.float8_e4m3fn)
qfloat8_e5m2 = _float8("qfloat8_e5m2", torch.float8_e5m2)
# The "fnuz" variant (no negative zero, one NaN; max 240): the float8 format of AMD Instinct GPUs.
qfloat8_e4m3fnuz = _float8("qfloat8_e4m3fnuz", torch.float8_e4m3fnuz)
qfloat8 = qfloat8_e4m3fn

_FORMATS = (qint2, qint4, qint8, quint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)
# Keyed by name, plus "qfloat8" (optimum-quanto's dict has that key too): every value is a registry singleton.
qtypes: dict[str, QType] = {q.name: q for q in _FORMATS} | {"qfloat8": qfloat8}
_ALIASES = {"qfloat8": qfloat8, "float8": qfloat8, "fp8": qfloat8}
for _q in _FORMATS:
    _ALIASES[_q.name.removeprefix("q")] = _q


def as_qtype(value: QType | str, accepted: tuple[QType, ...] | None = None, what: str = "qtype") -> QType:
    """Return the qtype named by ``value``; raise ``ValueError`` listing the accepted names otherwise.

    Args:
        value: a :class:`QType` or one of its names (``"int8"``, ``"qint8"``, ``"float8"``, ...).
        accepted: restricts the answer to these qtypes (e.g. the activation formats).
        what: what the value is, for the error message (``"weights"``, ``"activations"``).
    """
    accepted = accepted or _FORMATS
    if isinstance(value, QType):
        qtype = value
    elif isinstance(value, str):
        qtype = qtypes.get(value) or _ALIASES.get(value.lower())
    else:
        raise TypeError(f"{what} must be a QType or a string, got {type(value).__name__}: {value!r}")
    if qtype is None or qtype not in accepted:
        names = ", ".join(sorted({q.name.removeprefix("q") for q in accepted} | {q.name for q in accepted}))
        raise ValueError(f"Unsupported {what} {value!r}; accepted: {names}")
    return qtype
