#include "simt.h"
#include "quantize.cu"
#include "runtime.h"

void qb_simt::register_quantize(Registry& r) {
    add<&qb_quantize_symmetric>(r, "qb_quantize_symmetric");
    add<&qb_dequantize_symmetric>(r, "qb_dequantize_symmetric");
    add<&qb_quantize_per_token>(r, "qb_quantize_per_token");
    add<&qb_quantize_affine>(r, "qb_quantize_affine");
    add<&qb_dequantize_affine>(r, "qb_dequantize_affine");
    add<&qb_pack>(r, "qb_pack");
    add<&qb_unpack>(r, "qb_unpack");
}
