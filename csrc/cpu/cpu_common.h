// Helpers of the CPU kernels: accumulation type, grain sizes for at::parallel_for, and fixed-order dot products
// and row updates the compiler vectorises. Every output row is written by one thread in a fixed order, so results
// are bitwise identical for any thread count.
//
// The float32 row loops (the hot ones) are compiled twice in vector_ops.cpp, for the x86-64-v3 level (AVX2, FMA)
// and the baseline, and the loader picks one by the CPU (GCC/Clang target_clones). The loops below are written so
// that vectorising them does not reorder any sum, and the extension is built with -ffp-contract=off, so both
// versions give bitwise the same results.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../fpet_math.h"

namespace fpet {
namespace cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for bfloat16/float16/float32, double for double

// Rows per parallel task so that each task does at least ~16k multiply-adds (small problems stay on one thread).
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row));
}

// An uninitialised per-thread buffer (std::vector would zero-fill it on every call).
template <typename T>
inline std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

namespace loops {

constexpr int kLanes = 8;  // independent partial sums: a fixed summation order the compiler can vectorise

// sum_k a[k] * b[k] in acc_t, in a fixed order (kLanes interleaved partial sums, combined pairwise).
template <typename acc_t, typename A, typename B>
inline acc_t dot(const A* a, const B* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[k + l]) * static_cast<acc_t>(b[k + l]);
  }
  for (int l = 0; k < n; ++k, ++l) lanes[l] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// out[k] += w * x[k]
template <typename acc_t, typename X>
inline void axpy(acc_t* out, acc_t w, const X* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] += w * static_cast<acc_t>(x[k]);
}

// out[k] = w * x[k]
template <typename acc_t, typename X>
inline void scale_into(acc_t* out, acc_t w, const X* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = w * static_cast<acc_t>(x[k]);
}

// out[k] = cast(x[k] * w)
template <typename out_t, typename acc_t>
inline void store_scaled(out_t* out, const acc_t* x, acc_t w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<out_t>(x[k] * w);
}

// out[k] = cast(x[k] / z)
template <typename out_t, typename acc_t>
inline void store_divided(out_t* out, const acc_t* x, acc_t z, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<out_t>(x[k] / z);
}

// First index holding the maximum of row[0 .. n) by match_key (NaN counts as +inf, as in Top2).
template <typename acc_t>
inline int64_t argmax(const acc_t* row, int64_t n) {
  // The maximum over kLanes interleaved running maxima (branch-free, so it vectorises; a max is exact, so the
  // lane order cannot change it), then the first index holding it.
  acc_t lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = match_key(row[j + l]);
      lanes[l] = v > lanes[l] ? v : lanes[l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const acc_t v = match_key(row[j]);
    lanes[l] = v > lanes[l] ? v : lanes[l];
  }
  acc_t best = lanes[0];
  for (int l = 1; l < kLanes; ++l) best = lanes[l] > best ? lanes[l] : best;
  for (j = 0; j < n; ++j) {
    if (match_key(row[j]) == best) return j;
  }
  return 0;
}

}  // namespace loops

// The same loops for float32, one version per instruction-set level (vector_ops.cpp).
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* out, float w, const float* x, int64_t n);
void scale_into_f32(float* out, float w, const float* x, int64_t n);
void store_scaled_f32(float* out, const float* x, float w, int64_t n);
void store_divided_f32(float* out, const float* x, float z, int64_t n);
int64_t argmax_f32(const float* row, int64_t n);

template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float>;

template <typename acc_t, typename A, typename B>
inline acc_t dot(const A* a, const B* b, int64_t n) {
  if constexpr (kIsFloat<acc_t> && kIsFloat<A> && kIsFloat<B>) return dot_f32(a, b, n);
  else return loops::dot<acc_t>(a, b, n);
}

template <typename acc_t, typename X>
inline void axpy(acc_t* out, acc_t w, const X* x, int64_t n) {
  if constexpr (kIsFloat<acc_t> && kIsFloat<X>) axpy_f32(out, w, x, n);
  else loops::axpy(out, w, x, n);
}

template <typename acc_t, typename X>
inline void scale_into(acc_t* out, acc_t w, const X* x, int64_t n) {
  if constexpr (kIsFloat<acc_t> && kIsFloat<X>) scale_into_f32(out, w, x, n);
  else loops::scale_into(out, w, x, n);
}

template <typename out_t, typename acc_t>
inline void store_scaled(out_t* out, const acc_t* x, acc_t w, int64_t n) {
  if constexpr (kIsFloat<out_t> && kIsFloat<acc_t>) store_scaled_f32(out, x, w, n);
  else loops::store_scaled(out, x, w, n);
}

template <typename out_t, typename acc_t>
inline void store_divided(out_t* out, const acc_t* x, acc_t z, int64_t n) {
  if constexpr (kIsFloat<out_t> && kIsFloat<acc_t>) store_divided_f32(out, x, z, n);
  else loops::store_divided(out, x, z, n);
}

template <typename acc_t>
inline int64_t argmax(const acc_t* row, int64_t n) {
  if constexpr (kIsFloat<acc_t>) return argmax_f32(row, n);
  else return loops::argmax(row, n);
}

}  // namespace cpu
}  // namespace fpet
