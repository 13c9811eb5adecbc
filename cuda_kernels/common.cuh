// Shared helpers of the quanto_backend kernels.
//
// The sources include no CUDA header on purpose: NVRTC then needs no include path, so they compile the same way
// on a GPU machine, in CI without a GPU, and from a wheel. Half-precision and float8 conversions are written with
// PTX `cvt` instructions (behind the helpers of ptx.cuh) and integer arithmetic instead of cuda_fp16.h /
// cuda_bf16.h / cuda_fp8.h.
#pragma once
#include "ptx.cuh"

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// Codes of the element types, shared with quanto_backend/kernels/launch.py (DTYPE_CODES).
enum DType {
    DT_F32 = 0,
    DT_F16 = 1,
    DT_BF16 = 2,
    DT_I8 = 3,
    DT_U8 = 4,
    DT_E4M3 = 5,
    DT_E5M2 = 6,
    // Packed weight formats (GEMV/GEMM template arguments only).
    DT_U4 = 7,
    DT_U2 = 8,
};

#define QB_DEV __device__ __forceinline__

QB_DEV float f16_to_f32(u16 h) { return ptx_cvt_f32_f16(h); }

QB_DEV u16 f32_to_f16(float f) { return ptx_cvt_rn_f16_f32(f); }

QB_DEV float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

QB_DEV u16 f32_to_bf16(float f) { return ptx_cvt_rn_bf16_f32(f); }

// float8 -> float, exact. e4m3fn shifted into a float16 lands 8 binades low (bias 7 vs 15) with subnormals handled
// by the float16 hardware conversion, so one multiply by 2^8 rebiases it; 0x7f/0xff are e4m3fn's NaNs.
QB_DEV float e4m3_to_f32(u32 b) {
    const u16 h = (u16)(((b & 0x7Fu) << 7) | ((b & 0x80u) << 8));
    const float f = f16_to_f32(h) * 256.0f;
    return (b & 0x7Fu) == 0x7Fu ? __uint_as_float(0x7FC00000u) : f;
}

// e5m2 is the high byte of a float16.
QB_DEV float e5m2_to_f32(u32 b) { return f16_to_f32((u16)((b & 0xFFu) << 8)); }

// float -> float8 with saturation to the finite range (the reference clamps before its cast) and round to nearest
// even, as torch's conversion does.
QB_DEV u8 f32_to_e4m3(float x) {
    const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    if (a != a) return (u8)(sign | 0x7Fu);
    a = fminf(a, 448.0f);
    if (a < 0.015625f) {  // below 2^-6: subnormal, in units of 2^-9 (8 units carry into the smallest normal)
        return (u8)(sign | (u32)rintf(a * 512.0f));
    }
    u32 v = __float_as_uint(a);
    v += 0x7FFFFu + ((v >> 20) & 1u);  // round the mantissa to 3 bits, ties to even
    const u32 e = (v >> 23) - 120u;     // rebias 127 -> 7
    return (u8)(sign | (e << 3) | ((v >> 20) & 7u));
}

QB_DEV u8 f32_to_e5m2(float x) {
    const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    if (a != a) return (u8)(sign | 0x7Fu);
    a = fminf(a, 57344.0f);
    if (a < 6.103515625e-05f) {  // below 2^-14: subnormal, in units of 2^-16
        return (u8)(sign | (u32)rintf(a * 65536.0f));
    }
    u32 v = __float_as_uint(a);
    v += 0xFFFFFu + ((v >> 21) & 1u);  // round the mantissa to 2 bits, ties to even
    const u32 e = (v >> 23) - 112u;     // rebias 127 -> 15
    return (u8)(sign | (e << 2) | ((v >> 21) & 3u));
}

// Element i of a float tensor whose dtype is only known at run time (scales, biases: small and cached).
QB_DEV float load_float(const void* p, long long i, int dt) {
    switch (dt) {
        case DT_F16: return f16_to_f32(((const u16*)p)[i]);
        case DT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

// Element i of any supported tensor as a float (activations and weights of the elementwise kernels).
QB_DEV float load_any(const void* p, long long i, int dt) {
    switch (dt) {
        case DT_F16: return f16_to_f32(((const u16*)p)[i]);
        case DT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        case DT_I8: return (float)((const i8*)p)[i];
        case DT_U8: return (float)((const u8*)p)[i];
        case DT_E4M3: return e4m3_to_f32(((const u8*)p)[i]);
        case DT_E5M2: return e5m2_to_f32(((const u8*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

// Rounds v to the element type dt and back, so that an epilogue can reproduce a reference that rounds twice.
QB_DEV float round_to(float v, int dt) {
    switch (dt) {
        case DT_F16: return f16_to_f32(f32_to_f16(v));
        case DT_BF16: return bf16_to_f32(f32_to_bf16(v));
        default: return v;
    }
}

QB_DEV void store_float(void* p, long long i, int dt, float v) {
    switch (dt) {
        case DT_F16: ((u16*)p)[i] = f32_to_f16(v); break;
        case DT_BF16: ((u16*)p)[i] = f32_to_bf16(v); break;
        default: ((float*)p)[i] = v; break;
    }
}

// Symmetric quantization of one value already divided by its scale: int8 rounds half to even then clamps to
// [-128, 127] (reference.quantize_symmetric); float8 saturates and rounds.
QB_DEV u8 quantize_value(float scaled, int out_dt) {
    if (out_dt == DT_E4M3) return f32_to_e4m3(scaled);
    if (out_dt == DT_E5M2) return f32_to_e5m2(scaled);
    const float r = fminf(fmaxf(rintf(scaled), -128.0f), 127.0f);
    return (u8)(i8)(int)r;
}

// Two floats as the 32-bit operand of a 16-bit mma: `lo` (the lower k index) in bits 0-15.
template <int AF>
QB_DEV u32 pack_pair(float lo, float hi) {
    if constexpr (AF == DT_BF16) {
        return ptx_cvt_rn_bf16x2_f32(hi, lo);
    } else {
        return ptx_cvt_rn_f16x2_f32(hi, lo);
    }
}

// Sums v over the 32 lanes of a warp; every lane gets the result.
QB_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

QB_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}
