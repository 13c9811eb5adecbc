#include "simt.h"
#include "gemm.cu"
#include "runtime.h"

void qb_simt::register_gemm(Registry& r) {
#define QB_ADD(A, W)                                          \
    add<&qb_gemm<A, W>>(r, "qb_gemm<" #A ", " #W ">"); \
    add<&qb_gemm_reduce<A, W>>(r, "qb_gemm_reduce<" #A ", " #W ">");
    QB_MATMUL_FORMATS(QB_ADD)
#undef QB_ADD
}
