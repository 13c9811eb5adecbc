// The SIMT shim's process: serves kernel launches to tests/kernels_cpu/conftest.py.
//
// Commands, one per line on stdin; one answer line each on stdout:
//   list         -> one "name<TAB>signature" line per entry point, then "end"
//   run <dir>    -> runs the launch described by <dir>/launch.txt with the buffers of <dir>/in.bin, writes every
//                   buffer after the run to <dir>/out.bin, answers "ok"; on a failure answers "error <why>" and
//                   exits (ASan/UBSan reports go to stderr and end the process too)
//
// launch.txt: the entry name on the first line, then "grid x y z", "block x y z", "shared <bytes>",
// "seed <n>", "args <n>" and one line per argument: "b <bytes> <address mod 64>" (a buffer, its bytes next in
// in.bin), "0" (null pointer), "i <int>", "l <long long>", "f <float bits in hex>".
//
// Each buffer gets its own heap block that ends exactly where the tensor ends (ASan reports any read or write
// past it) and starts at the tensor's address modulo 64, so the kernel sees the alignment the GPU would.
// Const buffers must be unchanged after the run.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "simt.h"
#include "runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

namespace qb_simt {

void report_failure(const char* message) {
    printf("error %s\n", message);
    fflush(stdout);
    _Exit(3);
}

}  // namespace qb_simt

namespace {

struct Buffer {
    char kind;
    void* block;
    unsigned char* data;
    size_t bytes;
    size_t offset;
    std::string original;
};

struct Arg {
    char kind;
    long long i = 0;
    float f = 0;
    void* p = nullptr;
    int buffer = -1;
};

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) qb_simt::fail("cannot read %s", path.c_str());
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

void run(const qb_simt::Registry& registry, const std::string& dir) {
    std::istringstream spec(read_file(dir + "/launch.txt"));
    const std::string data = read_file(dir + "/in.bin");
    std::string name, word;
    std::getline(spec, name);
    const qb_simt::Entry* entry = nullptr;
    for (const auto& e : registry) {
        if (e.name == name) entry = &e;
    }
    if (entry == nullptr) qb_simt::fail("no entry point named '%s'", name.c_str());
    dim3 grid{}, block{};
    long long shared = 0;
    unsigned long long seed = 0;
    size_t n_args = 0;
    spec >> word >> grid.x >> grid.y >> grid.z >> word >> block.x >> block.y >> block.z >> word >> shared >> word >>
        seed >> word >> n_args;
    if (!spec) qb_simt::fail("malformed launch.txt in %s", dir.c_str());
    if (shared != 0) qb_simt::fail("%s: dynamic shared memory (%lld bytes) is not used by any kernel", name.c_str(), shared);
    if (n_args != entry->signature.size()) {
        qb_simt::fail("%s takes %zu arguments (%s), the launch passes %zu", name.c_str(), entry->signature.size(),
                      entry->signature.c_str(), n_args);
    }
    std::vector<Arg> args(n_args);
    std::vector<Buffer> buffers;
    size_t pos = 0;
    for (size_t a = 0; a < n_args; ++a) {
        Arg& arg = args[a];
        spec >> word;
        const char want = entry->signature[a];
        arg.kind = word[0];
        const bool pointer = want == 'c' || want == 'p';
        const bool ok = pointer ? (arg.kind == 'b' || arg.kind == '0') : arg.kind == want;
        if (!ok) {
            qb_simt::fail("%s argument %zu: the kernel takes '%c' (signature %s), the launch passes '%s'", name.c_str(),
                          a, want, entry->signature.c_str(), word.c_str());
        }
        if (arg.kind == 'b') {
            Buffer b{};
            b.kind = want;
            spec >> b.bytes >> b.offset;
            if (pos + b.bytes > data.size()) qb_simt::fail("in.bin is too short");
            if (posix_memalign(&b.block, 64, b.offset + b.bytes + (b.bytes == 0)) != 0) qb_simt::fail("out of memory");
            b.data = (unsigned char*)b.block + b.offset;
            memcpy(b.data, data.data() + pos, b.bytes);
            ASAN_POISON_MEMORY_REGION(b.block, b.offset & ~(size_t)7);
            if (want == 'c') b.original.assign(data.data() + pos, b.bytes);
            pos += b.bytes;
            arg.p = b.data;
            arg.buffer = (int)buffers.size();
            buffers.push_back(std::move(b));
        } else if (arg.kind == 'i' || arg.kind == 'l') {
            spec >> arg.i;
        } else if (arg.kind == 'f') {
            unsigned int bits = 0;
            spec >> std::hex >> bits >> std::dec;
            memcpy(&arg.f, &bits, 4);
        }
        if (!spec) qb_simt::fail("malformed argument %zu in launch.txt", a);
    }
    // The kernel reads each parameter from its own storage, as cuLaunchKernel's kernelParams.
    std::vector<int> ints(n_args);
    std::vector<void*> params(n_args);
    for (size_t a = 0; a < n_args; ++a) {
        Arg& arg = args[a];
        if (arg.kind == 'i') {
            if (arg.i < INT32_MIN || arg.i > INT32_MAX) qb_simt::fail("argument %zu does not fit an int", a);
            ints[a] = (int)arg.i;
            params[a] = &ints[a];
        } else if (arg.kind == 'l') {
            params[a] = &arg.i;
        } else if (arg.kind == 'f') {
            params[a] = &arg.f;
        } else {
            params[a] = &arg.p;
        }
    }
    qb_simt::run_grid(entry->invoke, params.data(), grid, block, seed);
    std::ofstream out(dir + "/out.bin", std::ios::binary);
    for (const Buffer& b : buffers) {
        if (b.kind == 'c' && memcmp(b.original.data(), b.data, b.bytes) != 0) {
            qb_simt::fail("%s wrote into a const buffer", name.c_str());
        }
        out.write((const char*)b.data, (std::streamsize)b.bytes);
    }
    out.close();
    if (!out) qb_simt::fail("cannot write %s/out.bin", dir.c_str());
    for (Buffer& b : buffers) {
        ASAN_UNPOISON_MEMORY_REGION(b.block, b.offset);
        free(b.block);
    }
}

}  // namespace

int main() {
    qb_simt::Registry registry;
    qb_simt::register_quantize(registry);
    qb_simt::register_gemv(registry);
    qb_simt::register_gemm(registry);
    std::string line;
    while (std::getline(std::cin, line)) {
        if (line == "list") {
            for (const auto& e : registry) printf("%s\t%s\n", e.name.c_str(), e.signature.c_str());
            printf("end\n");
        } else if (line.rfind("run ", 0) == 0) {
            run(registry, line.substr(4));
            printf("ok\n");
        } else {
            printf("error unknown command '%s'\n", line.c_str());
        }
        fflush(stdout);
    }
    return 0;
}
