// Decode GEMV for small M (1..16 rows of activations): out[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias).
//
// Memory-bound, so each weight byte is read exactly once with 16-byte loads and the arithmetic runs on tensor
// cores: M <= 16 fills one m16 tile, so a warp computes an m16 x n8 output tile (its 8 weight rows) with mma,
// whatever M is, at the cost of reading only as many activation rows as exist.
//
// K is permuted inside a warp step (a dot product does not care about the order of k): lane (g, t) loads the 16
// consecutive weight bytes of row n0 + g holding values [k0, k0 + SEG) with k0 = step * 4 * SEG + t * SEG, and the
// activation values [k0, k0 + SEG) of rows g and g + 8, and feeds them to consecutive mma k-steps in the word
// order of mma.cuh. A and B lanes with the same t use the same k for the same fragment position, so the products
// pair up correctly.
//
// Launch: block 256 (8 warps), grid (ceil(N / 8)). The 8 warps of a block share its 8 output rows and split K
// (warp w takes steps w, w + 8, ...); their partial tiles are summed through shared memory.
//
// Fast by construction (bench/sass.py measures the main loop): when rows are 16-byte aligned (and 2/4-bit groups
// are a power of two with 16-bit scales of the activations' dtype), the steps whose values all lie below K run
// an unchecked loop: plain 16-byte loads, two steps per iteration so that each lane has two independent weight
// loads in flight, weights decoded with magic numbers and packed half math (decode8_fast), group index a shift.
// Activation rows past M and weight rows past N read row 0 instead of being tested (their outputs are never
// stored), and for M <= 8 the unused rows 8..15 of the mma tile carry the other half of row 0..7's values
// (gemv_step_fast). The last, partial steps and unaligned tensors take the bounds-checked loop.
#include "mma.cuh"

// One step of the unchecked loop: the lane's 16 weight bytes `raw` against activation values [k0, k0 + SEG) of
// rows g (`xa`) and g + 8 (`xb`), both pointers at value k0.
//
// M > 8: the A fragment interleaves the two rows, {xa.x, xb.x, xa.y, xb.y}, as mma.cuh's layout says.
// M <= 8: rows 8..15 of the tile would be zeros; instead the 16 loaded bytes of row g are the A fragment as they
// are, {x, y, z, w}, twice: against B = the weight words of x and z, tile row g sums x and z (into `c`), and
// against B = the words of y and w, tile row g + 8 sums y and w (into `c_hi`); rows g of `c_hi` and g + 8 of `c`
// are junk, dropped when the caller adds c_hi's rows 8..15 to c's rows 0..7. No register moves, no zero loads.
template <int AF, int WF, bool HI>
QB_DEV void gemv_step_fast(Acc<AF>* c, Acc<AF>* c_hi, uint4 raw, const u8* xa, const u8* xb, const u32* scale2,
                           const u32* offset2) {
    constexpr int AB = act_bytes<AF>();
    constexpr int SEG = 128 / weight_bits<WF>();
    constexpr int SUB = 16 / AB;
    constexpr int NSUB = SEG / SUB;
    const u32 wv[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int s = 0; s < NSUB; ++s) {
        const uint4 va = __ldg((const uint4*)(xa + 16 * s));
        u32 b[4];
        if constexpr (AB == 1) {
            b[0] = wv[0];
            b[1] = wv[1];
            b[2] = wv[2];
            b[3] = wv[3];
        } else {
            const int piece = (s * SUB) / 32;
            decode8_fast<AF, WF>(wv, s, scale2[piece], offset2[piece], b);
        }
        if constexpr (HI) {
            const uint4 vb = __ldg((const uint4*)(xb + 16 * s));
            const u32 a_lo[4] = {va.x, vb.x, va.y, vb.y};
            mma<AF, WF>(c, a_lo, b[0], b[1]);
            const u32 a_hi[4] = {va.z, vb.z, va.w, vb.w};
            mma<AF, WF>(c, a_hi, b[2], b[3]);
        } else {
            const u32 a[4] = {va.x, va.y, va.z, va.w};
            mma<AF, WF>(c, a, b[0], b[2]);
            mma<AF, WF>(c_hi, a, b[1], b[3]);
        }
    }
}

// The unchecked loop over this warp's steps `step`, `step + 8`, ... below `full`; returns the first step left.
// ONE_GROUP: the lane's 16 weight bytes lie in one group (group_size >= values in 16 bytes), so one scale and
// shift serve all their 32-value pieces.
template <int AF, int WF, bool HI, bool ONE_GROUP>
QB_DEV int gemv_fast_loop(Acc<AF>* c, int step, int full, const u8* wrow, const u8* xa, const u8* xb,
                          const void* w_scale, const void* w_shift, long long group_row, int group_shift) {
    constexpr int AB = act_bytes<AF>();
    constexpr int BITS = weight_bits<WF>();
    constexpr int SEG = 128 / BITS;
    constexpr int PIECES = SEG >= 32 ? SEG / 32 : 1;
    constexpr int SPAN = 4 * SEG;                 // values per warp step
    constexpr int W_STRIDE = 8 * SPAN * BITS / 8;  // bytes between a warp's consecutive steps
    constexpr int X_STRIDE = 8 * SPAN * AB;
    const int t = (threadIdx.x & 31) & 3;
    int k0 = step * SPAN + t * SEG;
    const u8* wp = wrow + k0 * BITS / 8;
    const u8* ap = xa + (long long)k0 * AB;
    const u8* bp = xb + (long long)k0 * AB;
    u32 scale2[2][PIECES], offset2[2][PIECES];
    auto group_params = [&](int kk, int u) {
        if constexpr (is_affine<WF>()) {
#pragma unroll
            for (int p = 0; p < PIECES; ++p) {
                if (ONE_GROUP && p > 0) {
                    scale2[u][p] = scale2[u][0];
                    offset2[u][p] = offset2[u][0];
                } else {
                    affine_pairs<AF, WF>(w_scale, w_shift, group_row + ((kk + 32 * p) >> group_shift),
                                         &scale2[u][p], &offset2[u][p]);
                }
            }
        }
    };
    Acc<AF> c_hi[4] = {0, 0, 0, 0};
#pragma unroll 1
    for (; step + 8 < full; step += 16) {
        const uint4 w0 = __ldg((const uint4*)wp);
        const uint4 w1 = __ldg((const uint4*)(wp + W_STRIDE));
        group_params(k0, 0);
        group_params(k0 + 8 * SPAN, 1);
        gemv_step_fast<AF, WF, HI>(c, c_hi, w0, ap, bp, scale2[0], offset2[0]);
        gemv_step_fast<AF, WF, HI>(c, c_hi, w1, ap + X_STRIDE, bp + X_STRIDE, scale2[1], offset2[1]);
        k0 += 16 * SPAN;
        wp += 2 * W_STRIDE;
        ap += 2 * X_STRIDE;
        bp += 2 * X_STRIDE;
    }
    if (step < full) {
        const uint4 w0 = __ldg((const uint4*)wp);
        group_params(k0, 0);
        gemv_step_fast<AF, WF, HI>(c, c_hi, w0, ap, bp, scale2[0], offset2[0]);
        step += 8;
    }
    if constexpr (!HI) {
        c[0] += c_hi[2];
        c[1] += c_hi[3];
    }
    return step;
}

template <int AF, int WF>
__global__ void __launch_bounds__(256) qb_gemv(QB_MATMUL_PARAMS) {
    using A = Acc<AF>;
    constexpr int AB = act_bytes<AF>();
    constexpr int SEG = 128 / weight_bits<WF>();  // weight values in 16 bytes
    constexpr int SUB = 16 / AB;                  // activation values in 16 bytes: two mma k-steps
    constexpr int NSUB = SEG / SUB;
    constexpr int PIECES = SEG >= 32 ? SEG / 32 : 1;  // 2/4-bit groups are multiples of 32 values
    static_assert(AB == 2 || weight_bits<WF>() == 8, "quantized activations pair with 8-bit weights");

    __shared__ A red[8][32][4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n = blockIdx.x * 8 + g;
    const bool n_ok = n < N;
    const u8* wrow = (const u8*)w + (long long)(n_ok ? n : 0) * w_row_bytes;
    const bool m0_ok = g < M, m1_ok = g + 8 < M;
    const u8* xrow0 = (const u8*)x + (long long)g * K * AB;
    const u8* xrow1 = (const u8*)x + (long long)(g + 8) * K * AB;

    A c[4] = {0, 0, 0, 0};
    const int span = 4 * SEG;
    const int steps = (K + span - 1) / span;
    int step = warp;
    int group_shift = 0;
    bool fast = x_vec && w_vec;
    if constexpr (is_affine<WF>()) {
        while ((1 << group_shift) < group_size) ++group_shift;
        fast = fast && (1 << group_shift) == group_size && scale_dt == AF;
    }
    if (fast) {
        const u8* xa = (const u8*)x + (long long)(m0_ok ? g : 0) * K * AB;
        const u8* xb = (const u8*)x + (long long)(m1_ok ? g + 8 : 0) * K * AB;
        const long long group_row = (long long)(n_ok ? n : 0) * n_groups;
        constexpr bool PIECED = SEG > 32;  // 2-bit: two 32-value pieces per 16 bytes, maybe in two groups
        if (M > 8) {
            if (PIECED && group_size < SEG) {
                step = gemv_fast_loop<AF, WF, true, false>(c, step, K / span, wrow, xa, xb, w_scale, w_shift,
                                                           group_row, group_shift);
            } else {
                step = gemv_fast_loop<AF, WF, true, true>(c, step, K / span, wrow, xa, xb, w_scale, w_shift,
                                                          group_row, group_shift);
            }
        } else {
            if (PIECED && group_size < SEG) {
                step = gemv_fast_loop<AF, WF, false, false>(c, step, K / span, wrow, xa, xb, w_scale, w_shift,
                                                            group_row, group_shift);
            } else {
                step = gemv_fast_loop<AF, WF, false, true>(c, step, K / span, wrow, xa, xb, w_scale, w_shift,
                                                           group_row, group_shift);
            }
        }
    }
    // The bounds-checked loop: the last, partial steps, and every step of unaligned tensors.
    for (; step < steps; step += 8) {
        const int k0 = step * span + t * SEG;
        const uint4 raw = n_ok ? load_weight_bytes<weight_bits<WF>(), SEG>(wrow, k0, K, w_vec) : zero4();
        const u32 wv[4] = {raw.x, raw.y, raw.z, raw.w};
        float gscale[PIECES], gshift[PIECES];
#pragma unroll
        for (int p = 0; p < PIECES; ++p) {
            gscale[p] = 0.0f;
            gshift[p] = 0.0f;
            if constexpr (is_affine<WF>()) {
                const int kp = k0 + 32 * p;
                if (n_ok && kp < K) {
                    const long long gi = (long long)n * n_groups + kp / group_size;
                    gscale[p] = load_float(w_scale, gi, scale_dt);
                    gshift[p] = load_float(w_shift, gi, scale_dt);
                }
            }
        }
#pragma unroll
        for (int s = 0; s < NSUB; ++s) {
            const int kk = k0 + s * SUB;
            const uint4 xa = m0_ok ? load_act16<AB>(xrow0, kk, K, x_vec) : zero4();
            const uint4 xb = m1_ok ? load_act16<AB>(xrow1, kk, K, x_vec) : zero4();
            u32 b[4];
            if constexpr (AB == 1) {
                b[0] = wv[0];
                b[1] = wv[1];
                b[2] = wv[2];
                b[3] = wv[3];
            } else {
                decode8<AF, WF>(wv, s, gscale[(s * SUB) / 32], gshift[(s * SUB) / 32], b);
            }
            const u32 a_lo[4] = {xa.x, xb.x, xa.y, xb.y};
            mma<AF, WF>(c, a_lo, b[0], b[1]);
            const u32 a_hi[4] = {xa.z, xb.z, xa.w, xb.w};
            mma<AF, WF>(c, a_hi, b[2], b[3]);
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][i] = c[i];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            A sum = 0;
#pragma unroll
            for (int v = 0; v < 8; ++v) sum += red[v][lane][i];
            const int m = g + 8 * (i >> 1);
            const int nn = blockIdx.x * 8 + 2 * t + (i & 1);
            if (m < M && nn < N) {
                store_output<AF, WF>(sum, m, nn, N, x_scale, x_scale_stride, w_scale, scale_dt, bias, bias_dt, out,
                                     out_dt);
            }
        }
    }
}
