// scatter_mean_merge, scatter_mean_merge_dense and the fused merge_tokens on CUDA (docs/design.md §2 steps 3-6, §3).
//
// Deterministic, no float atomics: a serial counting sort of k per batch gives the inverse index; one block per
// B row then sums its A rows in that fixed order (threads over channels). The backward follows the closed forms
// of docs/design.md §3: B rows, then A rows (a gather), then one cuBLAS GEMM X_A (G/Z)^T whose output buffer a
// warp-per-row kernel turns into dL/dS in place (dL/dM is formed on the fly, never stored). The kernels are
// templates over the matching (IndexMatching or DenseMatching, fpet_math.h), the host code over its input kind.
//
// Every kernel declares __launch_bounds__ with the most threads it is launched with (kBlockThreads, which
// threads_for_channels never exceeds, or kInvertIndexThreads), so the binary records it (EIATTR_MAX_THREADS).
#include <ATen/Dispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/ones.h>

#include "../checks.h"
#include "../merge_host.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace fpet {
namespace cuda {

namespace {

// One thread per batch: offsets [B, NB + 1], order [B, NA] (a stable counting sort; NA is small).
constexpr int kInvertIndexThreads = 1;
__global__ void __launch_bounds__(kInvertIndexThreads)
    invert_index_kernel(const int64_t* __restrict__ index, int64_t num_a, int64_t num_b,
                        int64_t* __restrict__ offsets, int64_t* __restrict__ order) {
  const int64_t b = blockIdx.x;
  const int64_t* k = index + b * num_a;
  int64_t* off = offsets + b * (num_b + 1);
  for (int64_t j = 0; j <= num_b; ++j) off[j] = 0;
  for (int64_t i = 0; i < num_a; ++i) {
    CUDA_KERNEL_ASSERT(k[i] >= 0 && k[i] < num_b);
    ++off[k[i] + 1];
  }
  for (int64_t j = 0; j < num_b; ++j) off[j + 1] += off[j];
  for (int64_t i = 0; i < num_a; ++i) order[b * num_a + off[k[i]]++] = i;  // off[j] advances to the old off[j + 1]
  for (int64_t j = num_b; j > 0; --j) off[j] = off[j - 1];
  off[0] = 0;
}

// Z_j = s_B[j] + sum_i M[i, j] s_A[i] (sizes of batch b), in the order the merge sums.
template <typename acc_t, typename Matching>
__device__ acc_t merged_size(const acc_t* size, const Matching& matching, const Checkerboard& grid, int64_t b,
                             int64_t j) {
  acc_t z = size[grid.b_token(j)];
  matching.for_each_a_of_b(b, j, [&](int64_t i, acc_t w) { z += w * size[grid.a_token(i)]; });
  return z;
}

// s_B[j] x_B[j, c] + sum_i M[i, j] s_A[i] x_A[i, c] (tokens and sizes of batch b).
template <typename scalar_t, typename Matching>
__device__ acc_type<scalar_t> merged_total(const scalar_t* x, const acc_type<scalar_t>* size, const Matching& matching,
                                           const Checkerboard& grid, int64_t b, int64_t j, int64_t channels,
                                           int64_t c) {
  using acc_t = acc_type<scalar_t>;
  const int64_t token_b = grid.b_token(j);
  acc_t total = size[token_b] * static_cast<acc_t>(x[token_b * channels + c]);
  matching.for_each_a_of_b(b, j, [&](int64_t i, acc_t w) {
    const int64_t token_a = grid.a_token(i);
    total += (w * size[token_a]) * static_cast<acc_t>(x[token_a * channels + c]);
  });
  return total;
}

// Grid (NB, B): x'_j = total / Z_j, size'_j = Z_j.
template <typename scalar_t, typename Matching>
__global__ void __launch_bounds__(kBlockThreads)
    merge_forward_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ size,
                         Matching matching, Checkerboard grid, int64_t channels, scalar_t* __restrict__ x_merged,
                         acc_type<scalar_t>* __restrict__ size_merged) {
  using acc_t = acc_type<scalar_t>;
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t row = b * grid.num_b() + j;
  const scalar_t* xb = x + b * grid.num_tokens() * channels;
  const acc_t* sb = size + b * grid.num_tokens();
  const acc_t z = merged_size(sb, matching, grid, b, j);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    x_merged[row * channels + c] = static_cast<scalar_t>(merged_total(xb, sb, matching, grid, b, j, channels, c) / z);
  }
  if (threadIdx.x == 0) size_merged[row] = z;
}

// Grid (NB, B): gz_j = g_j / Z_j, q_j = h_j - <x'_j, gz_j>, dL/dx_B[j] = s_B[j] gz_j, dL/ds_B[j] = <x_B[j], gz_j> + q_j.
template <typename scalar_t, typename Matching>
__global__ void __launch_bounds__(kBlockThreads)
    merge_backward_b_kernel(const scalar_t* __restrict__ grad_x_merged,
                            const acc_type<scalar_t>* __restrict__ grad_size_merged, const scalar_t* __restrict__ x,
                            const acc_type<scalar_t>* __restrict__ size, Matching matching, Checkerboard grid,
                            int64_t channels, acc_type<scalar_t>* __restrict__ gz, acc_type<scalar_t>* __restrict__ q,
                            scalar_t* __restrict__ grad_x, acc_type<scalar_t>* __restrict__ grad_size) {
  using acc_t = acc_type<scalar_t>;
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t tokens = grid.num_tokens();
  const int64_t row = b * grid.num_b() + j;
  const scalar_t* xb = x + b * tokens * channels;
  const acc_t* sb = size + b * tokens;
  const int64_t token = grid.b_token(j);
  const acc_t z = merged_size(sb, matching, grid, b, j);
  acc_t merged_dot = 0;
  acc_t token_dot = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const acc_t merged = merged_total(xb, sb, matching, grid, b, j, channels, c) / z;
    const acc_t g = static_cast<acc_t>(grad_x_merged[row * channels + c]) / z;
    gz[row * channels + c] = g;
    merged_dot += merged * g;
    token_dot += static_cast<acc_t>(xb[token * channels + c]) * g;
    grad_x[(b * tokens + token) * channels + c] = static_cast<scalar_t>(sb[token] * g);
  }
  merged_dot = block_sum(merged_dot);
  token_dot = block_sum(token_dot);
  if (threadIdx.x == 0) {
    const acc_t q_j = grad_size_merged[row] - merged_dot;
    q[row] = q_j;
    grad_size[b * tokens + token] = token_dot + q_j;
  }
}

// Grid (NA, B): dL/dx_A[i] = s_A[i] sum_j M[i, j] gz_j, dL/ds_A[i] = sum_j M[i, j] (<x_A[i], gz_j> + q_j).
template <typename scalar_t, typename Matching>
__global__ void __launch_bounds__(kBlockThreads)
    merge_backward_a_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ size,
                            Matching matching, Checkerboard grid, int64_t channels,
                            const acc_type<scalar_t>* __restrict__ gz, const acc_type<scalar_t>* __restrict__ q,
                            scalar_t* __restrict__ grad_x, acc_type<scalar_t>* __restrict__ grad_size) {
  using acc_t = acc_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_b = grid.num_b();
  const int64_t token = b * tokens + grid.a_token(i);
  const acc_t size_a = size[token];
  acc_t partial = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    acc_t g = 0;
    matching.for_each_b_of_a(b, i, [&](int64_t j, acc_t w) { g += w * gz[(b * num_b + j) * channels + c]; });
    grad_x[token * channels + c] = static_cast<scalar_t>(size_a * g);
    partial += static_cast<acc_t>(x[token * channels + c]) * g;
  }
  partial = block_sum(partial);
  if (threadIdx.x == 0) {
    acc_t q_sum = 0;
    matching.for_each_b_of_a(b, i, [&](int64_t j, acc_t w) { q_sum += w * q[b * num_b + j]; });
    grad_size[token] = partial + q_sum;
  }
}

// One warp per A row, in place: grad[b, i, j] = <x_A[i], gz_j> becomes dL/dS[b, i, j] (docs/design.md §3 "STE")
// with dL/dM[i, j] = s_A[i] (grad + q_j) formed on the fly. Prefix columns get 0.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    ste_rows_kernel(acc_t* __restrict__ grad, const acc_t* __restrict__ scores, const acc_t* __restrict__ size,
                    const acc_t* __restrict__ q, Checkerboard grid, int64_t batch) {
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= batch * num_a) return;
  const int64_t b = row / num_a;
  const acc_t size_a = size[b * grid.num_tokens() + grid.a_token(row % num_a)];
  const acc_t* s_row = scores + row * num_b;
  const acc_t* q_row = q + b * num_b;
  acc_t* g_row = grad + row * num_b;
  Top2<acc_t> top;
  for (int64_t j = grid.prefix + lane; j < num_b; j += kWarp) top.push(s_row[j], j);
  top = warp_top2(top);
  top.finish();
  const acc_t threshold = top.threshold();
  acc_t partial = 0;
  for (int64_t j = grid.prefix + lane; j < num_b; j += kWarp) {
    g_row[j] = sigmoid_grad(s_row[j], threshold) * matching_grad(size_a, g_row[j], q_row[j]);
    partial += g_row[j];
  }
  const acc_t row_sum = warp_sum(partial);
  for (int64_t j = lane; j < grid.prefix; j += kWarp) g_row[j] = acc_t(0);
  for (int64_t j = grid.prefix + lane; j < num_b; j += kWarp) g_row[j] = ste_score_grad(g_row[j], row_sum, j, top);
}

// The CUDA merge, as ScatterMeanMergeOps (merge_host.h) and merge_tokens use it; runs on the device of x.
struct Merge {
  // scatter_mean_merge's index k [B, NA] as the CUDA kernels take it: view<acc_t>(k, grid, run) inverts k and calls
  // run(IndexMatching<acc_t>). The counterpart of DenseInput (merge_host.h).
  struct IndexInput {
    template <typename acc_t, typename Run>
    static void view(const Tensor& matching, const Checkerboard& grid, Run run) {
      const Tensor index = matching.contiguous();
      const int64_t batch = index.size(0);
      Tensor offsets = at::empty({batch, grid.num_b() + 1}, index.options());
      Tensor order = at::empty({batch, grid.num_a()}, index.options());
      if (batch > 0) {
        const auto stream = c10::cuda::getCurrentCUDAStream();
        invert_index_kernel<<<static_cast<unsigned int>(batch), kInvertIndexThreads, 0, stream>>>(
            index.data_ptr<int64_t>(), grid.num_a(), grid.num_b(), offsets.data_ptr<int64_t>(),
            order.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      run(IndexMatching<acc_t>{index.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                               grid.num_a(), grid.num_b()});
    }
  };

  // The merge forward for a matching of kind Input (IndexInput or DenseInput).
  template <typename Input>
  static TensorPair forward(const Tensor& x_in, const c10::optional<Tensor>& size, const Tensor& matching,
                            const Checkerboard& grid) {
    const c10::cuda::CUDAGuard guard(x_in.device());
    const Tensor x = x_in.contiguous();
    const Tensor sizes = sizes_or_ones(size, x);
    const int64_t batch = x.size(0);
    const int64_t channels = x.size(2);
    Tensor x_merged = at::empty({batch, grid.num_b(), channels}, x.options());
    Tensor size_merged = at::empty({batch, grid.num_b()}, sizes.options());
    if (batch == 0) return {x_merged, size_merged};
    const dim3 blocks(static_cast<unsigned int>(grid.num_b()), static_cast<unsigned int>(batch));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_forward", [&] {
      using acc_t = acc_type<scalar_t>;
      Input::template view<acc_t>(matching, grid, [&](const auto& view) {
        merge_forward_kernel<<<blocks, threads_for_channels(channels), 0, c10::cuda::getCurrentCUDAStream()>>>(
            x.data_ptr<scalar_t>(), sizes.data_ptr<acc_t>(), view, grid, channels, x_merged.data_ptr<scalar_t>(),
            size_merged.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return {x_merged, size_merged};
  }

  // The merge backward for a matching of kind Input.
  template <typename Input>
  static MergeGrads backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x_in,
                             const c10::optional<Tensor>& size, const Tensor& matching, const Checkerboard& grid) {
    const c10::cuda::CUDAGuard guard(x_in.device());
    MergeGrads grads = allocate_merge_grads(grad_x_merged, grad_size_merged, x_in, size, grid);
    const Tensor& x = grads.x;
    const int64_t batch = x.size(0);
    const int64_t channels = x.size(2);
    if (batch == 0) return grads;
    const dim3 b_blocks(static_cast<unsigned int>(grid.num_b()), static_cast<unsigned int>(batch));
    const dim3 a_blocks(static_cast<unsigned int>(grid.num_a()), static_cast<unsigned int>(batch));
    const unsigned int threads = threads_for_channels(channels);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_backward", [&] {
      using acc_t = acc_type<scalar_t>;
      Input::template view<acc_t>(matching, grid, [&](const auto& view) {
        merge_backward_b_kernel<<<b_blocks, threads, 0, stream>>>(
            grads.g.data_ptr<scalar_t>(), grads.h.data_ptr<acc_t>(), x.data_ptr<scalar_t>(),
            grads.sizes.data_ptr<acc_t>(), view, grid, channels, grads.gz.data_ptr<acc_t>(), grads.q.data_ptr<acc_t>(),
            grads.grad_x.data_ptr<scalar_t>(), grads.grad_size.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_backward_a_kernel<<<a_blocks, threads, 0, stream>>>(
            x.data_ptr<scalar_t>(), grads.sizes.data_ptr<acc_t>(), view, grid, channels, grads.gz.data_ptr<acc_t>(),
            grads.q.data_ptr<acc_t>(), grads.grad_x.data_ptr<scalar_t>(), grads.grad_size.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return grads;
  }
};

}  // namespace

FPET_DEFINE_SCATTER_MEAN_MERGE_OPS(Merge)

TensorPair merge_tokens(const Tensor& x, const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const c10::cuda::CUDAGuard guard(x.device());
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor index = at::empty({x.size(0), grid.num_a()}, x.options().dtype(at::kLong));
  score_rows(normalized, grid, Tensor(), index);  // argmax only: no score matrix is kept
  return Merge::forward<Merge::IndexInput>(x, size, index, grid);
}

TensorTriple merge_tokens_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,
                                   const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                                   int64_t width, int64_t num_prefix_tokens, bool metric_grad) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const c10::cuda::CUDAGuard guard(x.device());
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const auto metric_acc = normalized.hat.scalar_type();
  const Tensor index = at::empty({x.size(0), grid.num_a()}, x.options().dtype(at::kLong));
  const Tensor scores =
      metric_grad ? at::empty({x.size(0), grid.num_a(), grid.num_b()}, normalized.hat.options()) : Tensor();
  score_rows(normalized, grid, scores, index);  // the same scores and k(i) as the forward
  const MergeGrads grads =
      Merge::backward<Merge::IndexInput>(grad_x_merged, grad_size_merged, x, size, index, grid);
  if (!metric_grad) return {grads.grad_x, at::empty({0}, metric.options()), grads.grad_size};

  Tensor grad_scores = a_dot_gz(grads, grid).to(metric_acc).contiguous();
  const Tensor sizes = grads.sizes.to(metric_acc).contiguous();
  const Tensor q = grads.q.to(metric_acc).contiguous();
  const int64_t rows = x.size(0) * grid.num_a();
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(metric_acc, "ste_rows", [&] {
      ste_rows_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_scores.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), sizes.data_ptr<scalar_t>(),
          q.data_ptr<scalar_t>(), grid, x.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const Tensor grad_metric = similarity_backward(grad_scores, normalized, grid, metric.scalar_type());
  return {grads.grad_x, grad_metric, grads.grad_size};
}

}  // namespace cuda
}  // namespace fpet
