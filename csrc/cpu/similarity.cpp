// checkerboard_similarity on the CPU: cosine normalisation, scores as a GEMM per batch, argmax rows, and the
// backward into the metric (docs/design.md §2-§3). Kernels run in parallel over batches (the cosine backward over
// batch x rows); every output row is written by one thread, so results do not depend on the thread count.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../checks.h"
#include "../ops.h"
#include "cpu_common.h"
#include "similarity.h"

namespace fpet {
namespace cpu {

namespace {

template <typename scalar_t>
void cosine_backward_kernel(const acc_type<scalar_t>* grad_hat_a, const acc_type<scalar_t>* grad_hat_b,
                            const NormalizedMetric& metric, const Checkerboard& grid, int64_t batch, int64_t dim,
                            scalar_t* grad_metric) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t b_cells = grid.num_b() - grid.prefix;
  const acc_t* hat_a = metric.hat_a.data_ptr<acc_t>();
  const acc_t* hat_b = metric.hat_b.data_ptr<acc_t>();
  const acc_t* norm = metric.norm.data_ptr<acc_t>();
  at::parallel_for(0, batch * tokens, grain_for(4 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out = grad_metric + row * dim;
      const int64_t b = row / tokens;
      const TokenSlot slot = token_slot(grid, row % tokens);
      if (slot.rank < 0) {  // prefix token: its score columns are constant -inf
        for (int64_t d = 0; d < dim; ++d) out[d] = scalar_t(0);
        continue;
      }
      const int64_t offset = ((slot.is_a ? b * num_a : b * b_cells) + slot.rank) * dim;
      const acc_t* row_hat = (slot.is_a ? hat_a : hat_b) + offset;
      const acc_t* grad_hat = (slot.is_a ? grad_hat_a : grad_hat_b) + offset;
      const acc_t hat_dot_grad = dot<acc_t>(row_hat, grad_hat, dim);
      for (int64_t d = 0; d < dim; ++d) {
        out[d] = static_cast<scalar_t>(normalize_backward(grad_hat[d], row_hat[d], hat_dot_grad, norm[row]));
      }
    }
  });
}

}  // namespace

NormalizedMetric normalize_metric(const Tensor& metric_in, const Checkerboard& grid) {
  const Tensor metric = metric_in.contiguous();
  const int64_t batch = metric.size(0);
  const int64_t dim = metric.size(2);
  const auto options = metric.options().dtype(accumulation_dtype(metric.scalar_type()));
  NormalizedMetric result{at::empty({batch, grid.num_a(), dim}, options),
                          at::empty({batch, grid.num_b() - grid.prefix, dim}, options),
                          at::empty({batch, grid.num_tokens()}, options)};
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t cells = grid.num_b() - grid.prefix;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, metric.scalar_type(), "normalize_metric", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* m = metric.data_ptr<scalar_t>();
    acc_t* hat_a = result.hat_a.data_ptr<acc_t>();
    acc_t* hat_b = result.hat_b.data_ptr<acc_t>();
    acc_t* norm = result.norm.data_ptr<acc_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        normalize_batch(m + b * tokens * dim, grid, dim, hat_a + b * num_a * dim, hat_b + b * cells * dim,
                        norm + b * tokens);
      }
    });
  });
  return result;
}

Tensor cell_scores(const NormalizedMetric& metric, const Checkerboard& grid) {
  const int64_t batch = metric.hat_a.size(0);
  const int64_t dim = metric.hat_a.size(2);
  const int64_t num_a = grid.num_a();
  const int64_t cells = grid.num_b() - grid.prefix;
  Tensor scores = at::empty({batch, num_a, cells}, metric.hat_a.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "cell_scores", [&] {
    const scalar_t* hat_a = metric.hat_a.data_ptr<scalar_t>();
    const scalar_t* hat_b = metric.hat_b.data_ptr<scalar_t>();
    scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        batch_scores(hat_a + b * num_a * dim, hat_b + b * cells * dim, grid, dim, s + b * num_a * cells);
      }
    });
  });
  return scores;
}

void argmax_rows(const Tensor& scores, const Checkerboard& grid, const Tensor& index) {
  const int64_t batch = scores.size(0);
  const int64_t num_a = grid.num_a();
  const int64_t cells = grid.num_b() - grid.prefix;
  int64_t* k = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "argmax_rows", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) batch_argmax(s + b * num_a * cells, grid, k + b * num_a);
    });
  });
}

Tensor similarity_backward(const Tensor& grad_cell_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype) {
  const int64_t batch = metric.norm.size(0);
  const int64_t dim = metric.hat_a.size(2);
  // dm^_A = dS m^_B, dm^_B = dS^T m^_A (docs/design.md §3 "Cosine")
  const NoAutocast no_autocast;
  const Tensor grad_hat_a = at::bmm(grad_cell_scores, metric.hat_b);
  const Tensor grad_hat_b = at::bmm(grad_cell_scores.transpose(1, 2), metric.hat_a);
  Tensor grad_metric = at::empty({batch, grid.num_tokens(), dim}, metric.norm.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "similarity_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    cosine_backward_kernel<scalar_t>(grad_hat_a.data_ptr<acc_t>(), grad_hat_b.data_ptr<acc_t>(), metric, grid, batch,
                                     dim, grad_metric.data_ptr<scalar_t>());
  });
  return grad_metric;
}

Tensor checkerboard_similarity(const Tensor& metric, int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const Tensor scores = cell_scores(normalize_metric(metric, grid), grid);
  if (grid.prefix == 0) return scores;
  // prefix columns -inf: nothing merges into a prefix token
  return at::constant_pad_nd(scores, {grid.prefix, 0}, -std::numeric_limits<double>::infinity());
}

Tensor checkerboard_similarity_backward(const Tensor& grad_scores, const Tensor& metric, int64_t height,
                                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor grad = grad_scores.narrow(2, grid.prefix, grid.num_b() - grid.prefix).to(normalized.norm.scalar_type());
  return similarity_backward(grad, normalized, grid, metric.scalar_type());
}

}  // namespace cpu
}  // namespace fpet
