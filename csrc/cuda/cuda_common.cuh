// Helpers of the CUDA kernels: accumulation type, launch shapes, and deterministic warp/block reductions (a fixed
// reduction tree, result broadcast from one lane, so every thread sees the same bits run after run).
// ATen/c10 core headers only (no torch/extension.h) to keep nvcc's compile time down.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../fpet_math.h"

namespace fpet {
namespace cuda {

using at::Tensor;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for bfloat16/float16/float32, double for double

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // kernels that give one warp to one row handle 8 rows per block
constexpr int kBlockThreads = kWarp * kWarpsPerBlock;  // the most threads any block has: __launch_bounds__
constexpr int kMaxDimPerLane = 8;  // a warp keeps one metric row in registers: Dh <= 256

inline unsigned int blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned int>((items + per_block - 1) / per_block);
}

// Threads per block for kernels that run one block per token row and loop over its C channels.
inline unsigned int threads_for_channels(int64_t channels) {
  const int64_t rounded = (channels + kWarp - 1) / kWarp * kWarp;
  return static_cast<unsigned int>(rounded < kBlockThreads ? rounded : kBlockThreads);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return __shfl_sync(0xffffffffu, value, 0);  // lanes may differ in the last bit; all take lane 0's
}

// Sum over the block (blockDim.x a multiple of 32); every thread must call it.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T partial[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  value = warp_sum(value);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    T total = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : T(0);
    total = warp_sum(total);
    if (lane == 0) partial[0] = total;
  }
  __syncthreads();
  const T total = partial[0];
  __syncthreads();  // partial may be reused by the next call
  return total;
}

// Top-2 of a row held in pieces by the lanes of a warp. Exact (no arithmetic), so every lane ends with the same.
template <typename acc_t>
__device__ __forceinline__ Top2<acc_t> warp_top2(Top2<acc_t> top) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Top2<acc_t> other;
    other.value1 = __shfl_xor_sync(0xffffffffu, top.value1, offset);
    other.value2 = __shfl_xor_sync(0xffffffffu, top.value2, offset);
    other.index1 = __shfl_xor_sync(0xffffffffu, static_cast<long long>(top.index1), offset);
    other.index2 = __shfl_xor_sync(0xffffffffu, static_cast<long long>(top.index2), offset);
    top.merge(other);
  }
  return top;
}

// The cosine-normalised metric (docs/design.md §2 step 4) in the accumulation dtype.
struct NormalizedMetric {
  Tensor hat;   // [B, N, Dh]: m / max(||m||, eps)
  Tensor norm;  // [B, N]: ||m||
};

NormalizedMetric normalize_metric(const Tensor& metric, const Checkerboard& grid);

// One fused kernel per block of A rows: scores against the B cells, top-2 and argmax (docs/design.md §2 steps 4-5).
// Writes index [B, NA] and, if defined, scores [B, NA, NB] (prefix columns -inf).
void score_rows(const NormalizedMetric& metric, const Checkerboard& grid, const Tensor& scores, const Tensor& index);

// dL/dm from dL/dS (contiguous [B, NA, NB], accumulation dtype); [B, N, Dh] in out_dtype, prefix tokens zero.
Tensor similarity_backward(const Tensor& grad_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype);

}  // namespace cuda
}  // namespace fpet
