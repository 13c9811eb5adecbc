"""float8 codes converted exactly through float16 bits.

torch's float8 -> float conversion is a scalar loop on CPU (about 1.9 ns a weight on Zen 4, against 0.06 for an
int8 -> float32 one); the same bits moved into a float16 are exact and convert on the vector units. e5m2 is
float16's top byte. e4m3fn's sign, 4-bit exponent (bias 7) and 3-bit mantissa become float16's sign, the low 4 of
its 5 exponent bits (bias 15) and the top of its mantissa: every finite code, subnormals included, maps to its value
times 2 ** -8; its NaN codes (exponent and mantissa all ones, 0x3F80 once moved) also get the top exponent bit, and
stay NaN.
"""

from __future__ import annotations

import torch

__all__ = ["BFLOAT16_PIECE", "FLOAT8_VIA_HALF_FACTOR", "float8_into", "has_nan_codes"]

FLOAT8_VIA_HALF_FACTOR: dict[torch.dtype, float] = {torch.float8_e4m3fn: 256.0, torch.float8_e5m2: 1.0}
_E4M3_HALF_BITS = -16512  # 0xBF80 as int16: the sign bit and the 7 bits of exponent and mantissa


# bfloat16 outputs are converted this many codes at a time: the float32 temporary of each piece (2 MiB) stays in
# cache, where one of the whole block's size does not (a 2M-code block on Zen 4: 0.58-0.64 ms in one piece, 0.41-0.46
# in pieces of 512K; pieces of 64K lose more to the per-op overhead than they gain).
BFLOAT16_PIECE = 1 << 19


def float8_into(codes: torch.Tensor, out: torch.Tensor, nan_codes: bool = True) -> torch.Tensor:
    """Write float8 ``codes`` (e4m3fn or e5m2) into ``out`` (any float dtype, same shape) as their values divided
    by ``FLOAT8_VIA_HALF_FACTOR[codes.dtype]``, exactly; returns ``out``. NaN codes come out NaN unless
    ``nan_codes=False`` says there are none (see :func:`has_nan_codes`), which spares four of the passes."""
    if out.dtype == torch.bfloat16 and codes.numel() > BFLOAT16_PIECE and codes.is_contiguous() and out.is_contiguous():
        flat_codes, flat_out = codes.view(-1), out.view(-1)
        for start in range(0, flat_codes.numel(), BFLOAT16_PIECE):
            piece = slice(start, start + BFLOAT16_PIECE)
            float8_into(flat_codes[piece], flat_out[piece], nan_codes)
        return out
    if codes.dtype == torch.float8_e4m3fn:
        # As int8, byte b sign-extends into bit 14 and 15: (b << 7) & 0xBF80 keeps the sign in bit 15 only.
        bits = codes.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(_E4M3_HALF_BITS)
        if nan_codes:
            bits.bitwise_or_(bits.bitwise_and(0x3F80).add_(0x80).bitwise_and_(0x4000))  # NaN: 0x3F80 + 0x80 = 0x4000
    else:
        bits = codes.view(torch.uint8).to(torch.int16).bitwise_left_shift_(8)
    half = bits.view(torch.float16)
    # float16 -> bfloat16 is a scalar loop on CPU (6x the two vectorized conversions through float32).
    return out.copy_(half.float() if out.dtype == torch.bfloat16 else half)


def has_nan_codes(codes: torch.Tensor) -> bool:
    """Whether float8 ``codes`` hold a NaN that :func:`float8_into` must carry (e4m3fn: exponent and mantissa all
    ones; e5m2's NaNs and infinities come out of float16 bits as they are)."""
    return codes.dtype == torch.float8_e4m3fn and bool((codes.view(torch.uint8) & 0x7F).eq_(0x7F).any())
