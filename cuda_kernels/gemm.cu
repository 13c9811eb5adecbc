// Tensor-core GEMM for large M: out[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias).
//
//  * quantized activations (AF = int8 / float8) with 8-bit weights: both operands are copied to shared memory as
//    they are and multiplied by mma.m16n8k32 (s8 -> s32, or e4m3/e5m2 -> f32 on sm_89+); activation and weight
//    scales are applied in the epilogue.
//  * 16-bit activations (weight-only quantization): weight tiles are dequantized into shared memory in the
//    activation's format (8-bit exactly, with the row scale applied in the epilogue; 2/4-bit as
//    (q - shift) * scale) and multiplied by mma.m16n8k16 with float32 accumulation.
//
// Tiles: 128 x 128 outputs per block of 256 threads (8 warps as 2 x 4, each 64 x 32 = 4 x 4 mma tiles), a k-tile
// of 64 bytes per row (64 values of 8-bit, 32 of 16-bit operands), two shared-memory stages. The next k-tile is
// loaded into registers while the current one is multiplied. Rows are padded to 80 bytes, which makes the fragment
// loads of mma.cuh's layout free of bank conflicts. Launch: block 256, grid (ceil(N / 128), ceil(M / 128), splits),
// 40 KiB static shared memory.
//
// Split-K: with fewer output tiles than SMs (M <= 128 gives N / 128 blocks: 32 of an H100's 132 SMs at N = 4096),
// block z takes the k-tiles [z * split_k_tiles, (z + 1) * split_k_tiles) and writes its raw accumulators to
// partial[z][M][N] (int32 for int8 x int8, float32 otherwise); qb_gemm_reduce then adds the splits in order of z
// (deterministic; int32 sums stay exact) and applies the epilogue. Unsplit (grid z = 1, split_k_tiles >= the
// k-tiles, partial null), the block writes the output itself.
#include "mma.cuh"

template <int AF, int WF>
__global__ void __launch_bounds__(256) qb_gemm(QB_MATMUL_PARAMS, Acc<AF>* __restrict__ partial, int split_k_tiles) {
    constexpr int BM = 128, BN = 128, KB = 64, LDS = 80;
    constexpr int AB = act_bytes<AF>();
    constexpr int KT = KB / AB;  // k values per k-tile
    static_assert(AB == 2 || weight_bits<WF>() == 8, "quantized activations pair with 8-bit weights");

    __shared__ __align__(16) u8 As[2][BM * LDS];
    __shared__ __align__(16) u8 Bs[2][BN * LDS];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp & 1, wn = warp >> 1;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const u8* xb = (const u8*)x;
    const u8* wb = (const u8*)w;

    Acc<AF> c[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) c[i][j][r] = 0;

    // Registers of the k-tile in flight: two 16-byte chunks of A; two chunks of B (8-bit operands) or one segment
    // of 16 raw weight values with its group's scale and shift (16-bit operands).
    uint4 ra[2], rb[2];
    float bscale = 0.0f, bshift = 0.0f;

    auto load_tile = [&](int kt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + 256 * i, row = id >> 2;
            const int k = kt * KT + (id & 3) * (16 / AB);
            ra[i] = m0 + row < M ? load_act16<AB>(xb + (long long)(m0 + row) * K * AB, k, K, x_vec) : zero4();
            if constexpr (AB == 1) {
                rb[i] = n0 + row < N ? load_weight_bytes<8, 16>(wb + (long long)(n0 + row) * w_row_bytes, k, K, w_vec)
                                     : zero4();
            }
        }
        if constexpr (AB == 2) {
            const int row = tid >> 1, k = kt * KT + (tid & 1) * 16;
            const bool ok = n0 + row < N;
            rb[0] = ok ? load_weight_bytes<weight_bits<WF>(), 16>(wb + (long long)(n0 + row) * w_row_bytes, k, K, w_vec)
                       : zero4();
            if constexpr (is_affine<WF>()) {
                bscale = 0.0f;
                bshift = 0.0f;
                if (ok && k < K) {
                    const long long gi = (long long)(n0 + row) * n_groups + k / group_size;
                    bscale = load_float(w_scale, gi, scale_dt);
                    bshift = load_float(w_shift, gi, scale_dt);
                }
            }
        }
    };

    auto store_tile = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + 256 * i, off = (id >> 2) * LDS + (id & 3) * 16;
            *(uint4*)(&As[buf][off]) = ra[i];
            if constexpr (AB == 1) *(uint4*)(&Bs[buf][off]) = rb[i];
        }
        if constexpr (AB == 2) {
            const u32 wv[4] = {rb[0].x, rb[0].y, rb[0].z, rb[0].w};
            u32 o[8];
            decode8<AF, WF>(wv, 0, bscale, bshift, o);
            decode8<AF, WF>(wv, 1, bscale, bshift, o + 4);
            const int off = (tid >> 1) * LDS + (tid & 1) * 32;
            *(uint4*)(&Bs[buf][off]) = make_uint4(o[0], o[1], o[2], o[3]);
            *(uint4*)(&Bs[buf][off + 16]) = make_uint4(o[4], o[5], o[6], o[7]);
        }
    };

    auto compute_tile = [&](int buf) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const u8* p = &As[buf][(wm * 64 + mi * 16 + g) * LDS + s * 32 + t * 4];
                a[mi][0] = *(const u32*)p;
                a[mi][1] = *(const u32*)(p + 8 * LDS);
                a[mi][2] = *(const u32*)(p + 16);
                a[mi][3] = *(const u32*)(p + 8 * LDS + 16);
            }
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                const u8* q = &Bs[buf][(wn * 32 + nj * 8 + g) * LDS + s * 32 + t * 4];
                b[nj][0] = *(const u32*)q;
                b[nj][1] = *(const u32*)(q + 16);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) mma<AF, WF>(c[mi][nj], a[mi], b[nj][0], b[nj][1]);
        }
    };

    // The host gives every split at least one k-tile.
    const int nk = (K + KT - 1) / KT, kt_begin = blockIdx.z * split_k_tiles;
    const int kt_end = kt_begin + split_k_tiles < nk ? kt_begin + split_k_tiles : nk;
    load_tile(kt_begin);
    store_tile(0);
    __syncthreads();
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const bool more = kt + 1 < kt_end;
        if (more) load_tile(kt + 1);
        compute_tile((kt - kt_begin) & 1);
        // The other stage was last read in iteration kt - 1, which every thread finished before the barrier below.
        if (more) store_tile((kt + 1 - kt_begin) & 1);
        __syncthreads();
    }

#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = m0 + wm * 64 + mi * 16 + g + 8 * (r >> 1);
                const int n = n0 + wn * 32 + nj * 8 + 2 * t + (r & 1);
                if (m < M && n < N) {
                    if (partial != nullptr) {
                        partial[((long long)blockIdx.z * M + m) * N + n] = c[mi][nj][r];
                    } else {
                        store_output<AF, WF>(c[mi][nj][r], m, n, N, x_scale, x_scale_stride, w_scale, scale_dt, bias,
                                             bias_dt, out, out_dt);
                    }
                }
            }
}

// The epilogue of a split-K qb_gemm: out[m, n] from the sum over z < splits of partial[z][m][n], one output per
// thread. Launch: block 256, grid ceil(M * N / 256).
template <int AF, int WF>
__global__ void __launch_bounds__(256)
    qb_gemm_reduce(const Acc<AF>* __restrict__ partial, int splits, int M, int N, const float* __restrict__ x_scale,
                   int x_scale_stride, const void* __restrict__ w_scale, int scale_dt, const void* __restrict__ bias,
                   int bias_dt, void* __restrict__ out, int out_dt) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x, count = (long long)M * N;
    if (i >= count) return;
    Acc<AF> acc = partial[i];
    for (int z = 1; z < splits; ++z) acc += partial[z * count + i];
    store_output<AF, WF>(acc, (int)(i / N), (int)(i % N), N, x_scale, x_scale_stride, w_scale, scale_dt, bias,
                         bias_dt, out, out_dt);
}
