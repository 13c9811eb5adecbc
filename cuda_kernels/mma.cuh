// Building blocks shared by the GEMV (gemv.cu) and GEMM (gemm.cu) kernels: operand formats, tensor-core mma,
// weight decoding and the epilogue.
//
// Operand layout, the one fact both kernels rely on. For mma.m16n8k16 (16-bit operands) and mma.m16n8k32 (8-bit
// operands) alike, lane (g = lane / 4, t = lane % 4) holds, in 32-bit words of a row's k-step slice of 32 bytes:
//   A: a0 = row g word t, a1 = row g+8 word t, a2 = row g word t+4, a3 = row g+8 word t+4
//   B: b0 = column g word t, b1 = column g word t+4           (B is K-major: a row of the [N, K] weight)
//   C: c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g+8, same columns
// A word holds 2 (16-bit) or 4 (8-bit) consecutive k values, the lowest k in the lowest bits.
#pragma once
#include "common.cuh"

template <bool C, class T, class F>
struct Select {
    using type = T;
};
template <class T, class F>
struct Select<false, T, F> {
    using type = F;
};

// Activation formats (AF): DT_F16, DT_BF16 (weight-only kernels) or DT_I8, DT_E4M3, DT_E5M2 (quantized
// activations). Weight formats (WF): DT_I8, DT_E4M3, DT_E5M2, DT_U4, DT_U2.
template <int AF>
__host__ __device__ constexpr int act_bytes() {
    return (AF == DT_F16 || AF == DT_BF16) ? 2 : 1;
}
template <int WF>
__host__ __device__ constexpr int weight_bits() {
    return WF == DT_U4 ? 4 : (WF == DT_U2 ? 2 : 8);
}
template <int WF>
__host__ __device__ constexpr bool is_affine() {
    return WF == DT_U4 || WF == DT_U2;
}
// int8 x int8 accumulates exactly in int32; every other pair in float32.
template <int AF>
using Acc = typename Select<AF == DT_I8, int, float>::type;

// c += a * b on tensor cores: m16n8k16 for 16-bit activations, m16n8k32 for 8-bit ones.
template <int AF, int WF>
QB_DEV void mma(Acc<AF>* c, const u32* a, u32 b0, u32 b1) {
    const u32 b[2] = {b0, b1};
    if constexpr (AF == DT_BF16 || AF == DT_F16) {
        ptx_mma_m16n8k16_f32<AF == DT_BF16>(c, a, b);
    } else if constexpr (AF == DT_I8) {
        ptx_mma_m16n8k32_s32_s8(c, a, b);
    } else {
        ptx_mma_m16n8k32_f32_f8<AF == DT_E5M2, WF == DT_E5M2>(c, a, b);
    }
}

QB_DEV uint4 zero4() { return make_uint4(0u, 0u, 0u, 0u); }

// Bounds-checked slow path of load_act16 (row tails, unaligned rows). Not inlined, to keep the hot loops small.
template <int AB>
__device__ __noinline__ uint4 load_act16_checked(const u8* p, int n_valid) {
    constexpr int NV = 16 / AB;
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < NV; ++e) {
        if (e < n_valid) {
            if constexpr (AB == 2) {
                w[e >> 1] |= ((u32)((const u16*)p)[e]) << (16 * (e & 1));
            } else {
                w[e >> 2] |= ((u32)p[e]) << (8 * (e & 3));
            }
        }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// 16 bytes of one activation row from value k0 on (16 / bytes-per-value values); values at or past K read as 0.
// `vec`: the row start is 16-byte aligned (pointer and row length), so an in-bounds chunk is one vector load.
template <int AB>
QB_DEV uint4 load_act16(const u8* row, int k0, int K, bool vec) {
    constexpr int NV = 16 / AB;
    if (k0 >= K) return zero4();
    const u8* p = row + (long long)k0 * AB;
    if (vec && k0 + NV <= K) return __ldg((const uint4*)p);
    return load_act16_checked<AB>(p, K - k0);
}

// Bounds-checked slow path of load_weight_bytes: bytes whose first value is at or past the n_valid-th read as 0.
template <int BITS, int NV>
__device__ __noinline__ uint4 load_weight_bytes_checked(const u8* p, int n_valid) {
    constexpr int NB = NV * BITS / 8;
    constexpr int PER = 8 / BITS;
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < NB; ++j) {
        if (j * PER < n_valid) w[j >> 2] |= ((u32)p[j]) << (8 * (j & 3));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// The raw bytes of NV weight values from value k0 (a multiple of NV) of a row: NV * BITS / 8 <= 16 bytes in the
// low bytes of the result. Bytes whose first value is at or past K read as 0 (code 0, a finite weight), so
// nothing past the row is read.
template <int BITS, int NV>
QB_DEV uint4 load_weight_bytes(const u8* row, int k0, int K, bool vec) {
    constexpr int NB = NV * BITS / 8;
    if (k0 >= K) return zero4();
    const u8* p = row + k0 / (8 / BITS);
    if (vec && k0 + NV <= K) {
        if constexpr (NB == 16) {
            return __ldg((const uint4*)p);
        } else if constexpr (NB == 8) {
            const uint2 v = __ldg((const uint2*)p);
            return make_uint4(v.x, v.y, 0u, 0u);
        } else {
            return make_uint4(__ldg((const u32*)p), 0u, 0u, 0u);
        }
    }
    return load_weight_bytes_checked<BITS, NV>(p, K - k0);
}

template <int WF>
QB_DEV float decode_byte(u32 b) {
    if constexpr (WF == DT_E4M3) {
        return e4m3_to_f32(b);
    } else if constexpr (WF == DT_E5M2) {
        return e5m2_to_f32(b);
    } else {
        return (float)(int)(i8)(u8)b;
    }
}

// Weight values 8*sub .. 8*sub+7 of a raw segment `wv` (as loaded by load_weight_bytes) as four 16-bit operand
// words of activation format AF. 8-bit weights decode exactly (their per-row scale is applied in the epilogue);
// 2/4-bit weights are dequantized, (q - shift) * scale, and rounded once to AF, as the reference does.
template <int AF, int WF>
QB_DEV void decode8(const u32* wv, int sub, float scale, float shift, u32* out) {
    float v[8];
    if constexpr (WF == DT_U4) {
        const u32 w = wv[sub];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = ((float)((w >> (4 * i)) & 15u) - shift) * scale;
    } else if constexpr (WF == DT_U2) {
        const u32 w = wv[sub >> 1] >> (16 * (sub & 1));
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = ((float)((w >> (2 * i)) & 3u) - shift) * scale;
    } else {
        const u32 lo = wv[2 * sub], hi = wv[2 * sub + 1];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = decode_byte<WF>((lo >> (8 * i)) & 0xFFu);
            v[i + 4] = decode_byte<WF>((hi >> (8 * i)) & 0xFFu);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = pack_pair<AF>(v[2 * i], v[2 * i + 1]);
}

// --- Fast decoding for the GEMV's unchecked main loop ------------------------------------------------------
//
// Weight values become 16-bit operands with integer and packed-half instructions only (no int->float conversion
// per value): a byte or bit field is put under a "magic" exponent with prmt/lop3 (f16 0x6400 = 1024 has a spacing
// of 1, so 0x6400 | q is 1024 + q exactly; 0x5400 = 64 has a spacing of 1/16, so a field in bits 4-7 reads as
// 64 + q), and one packed subtraction removes the magic. 2/4-bit values are then dequantized with one packed fma,
// q * scale + (-shift * scale). Each result word is one mma operand word: values (2j, 2j + 1) of a sub-step, the
// lower k in the lower half, as decode8 produces them.

template <int AF>
__host__ __device__ constexpr u32 one2() {
    return AF == DT_BF16 ? 0x3F803F80u : 0x3C003C00u;
}

template <int AF>
QB_DEV u32 fma2(u32 a, u32 b, u32 c) {
    if constexpr (AF == DT_BF16) {
        return ptx_fma_rn_bf16x2(a, b, c);
    } else {
        return ptx_fma_rn_f16x2(a, b, c);
    }
}

template <int AF>
QB_DEV float half_to_f32(u32 h) {
    if constexpr (AF == DT_BF16) {
        return bf16_to_f32((u16)h);
    } else {
        return f16_to_f32((u16)h);
    }
}

template <int AF>
QB_DEV u32 f32_to_half(float v) {
    if constexpr (AF == DT_BF16) {
        return f32_to_bf16(v);
    } else {
        return f32_to_f16(v);
    }
}

// Scale and -shift * scale of one group as packed pairs of AF, from 16-bit scale and shift of the same dtype.
// (Folding the magic number into this offset would save an instruction per value pair, but rounding the larger
// offset to 16 bits costs 2-bit weights a percent of a quantization step in bfloat16: measured, rejected.)
template <int AF, int WF>
QB_DEV void affine_pairs(const void* w_scale, const void* w_shift, long long gi, u32* scale2, u32* offset2) {
    const u32 s = ((const u16*)w_scale)[gi];
    const float z = half_to_f32<AF>(((const u16*)w_shift)[gi]);
    *scale2 = s * 0x10001u;
    *offset2 = f32_to_half<AF>(-z * half_to_f32<AF>(s)) * 0x10001u;
}

// Weight values 8*sub .. 8*sub+7 of the 16 raw bytes `wv` as four operand words (see decode8, same result up to
// the rounding of 2/4-bit dequantization: here q * scale + offset, fused, with the offset rounded to AF).
template <int AF, int WF>
QB_DEV void decode8_fast(const u32* wv, int sub, u32 scale2, u32 offset2, u32* out) {
    constexpr bool BF = AF == DT_BF16;
    // 2/4-bit fields are first masked in place (one lop3 per word for all its bytes); prmt then gathers byte b's
    // two fields into the two halves, filling the other bytes from a byte's sign bit (0 after the mask), so one
    // lop3 with one immediate adds the magic exponent.
    if constexpr (WF == DT_U4) {
        const u32 w = wv[sub];
        // Low nibbles stay in bits 0-3 (magic 1024 / 128); high nibbles in bits 4-7 for float16 (magic 64) or
        // shifted to bits 0-3 for bfloat16, whose 7-bit mantissa has no room for them at bit 4 (magic 128).
        const u32 lo = w & 0x0F0F0F0Fu;
        const u32 hi = BF ? (w >> 4) & 0x0F0F0F0Fu : w & 0xF0F0F0F0u;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const u32 q = ptx_prmt(lo, hi, 0x8080u | 0x1010u * b | ((4u + b) << 8) | b) | (BF ? 0x43004300u : 0x54006400u);
            const u32 v = fma2<AF>(q, one2<AF>(), BF ? 0xC300C300u : 0xD400E400u);
            out[b] = fma2<AF>(v, scale2, offset2);
        }
    } else if constexpr (WF == DT_U2) {
        const u32 w = wv[sub >> 1];
        const u32 w2 = w >> 2;
        // Values 0 and 1 of each byte in bits 0-1 (magic 1024 / 128), values 2 and 3 in bits 4-5 (64 / 8).
        const u32 f0 = w & 0x03030303u, f1 = w2 & 0x03030303u, f2 = w & 0x30303030u, f3 = w2 & 0x30303030u;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u32 b = 2u * (sub & 1) + i;
            const u32 sel = 0x8080u | 0x1010u * b | ((4u + b) << 8) | b;
            const u32 q01 = ptx_prmt(f0, f1, sel) | (BF ? 0x43004300u : 0x64006400u);
            const u32 q23 = ptx_prmt(f2, f3, sel) | (BF ? 0x41004100u : 0x54005400u);
            const u32 v01 = fma2<AF>(q01, one2<AF>(), BF ? 0xC300C300u : 0xE400E400u);
            const u32 v23 = fma2<AF>(q23, one2<AF>(), BF ? 0xC100C100u : 0xD400D400u);
            out[2 * i] = fma2<AF>(v01, scale2, offset2);
            out[2 * i + 1] = fma2<AF>(v23, scale2, offset2);
        }
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 w = wv[2 * sub + h];
            if constexpr (WF == DT_I8 && !BF) {
                // Signed byte + 128 under the magic 1024, minus 1152.
                const u32 u = w ^ 0x80808080u;
                out[2 * h] = fma2<AF>(ptx_prmt(u, 0x64646464u, 0x5140u), one2<AF>(), 0xE480E480u);
                out[2 * h + 1] = fma2<AF>(ptx_prmt(u, 0x64646464u, 0x5342u), one2<AF>(), 0xE480E480u);
            } else if constexpr (WF == DT_I8) {
                // bfloat16 has 8 significant bits, too few for a magic number over 256 values: go through float32
                // (2^23 + byte + 128, minus 2^23 + 128) and pack, both exact.
                const u32 u = w ^ 0x80808080u;
                float f[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(ptx_prmt(u, 0x4B000000u, 0x7440u + i)) - 8388736.0f;
                out[2 * h] = pack_pair<AF>(f[0], f[1]);
                out[2 * h + 1] = pack_pair<AF>(f[2], f[3]);
            } else if constexpr (WF == DT_E4M3 && !BF) {
                out[2 * h] = ptx_cvt_rn_f16x2_e4m3x2((u16)w);
                out[2 * h + 1] = ptx_cvt_rn_f16x2_e4m3x2((u16)(w >> 16));
            } else if constexpr (WF == DT_E5M2 && !BF) {
                out[2 * h] = ptx_prmt(w, 0u, 0x1404u);  // e5m2 is the high byte of a float16
                out[2 * h + 1] = ptx_prmt(w, 0u, 0x3424u);
            } else {
                // float8 -> bfloat16: magnitude bits shifted under bfloat16's exponent, sign in bit 15, then a
                // multiply by 2^(127 - bias) rebiases (exact, subnormals included; NaN/inf codes, which
                // quantization never writes, come out finite).
                constexpr int SHIFT = WF == DT_E4M3 ? 4 : 5;
                constexpr u32 REBIAS = WF == DT_E4M3 ? 0x7B807B80u : 0x77807780u;  // 2^120, 2^112
                const u32 mag = w & 0x7F7F7F7Fu, sgn = w & 0x80808080u;
                out[2 * h] = fma2<AF>((ptx_prmt(mag, 0u, 0x4140u) << SHIFT) | ptx_prmt(sgn, 0u, 0x1404u), REBIAS,
                                      0x80008000u);
                out[2 * h + 1] = fma2<AF>((ptx_prmt(mag, 0u, 0x4342u) << SHIFT) | ptx_prmt(sgn, 0u, 0x3424u),
                                          REBIAS, 0x80008000u);
            }
        }
    }
}

// The arguments every GEMV/GEMM kernel takes, in this order (see quanto_backend/kernels/launch.py):
//   x [M, K] activations (16-bit, or int8/float8 quantized); w [N, w_row_bytes] weight;
//   w_scale [N] (8-bit) or [N, n_groups] (2/4-bit), w_shift [N, n_groups] (2/4-bit, same dtype as w_scale);
//   x_scale float32, one value or one per row (x_scale_stride 0 or 1; quantized activations only);
//   bias [N] or null; out [M, N].
#define QB_MATMUL_PARAMS                                                                                    \
    const void *__restrict__ x, const void *__restrict__ w, const void *__restrict__ w_scale,                \
        const void *__restrict__ w_shift, const float *__restrict__ x_scale, const void *__restrict__ bias, \
        void *__restrict__ out, int M, int N, int K, int w_row_bytes, int n_groups, int group_size,         \
        int x_scale_stride, int scale_dt, int bias_dt, int out_dt, int x_vec, int w_vec

// Writes out[m, n] from the accumulator. Quantized activations reproduce the reference's two roundings,
// round(round(acc * x_scale * w_scale) + round(bias)); weight-only output rounds once. Not inlined: the GEMM calls
// it 64 times per thread, and inlining its dtype switches that often multiplies code size and compile time.
template <int AF, int WF>
__device__ __noinline__ void store_output(Acc<AF> acc, int m, int n, int N, const float* x_scale, int x_scale_stride,
                         const void* w_scale, int scale_dt, const void* bias, int bias_dt, void* out, int out_dt) {
    float r;
    if constexpr (act_bytes<AF>() == 1) {
        r = ((float)acc * x_scale[(long long)m * x_scale_stride]) * load_float(w_scale, n, scale_dt);
        if (bias != nullptr) r = round_to(r, out_dt) + round_to(load_float(bias, n, bias_dt), out_dt);
    } else {
        r = acc;
        if constexpr (!is_affine<WF>()) r *= load_float(w_scale, n, scale_dt);
        if (bias != nullptr) r += load_float(bias, n, bias_dt);
    }
    store_float(out, (long long)m * N + n, out_dt, r);
}
