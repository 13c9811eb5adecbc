// The fiber scheduler of the SIMT shim (see simt.h).
#include "simt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <vector>

#include "runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define QB_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define QB_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define QB_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define QB_FINISH_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

namespace qb_simt {

ThreadState* current = nullptr;
dim3 block_idx, block_dim, grid_dim;

void fail(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    report_failure(msg);
}

void check_aligned(const void* p, size_t alignment, const char* what) {
    if ((uintptr_t)p % alignment != 0) {
        fail("%s: misaligned address %p for a %zu-byte access (block %u,%u,%u thread %d)", what, p, alignment,
             block_idx.x, block_idx.y, block_idx.z, current ? current->linear : -1);
    }
}

namespace {

enum class State { Run, Warp, Barrier, Done };

struct Fiber {
    ucontext_t ctx;
    void* stack = nullptr;
    void* fake_stack = nullptr;
    State state = State::Done;
    const char* op = nullptr;
    unsigned int seq = 0;
    ThreadState thread{};
};

constexpr size_t kStackBytes = 256 << 10;
constexpr int kMaxThreads = 1024;
constexpr size_t kSlotArea = 32 * 64;

std::vector<Fiber> fibers;
Fiber* running = nullptr;
ucontext_t scheduler;
const void* scheduler_stack = nullptr;
size_t scheduler_stack_bytes = 0;
void (*body)(void**) = nullptr;
void** body_args = nullptr;
alignas(64) unsigned char slots[kMaxThreads / 32][2][kSlotArea];
uint64_t rng = 0;

uint64_t next_random() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

void trampoline() {
    QB_FINISH_SWITCH(nullptr, &scheduler_stack, &scheduler_stack_bytes);
    body(body_args);
    running->state = State::Done;
    QB_START_SWITCH(nullptr, scheduler_stack, scheduler_stack_bytes);  // null: this fiber's frames are gone
    swapcontext(&running->ctx, &scheduler);
    abort();  // a finished fiber is never resumed
}

void yield(State state, const char* op) {
    Fiber* self = running;
    if (self == nullptr) fail("a synchronization primitive was called outside a kernel");
    self->state = state;
    self->op = op;
    QB_START_SWITCH(&self->fake_stack, scheduler_stack, scheduler_stack_bytes);
    swapcontext(&self->ctx, &scheduler);
    QB_FINISH_SWITCH(self->fake_stack, &scheduler_stack, &scheduler_stack_bytes);
}

void resume(Fiber& f) {
    running = &f;
    current = &f.thread;
    void* fake = nullptr;
    QB_START_SWITCH(&fake, f.stack, kStackBytes);
    swapcontext(&scheduler, &f.ctx);
    QB_FINISH_SWITCH(fake, nullptr, nullptr);
    running = nullptr;
    current = nullptr;
}

const char* state_name(const Fiber& f) {
    switch (f.state) {
        case State::Run: return "running";
        case State::Warp: return f.op;
        case State::Barrier: return "__syncthreads";
        default: return "exited";
    }
}

void run_block(int n_threads) {
    if ((int)fibers.size() < n_threads) fibers.resize(n_threads);
    for (int i = 0; i < n_threads; ++i) {
        Fiber& f = fibers[i];
        if (f.stack == nullptr) {
            f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
        }
        ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
        f.thread.idx = dim3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        f.thread.linear = i;
        f.thread.lane = i & 31;
        f.thread.warp = i >> 5;
        f.thread.collective_seq = 0;
        f.state = State::Run;
        f.fake_stack = nullptr;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
    }
    std::vector<int> order;
    const int n_warps = (n_threads + 31) / 32;
    for (;;) {
        order.clear();
        for (int i = 0; i < n_threads; ++i) {
            if (fibers[i].state == State::Run) order.push_back(i);
        }
        if (rng != 0) {
            for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
        }
        for (int i : order) resume(fibers[i]);

        // Every fiber now waits at a warp step, at a barrier, or has exited.
        bool progress = false;
        for (int w = 0; w < n_warps; ++w) {
            const int first = 32 * w, last = first + 32 < n_threads ? first + 32 : n_threads;
            int at_step = -1, n_at_step = 0;
            for (int i = first; i < last; ++i) {
                if (fibers[i].state == State::Warp) {
                    ++n_at_step;
                    if (at_step < 0) at_step = i;
                }
            }
            if (n_at_step == 0) continue;
            const Fiber& a = fibers[at_step];
            if (last - first != 32) fail("%s in a partial warp (%d threads per block)", a.op, n_threads);
            for (int i = first; i < last; ++i) {
                const Fiber& b = fibers[i];
                if (b.state != State::Warp || b.op != a.op || b.thread.collective_seq != a.thread.collective_seq) {
                    fail("block (%u,%u,%u) warp %d diverged: lane %d at %s (step %u), lane %d at %s (step %u)",
                         block_idx.x, block_idx.y, block_idx.z, w, a.thread.lane, a.op, a.thread.collective_seq,
                         b.thread.lane, state_name(b), b.thread.collective_seq);
                }
            }
            for (int i = first; i < last; ++i) fibers[i].state = State::Run;
            progress = true;
        }
        if (progress) continue;
        int live = 0, at_barrier = 0;
        for (int i = 0; i < n_threads; ++i) {
            live += fibers[i].state != State::Done;
            at_barrier += fibers[i].state == State::Barrier;
        }
        if (live == 0) return;
        if (at_barrier != live) fail("deadlock in block (%u,%u,%u)", block_idx.x, block_idx.y, block_idx.z);
        for (int i = 0; i < n_threads; ++i) {
            if (fibers[i].state == State::Barrier) fibers[i].state = State::Run;
        }
    }
}

}  // namespace

void block_barrier() { yield(State::Barrier, "__syncthreads"); }

void warp_step(const char* op) { yield(State::Warp, op); }

unsigned char* warp_slots(unsigned int seq, size_t slot_bytes) {
    if (32 * slot_bytes > kSlotArea) fail("warp exchange of %zu bytes per lane is too large", slot_bytes);
    return slots[current->warp][seq & 1];
}

void run_grid(void (*kernel)(void**), void** args, dim3 grid, dim3 block, uint64_t seed) {
    const long long n_threads = (long long)block.x * block.y * block.z;
    if (n_threads <= 0 || n_threads > kMaxThreads) fail("block of %lld threads: CUDA allows 1 to 1024", n_threads);
    if (grid.y > 65535 || grid.z > 65535) fail("grid (%u, %u, %u): y and z are limited to 65535", grid.x, grid.y, grid.z);
    body = kernel;
    body_args = args;
    grid_dim = grid;
    block_dim = block;
    rng = seed ? seed * 0x9E3779B97F4A7C15ull | 1 : 0;
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                block_idx = dim3{x, y, z};
                run_block((int)n_threads);
            }
    body = nullptr;
}

}  // namespace qb_simt
