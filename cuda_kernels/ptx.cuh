// Every inline-PTX instruction of the kernels, each behind one small function named after the instruction.
//
// On the GPU each function is exactly its instruction. In the CPU build of tests/kernels_cpu (its SIMT shim defines
// QB_CPU_SIMT) each is a C++ model of the instruction written from the PTX ISA: the conversions round as the ISA
// says, and the warp-wide mma.sync gathers the fragments of the 32 lanes of its warp and places every element by
// the ISA's fragment-layout tables ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k32"), independently of the
// layout comments of mma.cuh. So the kernel bodies are the same text in both builds, and a wrong fragment index in
// a kernel gives wrong numbers on the CPU too.
#pragma once

#define QB_PTX __device__ __forceinline__

#ifndef QB_CPU_SIMT

// cvt.f32.f16: exact.
QB_PTX float ptx_cvt_f32_f16(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// cvt.rn.f16.f32: round to nearest even.
QB_PTX unsigned short ptx_cvt_rn_f16_f32(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// cvt.rn.bf16.f32: round to nearest even.
QB_PTX unsigned short ptx_cvt_rn_bf16_f32(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// cvt.rn.f16x2.f32 d, a, b: a into the upper half of d, b into the lower half.
QB_PTX unsigned int ptx_cvt_rn_f16x2_f32(float a, float b) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(a), "f"(b));
    return r;
}

// cvt.rn.bf16x2.f32 d, a, b: a into the upper half of d, b into the lower half.
QB_PTX unsigned int ptx_cvt_rn_bf16x2_f32(float a, float b) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(a), "f"(b));
    return r;
}

// d = a * b + d, mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32.
template <bool BF16>
QB_PTX void ptx_mma_m16n8k16_f32(float* d, const unsigned int* a, const unsigned int* b) {
    if constexpr (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// d = a * b + d, mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (exact).
QB_PTX void ptx_mma_m16n8k32_s32_s8(int* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d = a * b + d, mma.sync.aligned.m16n8k32.row.col.f32.{e4m3,e5m2}.{e4m3,e5m2}.f32 (sm_89+).
template <bool A_E5M2, bool B_E5M2>
QB_PTX void ptx_mma_m16n8k32_f32_f8(float* d, const unsigned int* a, const unsigned int* b) {
#if __CUDA_ARCH__ >= 890
#define QB_MMA_FP8(ATYPE, BTYPE)                                                                         \
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32." ATYPE "." BTYPE                                \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                           \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
    if constexpr (!A_E5M2 && !B_E5M2) {
        QB_MMA_FP8("e4m3", "e4m3");
    } else if constexpr (!A_E5M2 && B_E5M2) {
        QB_MMA_FP8("e4m3", "e5m2");
    } else if constexpr (A_E5M2 && !B_E5M2) {
        QB_MMA_FP8("e5m2", "e4m3");
    } else {
        QB_MMA_FP8("e5m2", "e5m2");
    }
#undef QB_MMA_FP8
#else
    // float8 tensor cores need sm_89; the Python side never launches these kernels on older GPUs.
    __trap();
#endif
}

// prmt.b32 d, a, b, c: byte i of d is byte (c >> 4i) & 7 of the 8 bytes {b, a} (a = bytes 0-3), or, when bit
// 4i + 3 of c is set, that byte's sign bit copied into all 8 bits.
QB_PTX unsigned int ptx_prmt(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// fma.rn.f16x2 d, a, b, c: both halves d = a * b + c, rounded once to nearest even.
QB_PTX unsigned int ptx_fma_rn_f16x2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// fma.rn.bf16x2 d, a, b, c (sm_80+): both halves d = a * b + c, rounded once to nearest even.
QB_PTX unsigned int ptx_fma_rn_bf16x2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// cvt.rn.f16x2.e4m3x2 d, a (sm_89+; exact): the low byte of a into the low half of d, the high byte into the
// high half. Older GPUs get the same result from integer arithmetic (e4m3fn fits float16 8 binades low).
QB_PTX unsigned int ptx_cvt_rn_f16x2_e4m3x2(unsigned short a) {
#if __CUDA_ARCH__ >= 890
    unsigned int d;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(a));
    return d;
#else
    const unsigned int v = a;
    const unsigned int t = ((v & 0x7Fu) | ((v & 0x7F00u) << 8)) << 7 | ((v & 0x80u) | ((v & 0x8000u) << 8)) << 8;
    unsigned int d = ptx_fma_rn_f16x2(t, 0x5C005C00u, 0x80008000u);  // * 256 (2^8), exact, keeps the sign of 0
    if ((v & 0x7Fu) == 0x7Fu) d |= 0x7FFFu;
    if ((v & 0x7F00u) == 0x7F00u) d |= 0x7FFF0000u;
    return d;
#endif
}

#else  // QB_CPU_SIMT: models of the instructions above.

namespace qb_ptx_model {

inline unsigned int bits_of(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}

inline float float_of(unsigned int u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// IEEE binary16 through the compiler's _Float16 (exact widening, round-to-nearest-even narrowing).
inline float f16_bits_to_f32(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
}

inline unsigned short f32_to_f16_bits_rn(float f) {
    if (f != f) return 0x7FFF;  // the ISA's canonical NaN
    const _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}

inline unsigned short f32_to_bf16_bits_rn(float f) {
    if (f != f) return 0x7FFF;
    unsigned int u = bits_of(f);
    u += 0x7FFFu + ((u >> 16) & 1u);  // ties to even; overflow carries into the exponent (to infinity)
    return (unsigned short)(u >> 16);
}

inline float bf16_bits_to_f32(unsigned short h) { return float_of(((unsigned int)h) << 16); }

// float8 e4m3 (the ISA's .e4m3 is e4m3fn: no infinities, S.1111.111 is NaN) and e5m2 (IEEE-like), by their fields.
inline float e4m3_to_f32(unsigned int b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float sign = (b & 0x80u) ? -1.0f : 1.0f;
    if (e == 15 && m == 7) return float_of(0x7FC00000u);
    if (e == 0) return sign * __builtin_ldexpf((float)m, -9);
    return sign * __builtin_ldexpf((float)(8 + m), e - 10);
}

inline float e5m2_to_f32(unsigned int b) {
    const int e = (b >> 2) & 31, m = b & 3;
    const float sign = (b & 0x80u) ? -1.0f : 1.0f;
    if (e == 31) return m ? float_of(0x7FC00000u) : sign * __builtin_inff();
    if (e == 0) return sign * __builtin_ldexpf((float)m, -16);
    return sign * __builtin_ldexpf((float)(4 + m), e - 17);
}

// Element `i` of the fragment of one lane, with `per` elements per 32-bit register, lowest index in the lowest bits.
inline unsigned int element(const unsigned int* regs, int i, int per) {
    const int width = 32 / per;
    const unsigned int r = regs[i / per] >> (width * (i % per));
    return width == 32 ? r : r & ((1u << width) - 1u);
}

// The fragments of one lane, as exchanged among the 32 lanes of a warp.
struct MmaFragments {
    unsigned int a[4];
    unsigned int b[2];
};

// Row/column of element i of the A, B and C fragments of lane (groupID = lane >> 2, threadID_in_group = lane % 4),
// as tabulated by the PTX ISA for mma.m16n8k16 (16-bit A/B, 8 elements of A and 4 of B per lane) and
// mma.m16n8k32 (8-bit A/B, 16 elements of A and 8 of B per lane). C/D is the same for both: 4 elements per lane.
template <int K>
inline void a_position(int lane, int i, int* row, int* col) {
    const int group = lane >> 2, tig = lane & 3;
    if constexpr (K == 16) {
        *row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
        *col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    } else {
        *row = (i < 4 || (i >= 8 && i < 12)) ? group : group + 8;
        *col = tig * 4 + (i & 3) + (i >= 8 ? 16 : 0);
    }
}

template <int K>
inline void b_position(int lane, int i, int* row, int* col) {
    const int group = lane >> 2, tig = lane & 3;
    if constexpr (K == 16) {
        *row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    } else {
        *row = tig * 4 + (i & 3) + (i >= 4 ? 16 : 0);
    }
    *col = group;
}

inline void c_position(int lane, int i, int* row, int* col) {
    *row = (lane >> 2) + (i >= 2 ? 8 : 0);
    *col = (lane & 3) * 2 + (i & 1);
}

// d = a * b + d for this lane: gathers all 32 lanes' fragments (a warp-collective step of the shim), rebuilds the
// 16 x K matrix A and the K x 8 matrix B from the tables, and computes this lane's four elements of D. T is the
// accumulator (int: exact; float: products and sums in double, rounded once, which a tensor core's fp32
// accumulation matches to well within the tests' tolerance). Decode turns an element's bits into a value.
template <int K, class T, class DecodeA, class DecodeB>
inline void mma(T* d, const unsigned int* a, const unsigned int* b, DecodeA decode_a, DecodeB decode_b) {
    constexpr int A_PER = K == 16 ? 2 : 4, B_PER = A_PER;  // elements per 32-bit register
    MmaFragments mine;
    for (int r = 0; r < 4; ++r) mine.a[r] = a[r];
    for (int r = 0; r < 2; ++r) mine.b[r] = b[r];
    const MmaFragments* all = qb_warp_gather(mine, "mma.sync");
    using V = typename std::conditional<std::is_same<T, int>::value, long long, double>::type;
    V A[16][K], B[K][8];
    for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 4 * A_PER; ++i) {
            int row, col;
            a_position<K>(lane, i, &row, &col);
            A[row][col] = (V)decode_a(element(all[lane].a, i, A_PER));
        }
        for (int i = 0; i < 2 * B_PER; ++i) {
            int row, col;
            b_position<K>(lane, i, &row, &col);
            B[row][col] = (V)decode_b(element(all[lane].b, i, B_PER));
        }
    }
    const int lane = qb_lane_id();
    for (int i = 0; i < 4; ++i) {
        int row, col;
        c_position(lane, i, &row, &col);
        V acc = (V)d[i];
        for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
        d[i] = (T)acc;
    }
}

// Rounds a double to `p` significant bits with round-to-nearest-even, flushing nothing: below the smallest normal
// (2^(e_min - 1)) the spacing stays that of the smallest binade, as IEEE subnormals; beyond `max` it overflows
// to infinity. Used to round the exact results of packed half-precision fma.
inline double round_to_format(double v, int p, int e_min, double max) {
    if (v == 0 || v != v || __builtin_isinf(v)) return v;
    int e;
    __builtin_frexp(v, &e);  // v = m * 2^e, 0.5 <= |m| < 1
    if (e < e_min) e = e_min;
    const double r = __builtin_ldexp(__builtin_nearbyint(__builtin_ldexp(v, p - e)), e - p);
    return __builtin_fabs(r) > max ? __builtin_copysign(__builtin_inf(), v) : r;
}

inline unsigned short f64_to_f16_bits_rn(double v) {
    if (v != v) return 0x7FFF;
    return f32_to_f16_bits_rn((float)round_to_format(v, 11, -13, 65504.0));  // exact in float: no second rounding
}

inline unsigned short f64_to_bf16_bits_rn(double v) {
    if (v != v) return 0x7FFF;
    return f32_to_bf16_bits_rn((float)round_to_format(v, 8, -125, 3.3895313892515355e38));
}

template <bool BF16>
inline unsigned int fma_x2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d = 0;
    for (int half = 0; half < 2; ++half) {
        const int sh = 16 * half;
        const unsigned short ah = (unsigned short)(a >> sh), bh = (unsigned short)(b >> sh), ch = (unsigned short)(c >> sh);
        const double x = BF16 ? bf16_bits_to_f32(ah) : f16_bits_to_f32(ah);
        const double y = BF16 ? bf16_bits_to_f32(bh) : f16_bits_to_f32(bh);
        const double z = BF16 ? bf16_bits_to_f32(ch) : f16_bits_to_f32(ch);
        // x * y is exact in double (at most 22 significant bits); adding z rounds only when the exponents are
        // far apart, where the second rounding to 11 or 8 bits cannot see the difference.
        const double r = __builtin_fma(x, y, z);
        const unsigned short rh = BF16 ? f64_to_bf16_bits_rn(r) : f64_to_f16_bits_rn(r);
        d |= (unsigned int)rh << sh;
    }
    return d;
}

inline float decode_f16(unsigned int e) { return f16_bits_to_f32((unsigned short)e); }
inline float decode_bf16(unsigned int e) { return bf16_bits_to_f32((unsigned short)e); }
inline int decode_s8(unsigned int e) { return (int)(signed char)(unsigned char)e; }

}  // namespace qb_ptx_model

QB_PTX float ptx_cvt_f32_f16(unsigned short h) { return qb_ptx_model::f16_bits_to_f32(h); }
QB_PTX unsigned short ptx_cvt_rn_f16_f32(float f) { return qb_ptx_model::f32_to_f16_bits_rn(f); }
QB_PTX unsigned short ptx_cvt_rn_bf16_f32(float f) { return qb_ptx_model::f32_to_bf16_bits_rn(f); }

QB_PTX unsigned int ptx_cvt_rn_f16x2_f32(float a, float b) {
    return ((unsigned int)qb_ptx_model::f32_to_f16_bits_rn(a) << 16) | qb_ptx_model::f32_to_f16_bits_rn(b);
}

QB_PTX unsigned int ptx_cvt_rn_bf16x2_f32(float a, float b) {
    return ((unsigned int)qb_ptx_model::f32_to_bf16_bits_rn(a) << 16) | qb_ptx_model::f32_to_bf16_bits_rn(b);
}

template <bool BF16>
QB_PTX void ptx_mma_m16n8k16_f32(float* d, const unsigned int* a, const unsigned int* b) {
    if constexpr (BF16) {
        qb_ptx_model::mma<16>(d, a, b, qb_ptx_model::decode_bf16, qb_ptx_model::decode_bf16);
    } else {
        qb_ptx_model::mma<16>(d, a, b, qb_ptx_model::decode_f16, qb_ptx_model::decode_f16);
    }
}

QB_PTX void ptx_mma_m16n8k32_s32_s8(int* d, const unsigned int* a, const unsigned int* b) {
    qb_ptx_model::mma<32>(d, a, b, qb_ptx_model::decode_s8, qb_ptx_model::decode_s8);
}

template <bool A_E5M2, bool B_E5M2>
QB_PTX void ptx_mma_m16n8k32_f32_f8(float* d, const unsigned int* a, const unsigned int* b) {
    auto decode_a = A_E5M2 ? qb_ptx_model::e5m2_to_f32 : qb_ptx_model::e4m3_to_f32;
    auto decode_b = B_E5M2 ? qb_ptx_model::e5m2_to_f32 : qb_ptx_model::e4m3_to_f32;
    qb_ptx_model::mma<32>(d, a, b, decode_a, decode_b);
}

QB_PTX unsigned int ptx_prmt(unsigned int a, unsigned int b, unsigned int c) {
    const unsigned long long bytes = ((unsigned long long)b << 32) | a;
    unsigned int d = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned int sel = (c >> (4 * i)) & 15u;
        unsigned int byte = (unsigned int)(bytes >> (8 * (sel & 7u))) & 0xFFu;
        if (sel & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
        d |= byte << (8 * i);
    }
    return d;
}

QB_PTX unsigned int ptx_fma_rn_f16x2(unsigned int a, unsigned int b, unsigned int c) {
    return qb_ptx_model::fma_x2<false>(a, b, c);
}

QB_PTX unsigned int ptx_fma_rn_bf16x2(unsigned int a, unsigned int b, unsigned int c) {
    return qb_ptx_model::fma_x2<true>(a, b, c);
}

QB_PTX unsigned int ptx_cvt_rn_f16x2_e4m3x2(unsigned short a) {
    const unsigned int lo = qb_ptx_model::f32_to_f16_bits_rn(qb_ptx_model::e4m3_to_f32(a & 0xFFu));
    const unsigned int hi = qb_ptx_model::f32_to_f16_bits_rn(qb_ptx_model::e4m3_to_f32(a >> 8));
    return lo | (hi << 16);
}

#endif  // QB_CPU_SIMT
