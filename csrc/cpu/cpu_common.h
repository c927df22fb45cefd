// Helpers of the CPU kernels: accumulation type, grain sizes for at::parallel_for, and fixed-order dot products
// and row updates the compiler vectorises. Every output row is written by one thread in a fixed order, so results
// are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace fpet {
namespace cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for bfloat16/float16/float32, double for double

// Rows per parallel task so that each task does at least ~16k multiply-adds (small problems stay on one thread).
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row));
}

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

}  // namespace cpu
}  // namespace fpet
