// The float32 row loops of cpu_common.h, compiled once per instruction-set level: x86-64-v3 (AVX2, FMA) and the
// baseline, chosen at load time by the CPU through an ifunc (target_clones). Elsewhere (other architectures or
// compilers) they are compiled once for the build's target. Both versions sum in the same order and the build sets
// -ffp-contract=off, so they give bitwise the same results.
#include "cpu_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FPET_NO_TARGET_CLONES)
#define FPET_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FPET_VECTOR_CLONES
#endif

namespace fpet {
namespace cpu {

FPET_VECTOR_CLONES float dot_f32(const float* a, const float* b, int64_t n) { return loops::dot<float>(a, b, n); }

FPET_VECTOR_CLONES void axpy_f32(float* out, float w, const float* x, int64_t n) { loops::axpy(out, w, x, n); }

FPET_VECTOR_CLONES void scale_into_f32(float* out, float w, const float* x, int64_t n) {
  loops::scale_into(out, w, x, n);
}

FPET_VECTOR_CLONES void store_scaled_f32(float* out, const float* x, float w, int64_t n) {
  loops::store_scaled(out, x, w, n);
}

FPET_VECTOR_CLONES void store_divided_f32(float* out, const float* x, float z, int64_t n) {
  loops::store_divided(out, x, z, n);
}

FPET_VECTOR_CLONES int64_t argmax_f32(const float* row, int64_t n) { return loops::argmax(row, n); }

}  // namespace cpu
}  // namespace fpet
