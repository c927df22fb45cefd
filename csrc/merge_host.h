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

// Inputs and outputs of the merge backward (SPEC section 3), shared by the CPU and CUDA kernels.
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

// The matching's gradient of scatter_mean_merge: none for an index (an empty tensor), else
// dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> + q_j) (SPEC section 3) in the matching's dtype.
inline at::Tensor matching_grad(const MergeGrads& grads, const Checkerboard& grid, const at::Tensor& matching) {
  if (matching.scalar_type() == at::kLong) return at::empty({0}, matching.options());
  const at::Tensor size_a = grads.sizes.index_select(1, a_token_index(grid, grads.x));
  return size_a.unsqueeze(-1).mul(a_dot_gz(grads, grid).add(grads.q.unsqueeze(1))).to(matching.scalar_type());
}

}  // namespace fpet
