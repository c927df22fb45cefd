// refine_keys (docs/design.md §2 step 2): m + Up(Dropout(ReLU(Down(m)))) * scale as ATen ops, for every device.
// Dropout comes in as its keep mask (bool, the hidden shape [..., d], drawn by reference.dropout_keep_mask) or None
// for no dropout. The forward is the reference's op sequence exactly (fpet_kernels/reference.py refine_keys), so its
// result equals the reference's bit for bit: metric as given (not made contiguous), the residual added as its own op
// (metric + (up * scale), not at::add with alpha, which would fuse into one FMA).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "ops.h"

namespace fpet {

namespace {

// t * keep * (1 / (1 - p)) with keep the dropout keep mask of the hidden units, t unchanged without one.
Tensor apply_keep(const Tensor& t, const c10::optional<Tensor>& keep, double dropout_p) {
  if (!keep.has_value()) return t;
  TORCH_CHECK(keep->scalar_type() == at::kBool, "keep must be a bool tensor, got ", keep->scalar_type());
  TORCH_CHECK(keep->sizes() == t.sizes(), "keep must have the hidden shape ", t.sizes(), ", got ", keep->sizes());
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1) with a keep mask, got ", dropout_p);
  return t.mul(*keep).mul(1.0 / (1.0 - dropout_p));
}

// ReLU(Down(m)), before dropout.
Tensor hidden_units(const Tensor& metric, const Tensor& w_down) { return at::relu(at::linear(metric, w_down)); }

}  // namespace

Tensor refine_keys(const Tensor& metric, const Tensor& w_down, const Tensor& w_up, const c10::optional<Tensor>& keep,
                   double scale, double dropout_p) {
  const Tensor hidden = apply_keep(hidden_units(metric, w_down), keep, dropout_p);
  return metric.add(at::linear(hidden, w_up).mul(scale));
}

// -> (dL/dmetric, dL/dw_down, dL/dw_up). The mask scales the hidden units' gradient like the units themselves, and
// dL/dw_up is taken against the dropped units.
TensorTriple refine_keys_backward(const Tensor& grad, const Tensor& metric, const Tensor& w_down, const Tensor& w_up,
                                  const c10::optional<Tensor>& keep, double scale, double dropout_p) {
  const int64_t dim = metric.size(-1);
  const int64_t hidden_dim = w_down.size(0);
  const Tensor hidden = hidden_units(metric, w_down);                                 // [..., d]
  const Tensor dropped = apply_keep(hidden, keep, dropout_p);                         // [..., d]
  const Tensor grad_up = grad * scale;                                                // [..., Dh]
  const Tensor grad_dropped = apply_keep(at::matmul(grad_up, w_up), keep, dropout_p); // [..., d]
  const Tensor grad_hidden = at::threshold_backward(grad_dropped, hidden, 0);         // through the ReLU
  const Tensor grad_w_up = grad_up.reshape({-1, dim}).t().mm(dropped.reshape({-1, hidden_dim}));
  const Tensor grad_w_down = grad_hidden.reshape({-1, hidden_dim}).t().mm(metric.reshape({-1, dim}));
  const Tensor grad_metric = grad + at::matmul(grad_hidden, w_down);
  return {grad_metric, grad_w_down, grad_w_up};
}

}  // namespace fpet
