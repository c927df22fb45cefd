// ste_match on CUDA (docs/design.md §2 step 5, §3 "STE"): one warp per score row. Prefix columns need no
// special case: they hold -inf, so sigma' is 0 there and they never win the top-2.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include "../ops.h"
#include "cuda_common.cuh"

namespace fpet {
namespace cuda {

namespace {

template <typename scalar_t>
__device__ Top2<acc_type<scalar_t>> row_top2(const scalar_t* row, int64_t columns, int lane) {
  Top2<acc_type<scalar_t>> top;
  for (int64_t j = lane; j < columns; j += kWarp) top.push(static_cast<acc_type<scalar_t>>(row[j]), j);
  top = warp_top2(top);
  top.finish();
  return top;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    ste_match_kernel(const scalar_t* __restrict__ scores, int64_t rows, int64_t columns,
                     scalar_t* __restrict__ matching, int64_t* __restrict__ index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int64_t best = row_top2(scores + row * columns, columns, lane).index1;
  if (lane == 0) {
    index[row] = best;
    matching[row * columns + best] = scalar_t(1);  // forward value of M is exactly one-hot
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    ste_match_backward_kernel(const scalar_t* __restrict__ grad_matching,
                              const scalar_t* __restrict__ scores, int64_t rows, int64_t columns,
                              scalar_t* __restrict__ grad_scores) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const scalar_t* s_row = scores + row * columns;
  const scalar_t* gm_row = grad_matching + row * columns;
  const Top2<acc_t> top = row_top2(s_row, columns, lane);
  const acc_t threshold = top.threshold();
  acc_t partial = 0;
  for (int64_t j = lane; j < columns; j += kWarp) {
    partial += sigmoid_grad(static_cast<acc_t>(s_row[j]), threshold) * static_cast<acc_t>(gm_row[j]);
  }
  const acc_t row_sum = warp_sum(partial);
  for (int64_t j = lane; j < columns; j += kWarp) {
    const acc_t weighted = sigmoid_grad(static_cast<acc_t>(s_row[j]), threshold) * static_cast<acc_t>(gm_row[j]);
    grad_scores[row * columns + j] = static_cast<scalar_t>(ste_score_grad(weighted, row_sum, j, top));
  }
}

}  // namespace

TensorPair ste_match(const Tensor& scores_in) {
  TORCH_CHECK(scores_in.dim() == 3 && scores_in.size(2) >= 1, "scores must have shape [B, NA, NB], NB >= 1");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1);
  const int64_t columns = scores.size(2);
  Tensor matching = at::zeros_like(scores);
  Tensor index = at::empty({scores.size(0), scores.size(1)}, scores.options().dtype(at::kLong));
  if (rows == 0) return {matching, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "ste_match", [&] {
    ste_match_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), rows, columns, matching.data_ptr<scalar_t>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {matching, index};
}

Tensor ste_match_backward(const Tensor& grad_matching_in, const Tensor& scores_in) {
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.contiguous();
  const Tensor grad_matching = grad_matching_in.to(scores.scalar_type()).contiguous();
  const int64_t rows = scores.size(0) * scores.size(1);
  const int64_t columns = scores.size(2);
  Tensor grad_scores = at::empty_like(scores);
  if (rows == 0) return grad_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "ste_match_backward", [&] {
    ste_match_backward_kernel<scalar_t>
        <<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad_matching.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), rows, columns,
            grad_scores.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_scores;
}

}  // namespace cuda
}  // namespace fpet
