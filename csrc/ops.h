// Entry points of the fpet ops (docs/design.md §4), one definition per device; registered in register.cpp.
// Shapes and dtypes are those of fpet_kernels/reference.py. Backward ops return the gradients of their op's inputs.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fpet {

using at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// Device-agnostic (ATen GEMMs): refine_keys.cpp. keep: the dropout keep mask (bool, the hidden shape) or None.
Tensor refine_keys(const Tensor& metric, const Tensor& w_down, const Tensor& w_up, const c10::optional<Tensor>& keep,
                   double scale, double dropout_p);
TensorTriple refine_keys_backward(const Tensor& grad, const Tensor& metric, const Tensor& w_down, const Tensor& w_up,
                                  const c10::optional<Tensor>& keep, double scale, double dropout_p);

#define FPET_DECLARE_DEVICE_OPS(device)                                                                            \
  namespace device {                                                                                               \
  Tensor checkerboard_similarity(const Tensor& metric, int64_t height, int64_t width, int64_t num_prefix_tokens);  \
  Tensor checkerboard_similarity_backward(const Tensor& grad_scores, const Tensor& metric, int64_t height,         \
                                          int64_t width, int64_t num_prefix_tokens);                               \
  TensorPair ste_match(const Tensor& scores);                                                                      \
  Tensor ste_match_backward(const Tensor& grad_matching, const Tensor& scores);                                    \
  TensorPair scatter_mean_merge(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& index,           \
                                int64_t height, int64_t width, int64_t num_prefix_tokens);                         \
  TensorPair scatter_mean_merge_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged,              \
                                         const Tensor& x, const c10::optional<Tensor>& size, const Tensor& index,  \
                                         int64_t height, int64_t width, int64_t num_prefix_tokens);                \
  TensorPair scatter_mean_merge_dense(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& matching,  \
                                      int64_t height, int64_t width, int64_t num_prefix_tokens);                   \
  TensorTriple scatter_mean_merge_dense_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged,      \
                                                 const Tensor& x, const c10::optional<Tensor>& size,               \
                                                 const Tensor& matching, int64_t height, int64_t width,            \
                                                 int64_t num_prefix_tokens);                                       \
  TensorPair merge_tokens(const Tensor& x, const Tensor& metric, const c10::optional<Tensor>& size, int64_t height, \
                          int64_t width, int64_t num_prefix_tokens);                                               \
  TensorTriple merge_tokens_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,  \
                                     const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,       \
                                     int64_t width, int64_t num_prefix_tokens, bool metric_grad);                  \
  }

FPET_DECLARE_DEVICE_OPS(cpu)
#if defined(FPET_WITH_CUDA)
FPET_DECLARE_DEVICE_OPS(cuda)
#endif

#undef FPET_DECLARE_DEVICE_OPS

}  // namespace fpet
