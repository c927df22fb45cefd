// Host-side tensor helpers of the merge, shared by cpu/merge.cpp and cuda/merge.cu (ATen calls, no kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/ones.h>
#include <c10/util/Optional.h>

#include "checks.h"
#include "fpet_math.h"
#include "ops.h"

namespace fpet {

// Token sizes [B, N] in the accumulation dtype, contiguous; all ones when size is None.
inline at::Tensor sizes_or_ones(const c10::optional<at::Tensor>& size, const at::Tensor& x) {
  const auto options = x.options().dtype(accumulation_dtype(x.scalar_type()));
  return size.has_value() ? size->to(options).contiguous() : at::ones({x.size(0), x.size(1)}, options);
}

// Token indices of the A set [NA], on the device of like.
inline at::Tensor a_token_index(const Checkerboard& grid, const at::Tensor& like) {
  at::Tensor tokens = at::empty({grid.num_a()}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < grid.num_a(); ++i) t[i] = grid.a_token(i);
  return tokens.to(like.device());
}

// x_A as a [B, NA, C] matrix in the accumulation dtype, for the GEMM X_A (G/Z)^T. With W odd the A tokens are
// every other token, so when x already has that dtype a strided view is enough.
inline at::Tensor a_tokens(const at::Tensor& x, const Checkerboard& grid) {
  const auto acc = accumulation_dtype(x.scalar_type());
  if (grid.width % 2 == 1 && x.scalar_type() == acc) {
    return x.slice(1, grid.prefix, grid.prefix + 2 * grid.num_a() - 1, 2);
  }
  return at::index_select(x, 1, a_token_index(grid, x)).to(acc);
}

// Inputs and outputs of the merge backward (docs/design.md §3), shared by the CPU and CUDA kernels.
struct MergeGrads {
  at::Tensor x;          // contiguous input tokens
  at::Tensor sizes;      // [B, N] token sizes in the accumulation dtype
  at::Tensor g;          // [B, NB, C] dL/dx', contiguous, dtype of x
  at::Tensor h;          // [B, NB] dL/dsize', contiguous, accumulation dtype
  at::Tensor grad_x;     // [B, N, C], dtype of x
  at::Tensor grad_size;  // [B, N], accumulation dtype
  at::Tensor gz;         // [B, NB, C] g / Z
  at::Tensor q;          // [B, NB] h - <x', g / Z>
};

// The backward's inputs made contiguous in their dtypes and its outputs allocated (filled by the device kernels).
inline MergeGrads allocate_merge_grads(const at::Tensor& grad_x_merged, const at::Tensor& grad_size_merged,
                                       const at::Tensor& x_in, const c10::optional<at::Tensor>& size,
                                       const Checkerboard& grid) {
  MergeGrads grads;
  grads.x = x_in.contiguous();
  grads.sizes = sizes_or_ones(size, grads.x);
  grads.g = grad_x_merged.to(grads.x.scalar_type()).contiguous();
  grads.h = grad_size_merged.to(grads.sizes.scalar_type()).contiguous();
  grads.grad_x = at::empty_like(grads.x);
  grads.grad_size = at::empty_like(grads.sizes);
  grads.gz = at::empty({grads.x.size(0), grid.num_b(), grads.x.size(2)}, grads.sizes.options());
  grads.q = at::empty({grads.x.size(0), grid.num_b()}, grads.sizes.options());
  return grads;
}

// <x_A[i], g_j / Z_j> for all (i, j): [B, NA, NB] in the accumulation dtype of x.
inline at::Tensor a_dot_gz(const MergeGrads& grads, const Checkerboard& grid) {
  const NoAutocast no_autocast;
  return at::bmm(a_tokens(grads.x, grid), grads.gz.transpose(1, 2));
}

// scatter_mean_merge_dense's matching M [B, NA, NB] as the kernels of both devices take it: view<acc_t>(M, grid, run)
// calls run(DenseMatching<acc_t>) over M in the accumulation dtype, contiguous. (Each device's IndexInput does the
// same for scatter_mean_merge's index k.)
struct DenseInput {
  template <typename acc_t, typename Run>
  static void view(const at::Tensor& matching, const Checkerboard& grid, Run run) {
    const at::Tensor weights = matching.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    run(DenseMatching<acc_t>{weights.data_ptr<acc_t>(), grid.num_a(), grid.num_b()});
  }
};

// The matching's gradient of scatter_mean_merge_dense: dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> + q_j)
// (docs/design.md §3) in the matching's dtype.
inline at::Tensor matching_grad(const MergeGrads& grads, const Checkerboard& grid, const at::Tensor& matching) {
  const at::Tensor size_a = grads.sizes.index_select(1, a_token_index(grid, grads.x));
  return size_a.unsqueeze(-1).mul(a_dot_gz(grads, grid).add(grads.q.unsqueeze(1))).to(matching.scalar_type());
}

// The entry points of scatter_mean_merge, scatter_mean_merge_dense and their backwards (registered in register.cpp),
// written once for both devices over Merge, a device's merge: Merge::IndexInput, its view of an index (DenseInput
// above serves both devices), and the templates Merge::forward<Input>(x, size, matching, grid) -> (x', size') and
// Merge::backward<Input>(grad_x_merged, grad_size_merged, x, size, matching, grid) -> MergeGrads, which run on the
// device of x. Each op takes one kind of matching; none looks at a dtype to choose.
template <typename Merge>
struct ScatterMeanMergeOps {
  using IndexInput = typename Merge::IndexInput;

  static TensorPair index(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& index, int64_t height,
                          int64_t width, int64_t num_prefix_tokens) {
    return Merge::template forward<IndexInput>(
        x, size, index, checked_merge_matching(x, size, index, height, width, num_prefix_tokens, MatchingKind::kIndex));
  }

  // -> (dL/dx, dL/dsize)
  static TensorPair index_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,
                                   const c10::optional<Tensor>& size, const Tensor& index, int64_t height,
                                   int64_t width, int64_t num_prefix_tokens) {
    const MergeGrads grads = Merge::template backward<IndexInput>(
        grad_x_merged, grad_size_merged, x, size, index,
        checked_merge_matching(x, size, index, height, width, num_prefix_tokens, MatchingKind::kIndex));
    return {grads.grad_x, grads.grad_size};
  }

  static TensorPair dense(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& matching, int64_t height,
                          int64_t width, int64_t num_prefix_tokens) {
    return Merge::template forward<DenseInput>(
        x, size, matching,
        checked_merge_matching(x, size, matching, height, width, num_prefix_tokens, MatchingKind::kDense));
  }

  // -> (dL/dx, dL/dsize, dL/dM)
  static TensorTriple dense_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,
                                     const c10::optional<Tensor>& size, const Tensor& matching, int64_t height,
                                     int64_t width, int64_t num_prefix_tokens) {
    const Checkerboard grid =
        checked_merge_matching(x, size, matching, height, width, num_prefix_tokens, MatchingKind::kDense);
    const MergeGrads grads =
        Merge::template backward<DenseInput>(grad_x_merged, grad_size_merged, x, size, matching, grid);
    return {grads.grad_x, grads.grad_size, matching_grad(grads, grid, matching)};
  }
};

// Defines a device's four scatter_mean_merge entry points (declared in ops.h, registered in register.cpp) as those of
// ScatterMeanMergeOps<Merge>, in the device's namespace: one definition for both devices.
#define FPET_DEFINE_SCATTER_MEAN_MERGE_OPS(Merge)                                                                   \
  TensorPair scatter_mean_merge(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& index,            \
                                int64_t height, int64_t width, int64_t num_prefix_tokens) {                         \
    return ScatterMeanMergeOps<Merge>::index(x, size, index, height, width, num_prefix_tokens);                     \
  }                                                                                                                 \
  TensorPair scatter_mean_merge_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged,               \
                                         const Tensor& x, const c10::optional<Tensor>& size, const Tensor& index,   \
                                         int64_t height, int64_t width, int64_t num_prefix_tokens) {                \
    return ScatterMeanMergeOps<Merge>::index_backward(grad_x_merged, grad_size_merged, x, size, index, height,      \
                                                      width, num_prefix_tokens);                                    \
  }                                                                                                                 \
  TensorPair scatter_mean_merge_dense(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& matching,   \
                                      int64_t height, int64_t width, int64_t num_prefix_tokens) {                   \
    return ScatterMeanMergeOps<Merge>::dense(x, size, matching, height, width, num_prefix_tokens);                  \
  }                                                                                                                 \
  TensorTriple scatter_mean_merge_dense_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged,       \
                                                 const Tensor& x, const c10::optional<Tensor>& size,                \
                                                 const Tensor& matching, int64_t height, int64_t width,             \
                                                 int64_t num_prefix_tokens) {                                       \
    return ScatterMeanMergeOps<Merge>::dense_backward(grad_x_merged, grad_size_merged, x, size, matching, height,   \
                                                      width, num_prefix_tokens);                                    \
  }

}  // namespace fpet
