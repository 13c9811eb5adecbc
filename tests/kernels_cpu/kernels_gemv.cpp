#include "simt.h"
#include "gemv.cu"
#include "runtime.h"

void qb_simt::register_gemv(Registry& r) {
#define QB_ADD(A, W) add<&qb_gemv<A, W>>(r, "qb_gemv<" #A ", " #W ">");
    QB_MATMUL_FORMATS(QB_ADD)
#undef QB_ADD
}
