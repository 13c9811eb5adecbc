// Elementwise quantization kernels: symmetric (int8/float8) quantize and dequantize, dynamic per-row (per-token)
// quantization, group-wise affine quantize-and-pack and unpack-and-dequantize of 2/4-bit weights, pack/unpack.
//
// Element types are run-time codes (DType): these kernels are memory-bound, a uniform switch costs nothing, and it
// keeps one entry point per operation. Semantics follow quanto_backend/ops/reference.py exactly (same division,
// rounding and clamping order), so results match the reference bit for bit.
#include "common.cuh"

// x [rows, cols] -> out [rows, cols]; scale is one value (scale_per_row == 0) or one per row.
// Launch: block 256, grid (ceil(cols / 256), min(rows, 65535)); blocks stride over rows.
extern "C" __global__ void __launch_bounds__(256) qb_quantize_symmetric(
    const void* __restrict__ x, int x_dt, const void* __restrict__ scale, int scale_dt, int scale_per_row,
    u8* __restrict__ out, int out_dt, long long rows, int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const float s = load_float(scale, scale_per_row ? row : 0, scale_dt);
        const long long i = row * cols + col;
        out[i] = quantize_value(load_any(x, i, x_dt) / s, out_dt);
    }
}

// q [rows, cols] (int8 or float8) -> out [rows, cols] in the scale's dtype. Launch as qb_quantize_symmetric.
extern "C" __global__ void __launch_bounds__(256) qb_dequantize_symmetric(
    const u8* __restrict__ q, int q_dt, const void* __restrict__ scale, int scale_dt, int scale_per_row,
    void* __restrict__ out, long long rows, int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const float s = load_float(scale, scale_per_row ? row : 0, scale_dt);
        const long long i = row * cols + col;
        store_float(out, i, scale_dt, load_any(q, i, q_dt) * s);
    }
}

// Dynamic symmetric quantization with one float32 scale per row: scale = absmax / qmax (1 for an all-zero row).
// Also the GPU path of per-axis weight quantization (a weight row is a "token").
// Launch: block 256, grid (rows); one block per row, two passes over the row (the second hits L2).
extern "C" __global__ void __launch_bounds__(256) qb_quantize_per_token(
    const void* __restrict__ x, int x_dt, u8* __restrict__ out, int out_dt, float* __restrict__ scale_out,
    int cols) {
    __shared__ float partial[8];
    const long long base = (long long)blockIdx.x * cols;
    float m = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(load_any(x, base + c, x_dt)));
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = m;
    __syncthreads();
    float absmax = partial[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) absmax = fmaxf(absmax, partial[w]);
    const float qmax = out_dt == DT_E4M3 ? 448.0f : (out_dt == DT_E5M2 ? 57344.0f : 127.0f);
    const float s = absmax > 0.0f ? absmax / qmax : 1.0f;
    if (threadIdx.x == 0) scale_out[blockIdx.x] = s;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out[base + c] = quantize_value(load_any(x, base + c, x_dt) / s, out_dt);
    }
}

// Group-wise affine quantization and packing: w [rows, n_groups * group_size] -> packed [rows, cols * bits / 8],
// q = clamp(round(w / scale + shift), 0, 2^bits - 1), value 8/bits*j + i of a row in bits [bits*i, bits*(i+1)) of
// byte j. Launch: block 256, one thread per output byte, grid (ceil(packed_cols / 256), min(rows, 65535)).
extern "C" __global__ void __launch_bounds__(256) qb_quantize_affine(
    const void* __restrict__ w, int w_dt, const void* __restrict__ scale, int scale_dt,
    const void* __restrict__ shift, int shift_dt, u8* __restrict__ packed, long long rows, int cols,
    int n_groups, int group_size, int bits) {
    const int per_byte = 8 / bits;
    const int packed_cols = cols / per_byte;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= packed_cols) return;
    const float qmax = (float)((1 << bits) - 1);
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        u32 byte = 0;
        for (int i = 0; i < per_byte; ++i) {
            const int c = j * per_byte + i;
            const long long g = row * n_groups + c / group_size;
            const float s = load_float(scale, g, scale_dt);
            const float z = load_float(shift, g, shift_dt);
            // __fadd_rn keeps the compiler from fusing anything into the reference's divide-then-add.
            const float q = fminf(fmaxf(rintf(__fadd_rn(load_any(w, row * cols + c, w_dt) / s, z)), 0.0f), qmax);
            byte |= ((u32)q) << (bits * i);
        }
        packed[row * packed_cols + j] = (u8)byte;
    }
}

// Unpack and dequantize: packed [rows, packed_cols] -> out [rows, packed_cols * 8 / bits] in the scale's dtype,
// w = (q - shift) * scale. Launch: block 256, one thread per input byte, grid as qb_quantize_affine.
extern "C" __global__ void __launch_bounds__(256) qb_dequantize_affine(
    const u8* __restrict__ packed, const void* __restrict__ scale, int scale_dt, const void* __restrict__ shift,
    int shift_dt, void* __restrict__ out, long long rows, int packed_cols, int n_groups, int group_size, int bits) {
    const int per_byte = 8 / bits;
    const int cols = packed_cols * per_byte;
    const u32 mask = (1u << bits) - 1u;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= packed_cols) return;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const u32 byte = packed[row * packed_cols + j];
        for (int i = 0; i < per_byte; ++i) {
            const int c = j * per_byte + i;
            const long long g = row * n_groups + c / group_size;
            const float q = (float)((byte >> (bits * i)) & mask);
            const float w = (q - load_float(shift, g, shift_dt)) * load_float(scale, g, scale_dt);
            store_float(out, row * cols + c, scale_dt, w);
        }
    }
}

// Packs n_bytes * (8 / bits) uint8 codes into n_bytes bytes. Like the reference, codes are not masked: a code wider
// than `bits` spills into its neighbour's bits and is truncated at bit 8. Launch: block 256, grid-stride.
extern "C" __global__ void __launch_bounds__(256) qb_pack(
    const u8* __restrict__ values, u8* __restrict__ packed, long long n_bytes, int bits) {
    const int per_byte = 8 / bits;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n_bytes;
         j += (long long)gridDim.x * blockDim.x) {
        u32 byte = 0;
        for (int i = 0; i < per_byte; ++i) byte |= ((u32)values[j * per_byte + i]) << (bits * i);
        packed[j] = (u8)byte;
    }
}

// Inverse of qb_pack: n_bytes bytes -> n_bytes * (8 / bits) codes. Launch: block 256, grid-stride.
extern "C" __global__ void __launch_bounds__(256) qb_unpack(
    const u8* __restrict__ packed, u8* __restrict__ values, long long n_bytes, int bits) {
    const int per_byte = 8 / bits;
    const u32 mask = (1u << bits) - 1u;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n_bytes;
         j += (long long)gridDim.x * blockDim.x) {
        const u32 byte = packed[j];
        for (int i = 0; i < per_byte; ++i) values[j * per_byte + i] = (u8)((byte >> (bits * i)) & mask);
    }
}
