// A small SIMT shim that compiles the real cuda_kernels/*.cu sources as C++ and runs them on the CPU.
//
// Model: the blocks of a grid run one after the other; the threads of a block are fibers (ucontext) on one OS
// thread, switched only at synchronization points, so `__shared__` variables can be plain statics. A fiber runs
// until it reaches a block barrier (__syncthreads) or a warp-collective step (a shuffle, an mma.sync); the
// scheduler then runs the others, and releases a warp when all its 32 lanes reached the same collective step, a
// block when all its live threads reached the barrier. Lanes that diverge at a collective step, or a barrier some
// threads never reach, stop the run with an error instead of hanging. The order in which runnable fibers resume is
// shuffled by a seed, so a missing barrier (a race on shared memory) changes results from one seed to another.
//
// Built with ASan and UBSan by tests/kernels_cpu/conftest.py. CUDA's misaligned-address fault is modelled too:
// __ldg and the 16-byte vector types check their alignment.
#pragma once

#define QB_CPU_SIMT 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a block's shared memory is a static of the kernel.
#define __shared__ static

struct dim3 {
    unsigned int x, y, z;
};

// As in CUDA's vector_types.h: the 16- and 8-byte vectors carry their size as alignment.
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned int x, y;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

namespace qb_simt {

struct ThreadState {
    dim3 idx;
    int linear;
    int lane;
    int warp;
    unsigned int collective_seq;  // warp-collective steps this thread has taken
};

extern ThreadState* current;
extern dim3 block_idx, block_dim, grid_dim;

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Blocks the calling fiber until every live thread of the block arrived.
void block_barrier();
// Blocks the calling fiber until the 32 lanes of its warp arrived at the same collective step `op`.
void warp_step(const char* op);
// The exchange area of the calling thread's warp for the current collective step (32 slots of `slot_bytes`).
unsigned char* warp_slots(unsigned int seq, size_t slot_bytes);
void check_aligned(const void* p, size_t alignment, const char* what);

}  // namespace qb_simt

#define threadIdx (qb_simt::current->idx)
#define blockIdx (qb_simt::block_idx)
#define blockDim (qb_simt::block_dim)
#define gridDim (qb_simt::grid_dim)

inline int qb_lane_id() { return qb_simt::current->lane; }

// Every lane of the warp contributes `mine`; returns the 32 contributions, indexed by lane. Lanes exchange through
// two alternating areas, so one step is one switch: a lane can only overwrite an area after the whole warp passed
// the step that follows the one that used it.
template <class T>
const T* qb_warp_gather(const T& mine, const char* op) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 64, "small trivially copyable values only");
    qb_simt::ThreadState* self = qb_simt::current;
    const unsigned int seq = self->collective_seq++;
    T* slots = reinterpret_cast<T*>(qb_simt::warp_slots(seq, sizeof(T)));
    memcpy(&slots[self->lane], &mine, sizeof(T));
    qb_simt::warp_step(op);
    return slots;
}

inline void __syncthreads() { qb_simt::block_barrier(); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    if (mask != 0xFFFFFFFFu) qb_simt::fail("__shfl_xor_sync: only the full-warp mask is modelled (got %#x)", mask);
    const float* all = qb_warp_gather(v, "shfl.sync.bfly");
    return all[(qb_lane_id() ^ lane_mask) & 31];
}

template <class T>
inline T __ldg(const T* p) {
    qb_simt::check_aligned(p, sizeof(T), "__ldg");
    return *p;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}

// The shim is built with -ffp-contract=off, so a plain add is never fused either.
inline float __fadd_rn(float a, float b) { return a + b; }

[[noreturn]] inline void __trap() { qb_simt::fail("__trap() called"); }
