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
#include "mma.cuh"

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
    for (int step = warp; step < steps; step += 8) {
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
