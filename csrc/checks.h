// Argument checks shared by the CPU and CUDA entry points (host code only). fpet_kernels/ops.py checks the same
// things with friendlier messages; these guard direct torch.ops.fpet calls.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include "fpet_math.h"

namespace fpet {

inline Checkerboard checked_grid(const at::Tensor& tokens, int64_t height, int64_t width, int64_t num_prefix_tokens,
                                 const char* name) {
  TORCH_CHECK(tokens.dim() == 3, name, " must have shape [B, N, D], got ", tokens.sizes());
  TORCH_CHECK(height >= 1 && width >= 1 && height * width >= 2, "grid must have H*W >= 2, got ", height, "x", width);
  TORCH_CHECK(num_prefix_tokens >= 0, "num_prefix_tokens must be >= 0");
  const Checkerboard grid{height, width, num_prefix_tokens};
  TORCH_CHECK(tokens.size(1) == grid.num_tokens(), name, " has N=", tokens.size(1), " tokens, expected P + H*W = ",
              grid.num_tokens());
  return grid;
}

inline void check_size(const c10::optional<at::Tensor>& size, const at::Tensor& x) {
  if (size.has_value()) {
    TORCH_CHECK(size->dim() == 2 && size->size(0) == x.size(0) && size->size(1) == x.size(1),
                "size must have shape [B, N] = [", x.size(0), ", ", x.size(1), "], got ", size->sizes());
    TORCH_CHECK(size->device() == x.device(), "size must be on the device of x");
  }
}

// The kind of matching a merge op takes (fixed by the op, never read off a dtype): scatter_mean_merge's index k,
// int64 [B, NA], or scatter_mean_merge_dense's matching M, float [B, NA, NB].
enum class MatchingKind { kIndex, kDense };

// The inputs of scatter_mean_merge / scatter_mean_merge_dense and their backwards: x on the grid, size [B, N] or
// None, and the matching of the given kind on the device of x. Returns the grid.
inline Checkerboard checked_merge_matching(const at::Tensor& x, const c10::optional<at::Tensor>& size,
                                           const at::Tensor& matching, int64_t height, int64_t width,
                                           int64_t num_prefix_tokens, MatchingKind kind) {
  const Checkerboard grid = checked_grid(x, height, width, num_prefix_tokens, "x");
  check_size(size, x);
  const bool dense = kind == MatchingKind::kDense;
  const char* name = dense ? "matching" : "index";
  TORCH_CHECK(dense ? c10::isFloatingType(matching.scalar_type()) : matching.scalar_type() == at::kLong, name,
              " must be ", dense ? "a float tensor [B, NA, NB]" : "an int64 tensor [B, NA]", ", got ",
              matching.scalar_type());
  TORCH_CHECK(matching.device() == x.device(), name, " must be on the device of x");
  const std::vector<int64_t> shape = dense ? std::vector<int64_t>{x.size(0), grid.num_a(), grid.num_b()}
                                           : std::vector<int64_t>{x.size(0), grid.num_a()};
  TORCH_CHECK(matching.sizes() == at::IntArrayRef(shape), name, " must have shape ", dense ? "[B, NA, NB]" : "[B, NA]",
              " = ", at::IntArrayRef(shape), ", got ", matching.sizes());
  return grid;
}

// The inputs of merge_tokens and its backward: x and metric on the same grid, batch and device; size [B, N] or None.
inline Checkerboard checked_merge_inputs(const at::Tensor& x, const at::Tensor& metric,
                                         const c10::optional<at::Tensor>& size, int64_t height, int64_t width,
                                         int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(x, height, width, num_prefix_tokens, "x");
  checked_grid(metric, height, width, num_prefix_tokens, "metric");
  TORCH_CHECK(metric.size(0) == x.size(0) && metric.device() == x.device(), "metric must match x in B and device");
  check_size(size, x);
  return grid;
}

inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Held around the ATen GEMMs inside the kernels: they run in the kernels' accumulation dtype, which torch.autocast
// (still active for ops called from inside a custom op) would otherwise re-cast to 16 bits.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace fpet
