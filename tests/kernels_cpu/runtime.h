// The launcher side of the SIMT shim: a table of the kernels' entry points, each with its parameter signature,
// and the grid runner. Entry names are those of quanto_backend/kernels/loader.py (ENTRY_POINTS).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <utility>
#include <vector>

namespace qb_simt {

// Parameter kinds, as the test packs them: 'c' const pointer, 'p' pointer, 'i' int, 'l' long long, 'f' float.
template <class T>
constexpr char kind_of() {
    if constexpr (std::is_pointer<T>::value) {
        return std::is_const<typename std::remove_pointer<T>::type>::value ? 'c' : 'p';
    } else if constexpr (std::is_same<T, int>::value) {
        return 'i';
    } else if constexpr (std::is_same<T, long long>::value) {
        return 'l';
    } else {
        static_assert(std::is_same<T, float>::value, "unsupported kernel parameter type");
        return 'f';
    }
}

template <auto F>
struct Bind;

template <class... P, void (*F)(P...)>
struct Bind<F> {
    template <size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        F(*static_cast<P*>(args[I])...);
    }
    static void invoke(void** args) { call(args, std::index_sequence_for<P...>{}); }
    static std::string signature() { return std::string{kind_of<P>()...}; }
};

struct Entry {
    std::string name;
    std::string signature;
    void (*invoke)(void**);
};

using Registry = std::vector<Entry>;

template <auto F>
void add(Registry& r, const char* name) {
    r.push_back(Entry{name, Bind<F>::signature(), &Bind<F>::invoke});
}

// (activation format, weight format) of the GEMV/GEMM instantiations: loader.py's MATMUL_FORMATS.
#define QB_MATMUL_FORMATS(X) \
    X(1, 3) X(1, 5) X(1, 6) X(1, 7) X(1, 8) X(2, 3) X(2, 5) X(2, 6) X(2, 7) X(2, 8) X(3, 3) X(5, 5) X(5, 6) X(6, 5) X(6, 6)

void register_quantize(Registry& r);
void register_gemv(Registry& r);
void register_gemm(Registry& r);

// Runs `kernel` (an Entry::invoke) over the grid; blocks run in order, threads as fibers (see simt.h).
void run_grid(void (*kernel)(void**), void** args, dim3 grid, dim3 block, uint64_t seed);

// Reports a failure of the kernel or of the model (a misaligned access, a divergent warp) and ends the process.
[[noreturn]] void report_failure(const char* message);

}  // namespace qb_simt
