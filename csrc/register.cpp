// Registration of the fpet ops (docs/design.md §4) with the PyTorch dispatcher: schemas, CPU kernels and, when built
// with FPET_WITH_CUDA, CUDA kernels. Autograd and fake (meta) kernels are registered from Python in
// fpet_kernels/backends/compiled.py. Backward ops take the grads of the forward's outputs and the forward's inputs,
// and return the gradients of its differentiable tensor inputs.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fpet, m) {
  m.def("refine_keys(Tensor metric, Tensor w_down, Tensor w_up, Tensor? keep, float scale, float dropout_p) -> Tensor");
  m.def("refine_keys_backward(Tensor grad, Tensor metric, Tensor w_down, Tensor w_up, Tensor? keep, float scale,"
        " float dropout_p) -> (Tensor, Tensor, Tensor)");
  m.def("checkerboard_similarity(Tensor metric, int height, int width, int num_prefix_tokens) -> Tensor");
  m.def("checkerboard_similarity_backward(Tensor grad_scores, Tensor metric, int height, int width,"
        " int num_prefix_tokens) -> Tensor");
  m.def("ste_match(Tensor scores) -> (Tensor, Tensor)");
  m.def("ste_match_backward(Tensor grad_matching, Tensor scores) -> Tensor");
  m.def("scatter_mean_merge(Tensor x, Tensor? size, Tensor index, int height, int width, int num_prefix_tokens)"
        " -> (Tensor, Tensor)");
  m.def("scatter_mean_merge_backward(Tensor grad_x_merged, Tensor grad_size_merged, Tensor x, Tensor? size,"
        " Tensor index, int height, int width, int num_prefix_tokens) -> (Tensor, Tensor)");
  m.def("scatter_mean_merge_dense(Tensor x, Tensor? size, Tensor matching, int height, int width,"
        " int num_prefix_tokens) -> (Tensor, Tensor)");
  m.def("scatter_mean_merge_dense_backward(Tensor grad_x_merged, Tensor grad_size_merged, Tensor x, Tensor? size,"
        " Tensor matching, int height, int width, int num_prefix_tokens) -> (Tensor, Tensor, Tensor)");
  m.def("merge_tokens(Tensor x, Tensor metric, Tensor? size, int height, int width, int num_prefix_tokens)"
        " -> (Tensor, Tensor)");
  m.def("merge_tokens_backward(Tensor grad_x_merged, Tensor grad_size_merged, Tensor x, Tensor metric,"
        " Tensor? size, int height, int width, int num_prefix_tokens, bool metric_grad) -> (Tensor, Tensor, Tensor)");
}

#define FPET_IMPLEMENT_DEVICE_OPS(device)                                                        \
  m.impl("refine_keys", &fpet::refine_keys);                                                     \
  m.impl("refine_keys_backward", &fpet::refine_keys_backward);                                   \
  m.impl("checkerboard_similarity", &fpet::device::checkerboard_similarity);                     \
  m.impl("checkerboard_similarity_backward", &fpet::device::checkerboard_similarity_backward);   \
  m.impl("ste_match", &fpet::device::ste_match);                                                 \
  m.impl("ste_match_backward", &fpet::device::ste_match_backward);                               \
  m.impl("scatter_mean_merge", &fpet::device::scatter_mean_merge);                               \
  m.impl("scatter_mean_merge_backward", &fpet::device::scatter_mean_merge_backward);             \
  m.impl("scatter_mean_merge_dense", &fpet::device::scatter_mean_merge_dense);                   \
  m.impl("scatter_mean_merge_dense_backward", &fpet::device::scatter_mean_merge_dense_backward); \
  m.impl("merge_tokens", &fpet::device::merge_tokens);                                           \
  m.impl("merge_tokens_backward", &fpet::device::merge_tokens_backward);

TORCH_LIBRARY_IMPL(fpet, CPU, m) { FPET_IMPLEMENT_DEVICE_OPS(cpu) }

#if defined(FPET_WITH_CUDA)
TORCH_LIBRARY_IMPL(fpet, CUDA, m) { FPET_IMPLEMENT_DEVICE_OPS(cuda) }
#endif
