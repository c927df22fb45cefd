// refine_keys (SPEC section 2, step 2): m + scale * Up(ReLU(Down(m))) as two ATen GEMMs, for every device.
// Dropout is not part of this op: with dropout active (training and p > 0) fpet_kernels/compiled.py calls the
// reference instead.
#include <ATen/ATen.h>

#include "ops.h"

namespace fpet {

Tensor refine_keys(const Tensor& metric_in, const Tensor& w_down, const Tensor& w_up, double scale) {
  const Tensor metric = metric_in.contiguous();
  const Tensor hidden = at::relu(at::linear(metric, w_down));
  return at::add(metric, at::linear(hidden, w_up), scale);
}

TensorTriple refine_keys_backward(const Tensor& grad_in, const Tensor& metric_in, const Tensor& w_down,
                                  const Tensor& w_up, double scale) {
  const Tensor grad = grad_in.contiguous();
  const Tensor metric = metric_in.contiguous();
  const int64_t dim = metric.size(-1);
  const int64_t hidden_dim = w_down.size(0);
  const Tensor hidden = at::relu(at::linear(metric, w_down));
  const Tensor grad_up = grad * scale;                                               // [B, N, Dh]
  const Tensor grad_hidden = at::threshold_backward(at::matmul(grad_up, w_up), hidden, 0);  // [B, N, d]
  const Tensor grad_w_up = grad_up.reshape({-1, dim}).t().mm(hidden.reshape({-1, hidden_dim}));
  const Tensor grad_w_down = grad_hidden.reshape({-1, hidden_dim}).t().mm(metric.reshape({-1, dim}));
  const Tensor grad_metric = grad + at::matmul(grad_hidden, w_down);
  return {grad_metric, grad_w_down, grad_w_up};
}

}  // namespace fpet
