// checkerboard_similarity on the CPU: cosine normalisation, score rows with top-2/argmax, and the backward into
// the metric (SPEC sections 2-3). Parallel over batch x rows; every output row is written by one thread.
#include <algorithm>
#include <limits>
#include <vector>

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
void normalize_kernel(const scalar_t* metric, acc_type<scalar_t>* hat, acc_type<scalar_t>* norm,
                      acc_type<scalar_t>* b_transposed, const Checkerboard& grid, int64_t batch, int64_t dim) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t b_cells = grid.num_b() - grid.prefix;
  at::parallel_for(0, batch * tokens, grain_for(2 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* src = metric + row * dim;
      acc_t* dst = hat + row * dim;
      const acc_t row_norm = std::sqrt(dot<acc_t>(src, src, dim));
      const acc_t denom = clamped_norm(row_norm);
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<acc_t>(src[d]) / denom;
      norm[row] = row_norm;
      const int64_t b = row / tokens;
      const int64_t cell = row % tokens - grid.prefix;
      if (cell >= 0 && (cell / grid.width + cell % grid.width) % 2 == 1) {
        acc_t* column = b_transposed + b * dim * b_cells + cell / 2;
        for (int64_t d = 0; d < dim; ++d) column[d * b_cells] = dst[d];
      }
    }
  });
}

constexpr int kColumnBlock = 32;  // score columns per register block

template <typename acc_t>
void score_rows_kernel(const acc_t* hat, const acc_t* b_transposed, const Checkerboard& grid, int64_t batch,
                       int64_t dim, acc_t* scores, int64_t* index) {
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t prefix = grid.prefix;
  const int64_t b_cells = num_b - prefix;
  at::parallel_for(0, batch * num_a, grain_for(dim * b_cells), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(scores ? 0 : b_cells);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_a;
      const int64_t i = row % num_a;
      acc_t* out = scores ? scores + row * num_b + prefix : buffer.data();
      const acc_t* a = hat + (b * tokens + grid.a_token(i)) * dim;
      const acc_t* bt = b_transposed + b * dim * b_cells;
      // S[i, j] = sum_d a[d] * B[j, d], accumulated over d in order; the inner loop runs over a block of columns
      // whose partial sums stay in registers.
      for (int64_t j0 = 0; j0 < b_cells; j0 += kColumnBlock) {
        acc_t block[kColumnBlock] = {};
        if (j0 + kColumnBlock <= b_cells) {
          for (int64_t d = 0; d < dim; ++d) {
            const acc_t ad = a[d];
            const acc_t* src = bt + d * b_cells + j0;
            for (int l = 0; l < kColumnBlock; ++l) block[l] += ad * src[l];
          }
        } else {
          for (int64_t d = 0; d < dim; ++d) axpy(block, a[d], bt + d * b_cells + j0, b_cells - j0);
        }
        std::copy(block, block + std::min<int64_t>(kColumnBlock, b_cells - j0), out + j0);
      }
      Top2<acc_t> top;
      for (int64_t jj = 0; jj < b_cells; ++jj) top.push(out[jj], prefix + jj);
      if (index) index[row] = top.index1;
      if (scores) {
        for (int64_t j = 0; j < prefix; ++j) scores[row * num_b + j] = -std::numeric_limits<acc_t>::infinity();
      }
    }
  });
}

template <typename scalar_t>
void similarity_backward_kernel(const acc_type<scalar_t>* grad_scores, const acc_type<scalar_t>* hat,
                                const acc_type<scalar_t>* norm, const Checkerboard& grid, int64_t batch, int64_t dim,
                                scalar_t* grad_metric) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t prefix = grid.prefix;
  at::parallel_for(0, batch * tokens, grain_for(dim * num_b), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_hat(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / tokens;
      const int64_t cell = row % tokens - prefix;
      scalar_t* out = grad_metric + row * dim;
      if (cell < 0) {  // prefix token: its score columns are constant -inf
        for (int64_t d = 0; d < dim; ++d) out[d] = scalar_t(0);
        continue;
      }
      std::fill(grad_hat.begin(), grad_hat.end(), acc_t(0));
      const acc_t* batch_hat = hat + b * tokens * dim;
      const acc_t* batch_grad = grad_scores + b * num_a * num_b;
      if ((cell / grid.width + cell % grid.width) % 2 == 0) {  // A token i: dm^_A = dS[i, :] m^_B
        const acc_t* grad_row = batch_grad + (cell / 2) * num_b;
        for (int64_t j = prefix; j < num_b; ++j) {
          axpy(grad_hat.data(), grad_row[j], batch_hat + grid.b_token(j) * dim, dim);
        }
      } else {  // B token j: dm^_B = dS[:, j]^T m^_A
        const int64_t j = prefix + cell / 2;
        for (int64_t i = 0; i < num_a; ++i) {
          axpy(grad_hat.data(), batch_grad[i * num_b + j], batch_hat + grid.a_token(i) * dim, dim);
        }
      }
      const acc_t* row_hat = hat + row * dim;
      const acc_t hat_dot_grad = dot<acc_t>(row_hat, grad_hat.data(), dim);
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
  NormalizedMetric result{at::empty({batch, grid.num_tokens(), dim}, options), at::empty({batch, grid.num_tokens()}, options),
                          at::empty({batch, dim, grid.num_b() - grid.prefix}, options)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, metric.scalar_type(), "normalize_metric", [&] {
    using acc_t = acc_type<scalar_t>;
    normalize_kernel<scalar_t>(metric.data_ptr<scalar_t>(), result.hat.data_ptr<acc_t>(),
                               result.norm.data_ptr<acc_t>(), result.b_transposed.data_ptr<acc_t>(), grid, batch, dim);
  });
  return result;
}

void score_rows(const NormalizedMetric& metric, const Checkerboard& grid, const Tensor& scores, const Tensor& index) {
  AT_DISPATCH_FLOATING_TYPES(metric.hat.scalar_type(), "score_rows", [&] {
    score_rows_kernel<scalar_t>(metric.hat.data_ptr<scalar_t>(), metric.b_transposed.data_ptr<scalar_t>(), grid,
                                metric.hat.size(0), metric.hat.size(2),
                                scores.defined() ? scores.data_ptr<scalar_t>() : nullptr,
                                index.defined() ? index.data_ptr<int64_t>() : nullptr);
  });
}

Tensor similarity_backward(const Tensor& grad_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype) {
  const int64_t batch = metric.hat.size(0);
  const int64_t dim = metric.hat.size(2);
  Tensor grad_metric = at::empty({batch, grid.num_tokens(), dim}, metric.hat.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "similarity_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    similarity_backward_kernel<scalar_t>(grad_scores.data_ptr<acc_t>(), metric.hat.data_ptr<acc_t>(),
                                         metric.norm.data_ptr<acc_t>(), grid, batch, dim,
                                         grad_metric.data_ptr<scalar_t>());
  });
  return grad_metric;
}

Tensor checkerboard_similarity(const Tensor& metric, int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  Tensor scores = at::empty({metric.size(0), grid.num_a(), grid.num_b()}, normalized.hat.options());
  score_rows(normalized, grid, scores, Tensor());
  return scores;
}

Tensor checkerboard_similarity_backward(const Tensor& grad_scores, const Tensor& metric, int64_t height,
                                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(metric, height, width, num_prefix_tokens, "metric");
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor grad = grad_scores.to(normalized.hat.scalar_type()).contiguous();
  return similarity_backward(grad, normalized, grid, metric.scalar_type());
}

}  // namespace cpu
}  // namespace fpet
