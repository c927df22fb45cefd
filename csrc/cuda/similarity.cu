// checkerboard_similarity on CUDA (docs/design.md §2-§3): cosine normalisation, the fused score/top-2/argmax kernel
// (one warp per A row, 8 rows per block), and the backward into the metric (one warp per token).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "../checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace fpet {
namespace cuda {

namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    normalize_kernel(const scalar_t* __restrict__ metric, acc_type<scalar_t>* __restrict__ hat,
                     acc_type<scalar_t>* __restrict__ norm, int64_t rows, int64_t dim) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const scalar_t* src = metric + row * dim;
  acc_t sum_of_squares = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const acc_t v = static_cast<acc_t>(src[d]);
    sum_of_squares += v * v;
  }
  const acc_t row_norm = sqrt(warp_sum(sum_of_squares));
  const acc_t denom = clamped_norm(row_norm);
  for (int64_t d = lane; d < dim; d += kWarp) hat[row * dim + d] = static_cast<acc_t>(src[d]) / denom;
  if (lane == 0) norm[row] = row_norm;
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    score_rows_kernel(const acc_t* __restrict__ hat, Checkerboard grid, int64_t batch, int64_t dim,
                      acc_t* __restrict__ scores, int64_t* __restrict__ index) {
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t tokens = grid.num_tokens();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= batch * num_a) return;
  const int64_t b = row / num_a;
  const acc_t* a = hat + (b * tokens + grid.a_token(row % num_a)) * dim;
  Top2<acc_t> top;
  for (int64_t j = grid.prefix + lane; j < num_b; j += kWarp) {
    const acc_t* other = hat + (b * tokens + grid.b_token(j)) * dim;
    acc_t score = 0;
    for (int64_t d = 0; d < dim; ++d) score += a[d] * other[d];
    top.push(score, j);
    if (scores) scores[row * num_b + j] = score;
  }
  if (scores) {
    for (int64_t j = lane; j < grid.prefix; j += kWarp) scores[row * num_b + j] = -INFINITY;
  }
  top = warp_top2(top);
  if (lane == 0 && index) index[row] = top.index1;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    similarity_backward_kernel(const acc_type<scalar_t>* __restrict__ grad_scores,
                               const acc_type<scalar_t>* __restrict__ hat,
                               const acc_type<scalar_t>* __restrict__ norm, Checkerboard grid,
                               int64_t batch, int64_t dim, scalar_t* __restrict__ grad_metric) {
  using acc_t = acc_type<scalar_t>;
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t tokens = grid.num_tokens();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= batch * tokens) return;
  const int64_t b = row / tokens;
  const int64_t cell = row % tokens - grid.prefix;
  scalar_t* out = grad_metric + row * dim;
  if (cell < 0) {  // prefix token: its score columns are constant -inf
    for (int64_t d = lane; d < dim; d += kWarp) out[d] = scalar_t(0);
    return;
  }
  const acc_t* batch_hat = hat + b * tokens * dim;
  const acc_t* batch_grad = grad_scores + b * num_a * num_b;
  acc_t grad_hat[kMaxDimPerLane];  // entry t holds d = lane + 32 t
#pragma unroll
  for (int t = 0; t < kMaxDimPerLane; ++t) grad_hat[t] = 0;
  const bool is_a = (cell / grid.width + cell % grid.width) % 2 == 0;
  const int64_t count = is_a ? num_b - grid.prefix : num_a;
  for (int64_t n = 0; n < count; ++n) {
    // A token i: dm^_A = dS[i, :] m^_B; B token j: dm^_B = dS[:, j]^T m^_A
    const int64_t j = is_a ? grid.prefix + n : grid.prefix + cell / 2;
    const int64_t i = is_a ? cell / 2 : n;
    const acc_t w = batch_grad[i * num_b + j];
    const acc_t* src = batch_hat + (is_a ? grid.b_token(j) : grid.a_token(i)) * dim;
#pragma unroll
    for (int t = 0; t < kMaxDimPerLane; ++t) {
      const int64_t d = lane + t * kWarp;
      if (d < dim) grad_hat[t] += w * src[d];
    }
  }
  const acc_t* row_hat = hat + row * dim;
  acc_t partial = 0;
#pragma unroll
  for (int t = 0; t < kMaxDimPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < dim) partial += row_hat[d] * grad_hat[t];
  }
  const acc_t hat_dot_grad = warp_sum(partial);
#pragma unroll
  for (int t = 0; t < kMaxDimPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < dim) out[d] = static_cast<scalar_t>(normalize_backward(grad_hat[t], row_hat[d], hat_dot_grad, norm[row]));
  }
}

}  // namespace

NormalizedMetric normalize_metric(const Tensor& metric_in, const Checkerboard& grid) {
  const Tensor metric = metric_in.contiguous();
  const int64_t batch = metric.size(0);
  const int64_t dim = metric.size(2);
  const auto options = metric.options().dtype(accumulation_dtype(metric.scalar_type()));
  NormalizedMetric result{at::empty({batch, grid.num_tokens(), dim}, options), at::empty({batch, grid.num_tokens()}, options)};
  const int64_t rows = batch * grid.num_tokens();
  if (rows == 0) return result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, metric.scalar_type(), "normalize_metric", [&] {
    using acc_t = acc_type<scalar_t>;
    normalize_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        metric.data_ptr<scalar_t>(), result.hat.data_ptr<acc_t>(), result.norm.data_ptr<acc_t>(), rows, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

void score_rows(const NormalizedMetric& metric, const Checkerboard& grid, const Tensor& scores, const Tensor& index) {
  const int64_t batch = metric.hat.size(0);
  const int64_t rows = batch * grid.num_a();
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES(metric.hat.scalar_type(), "score_rows", [&] {
    score_rows_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        metric.hat.data_ptr<scalar_t>(), grid, batch, metric.hat.size(2),
        scores.defined() ? scores.data_ptr<scalar_t>() : nullptr, index.defined() ? index.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor similarity_backward(const Tensor& grad_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype) {
  const int64_t batch = metric.hat.size(0);
  const int64_t dim = metric.hat.size(2);
  TORCH_CHECK(dim <= kWarp * kMaxDimPerLane, "the CUDA kernels support metric dims up to ", kWarp * kMaxDimPerLane,
              ", got ", dim);
  Tensor grad_metric = at::empty({batch, grid.num_tokens(), dim}, metric.hat.options().dtype(out_dtype));
  const int64_t rows = batch * grid.num_tokens();
  if (rows == 0) return grad_metric;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "similarity_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    similarity_backward_kernel<scalar_t>
        <<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad_scores.data_ptr<acc_t>(), metric.hat.data_ptr<acc_t>(), metric.norm.data_ptr<acc_t>(), grid, batch,
            dim, grad_metric.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_metric;
}

Tensor checkerboard_similarity(const Tensor& metric, int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const c10::cuda::CUDAGuard guard(metric.device());
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  Tensor scores = at::empty({metric.size(0), grid.num_a(), grid.num_b()}, normalized.hat.options());
  score_rows(normalized, grid, scores, Tensor());
  return scores;
}

Tensor checkerboard_similarity_backward(const Tensor& grad_scores, const Tensor& metric, int64_t height,
                                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const c10::cuda::CUDAGuard guard(metric.device());
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor grad = grad_scores.to(normalized.hat.scalar_type()).contiguous();
  return similarity_backward(grad, normalized, grid, metric.scalar_type());
}

}  // namespace cuda
}  // namespace fpet
