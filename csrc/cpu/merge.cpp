// scatter_mean_merge and the fused merge_tokens on the CPU (SPEC section 2 steps 3-6, section 3).
//
// Forward: each B row j is summed over the A rows matched to it, found through an inverse index (a counting sort
// of k per batch) or, for a float matching, through the non-zero entries of column j; in a fixed order, never with
// atomics. Backward: the closed forms of SPEC section 3; dL/dM is formed row by row from one GEMM
// X_A (G/Z)^T and, in merge_tokens, turned into dL/dS in the same buffer (dL/dM is never stored on its own).
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../checks.h"
#include "../merge_host.h"
#include "../ops.h"
#include "cpu_common.h"
#include "similarity.h"

namespace fpet {
namespace cpu {

namespace {

// A rows grouped by their matched B column: A row order[offsets[j] .. offsets[j+1]) are merged into B row j, in
// ascending order of i (a stable counting sort of k). Per batch: offsets [B, NB + 1], order [B, NA].
struct InverseIndex {
  Tensor offsets;
  Tensor order;
};

InverseIndex invert_index(const Tensor& index, int64_t num_b) {
  const int64_t batch = index.size(0);
  const int64_t num_a = index.size(1);
  InverseIndex inverse{at::zeros({batch, num_b + 1}, index.options()), at::empty({batch, num_a}, index.options())};
  const int64_t* k = index.data_ptr<int64_t>();
  int64_t* offsets = inverse.offsets.data_ptr<int64_t>();
  int64_t* order = inverse.order.data_ptr<int64_t>();
  at::parallel_for(0, batch, grain_for(4 * num_a), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(num_b);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* kb = k + b * num_a;
      int64_t* off = offsets + b * (num_b + 1);
      for (int64_t i = 0; i < num_a; ++i) {
        TORCH_CHECK(kb[i] >= 0 && kb[i] < num_b, "matching index ", kb[i], " out of range [0, ", num_b, ")");
        ++off[kb[i] + 1];
      }
      for (int64_t j = 0; j < num_b; ++j) off[j + 1] += off[j];
      std::copy(off, off + num_b, cursor.begin());
      for (int64_t i = 0; i < num_a; ++i) order[b * num_a + cursor[kb[i]]++] = i;
    }
  });
  return inverse;
}

// total = s_B[j] x_B[j] + sum_i M[i, j] s_A[i] x_A[i], returns Z_j = s_B[j] + sum_i M[i, j] s_A[i] (SPEC section 2,
// step 6). x and size point at batch b; total has C entries.
template <typename scalar_t, typename Matching>
acc_type<scalar_t> merge_row(const scalar_t* x, const acc_type<scalar_t>* size, const Matching& matching,
                             const Checkerboard& grid, int64_t b, int64_t j, int64_t channels,
                             acc_type<scalar_t>* total) {
  using acc_t = acc_type<scalar_t>;
  const int64_t token_b = grid.b_token(j);
  acc_t z = size[token_b];
  scale_into(total, z, x + token_b * channels, channels);
  matching.for_each_a_of_b(b, j, [&](int64_t i, acc_t w) {
    const int64_t token_a = grid.a_token(i);
    const acc_t weight = w * size[token_a];
    axpy(total, weight, x + token_a * channels, channels);
    z += weight;
  });
  return z;
}

template <typename scalar_t, typename Matching>
void merge_forward_kernel(const scalar_t* x, const acc_type<scalar_t>* size, const Matching& matching,
                          const Checkerboard& grid, int64_t batch, int64_t channels, scalar_t* x_merged,
                          acc_type<scalar_t>* size_merged) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_b = grid.num_b();
  at::parallel_for(0, batch * num_b, grain_for(2 * channels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_b;
      const int64_t j = row % num_b;
      const acc_t z = merge_row(x + b * tokens * channels, size + b * tokens, matching, grid, b, j, channels,
                                total.data());
      store_divided(x_merged + row * channels, total.data(), z, channels);
      size_merged[row] = z;
    }
  });
}

// Gradients of x and size (SPEC section 3), plus what dL/dM needs: gz = g / Z [B, NB, C] and
// q_j = h_j - <x'_j, gz_j> [B, NB], so that dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> + q_j).
template <typename scalar_t, typename Matching>
void merge_backward_kernel(const scalar_t* grad_x_merged, const acc_type<scalar_t>* grad_size_merged,
                           const scalar_t* x, const acc_type<scalar_t>* size, const Matching& matching,
                           const Checkerboard& grid, int64_t batch, int64_t channels, acc_type<scalar_t>* gz,
                           acc_type<scalar_t>* q, scalar_t* grad_x, acc_type<scalar_t>* grad_size) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  // B rows: dL/dx_B[j] = s_B[j] gz_j, dL/ds_B[j] = <x_B[j], gz_j> + q_j.
  at::parallel_for(0, batch * num_b, grain_for(4 * channels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged(channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_b;
      const int64_t j = row % num_b;
      const scalar_t* xb = x + b * tokens * channels;
      const acc_t* sb = size + b * tokens;
      const acc_t z = merge_row(xb, sb, matching, grid, b, j, channels, merged.data());
      for (int64_t c = 0; c < channels; ++c) merged[c] /= z;  // x'_j
      acc_t* gz_row = gz + row * channels;
      const scalar_t* g_row = grad_x_merged + row * channels;
      for (int64_t c = 0; c < channels; ++c) gz_row[c] = static_cast<acc_t>(g_row[c]) / z;
      q[row] = grad_size_merged[row] - dot<acc_t>(merged.data(), gz_row, channels);
      const int64_t token = grid.b_token(j);
      store_scaled(grad_x + (b * tokens + token) * channels, gz_row, sb[token], channels);
      grad_size[b * tokens + token] = dot<acc_t>(xb + token * channels, gz_row, channels) + q[row];
    }
  });
  // A rows: dL/dx_A[i] = s_A[i] sum_j M[i, j] gz_j, dL/ds_A[i] = sum_j M[i, j] (<x_A[i], gz_j> + q_j).
  at::parallel_for(0, batch * num_a, grain_for(4 * channels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_row(channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_a;
      const int64_t i = row % num_a;
      const int64_t token = grid.a_token(i);
      const scalar_t* xa = x + (b * tokens + token) * channels;
      std::fill(grad_row.begin(), grad_row.end(), acc_t(0));
      acc_t grad_s = 0;
      matching.for_each_b_of_a(b, i, [&](int64_t j, acc_t w) {
        const acc_t* gz_row = gz + (b * num_b + j) * channels;
        axpy(grad_row.data(), w, gz_row, channels);
        grad_s += w * (dot<acc_t>(xa, gz_row, channels) + q[b * num_b + j]);
      });
      store_scaled(grad_x + (b * tokens + token) * channels, grad_row.data(), size[b * tokens + token], channels);
      grad_size[b * tokens + token] = grad_s;
    }
  });
}

// In place: grad[b, i, j] = <x_A[i], gz_j> (from the GEMM) becomes dL/dS[b, i, j] (SPEC section 3, "STE"), with
// dL/dM[i, j] = s_A[i] (grad + q_j) formed on the fly. Prefix columns get 0.
template <typename acc_t>
void ste_rows_in_place(acc_t* grad, const acc_t* scores, const acc_t* size, const acc_t* q, const Checkerboard& grid,
                       int64_t batch) {
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t prefix = grid.prefix;
  at::parallel_for(0, batch * num_a, grain_for(8 * num_b), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_a;
      const acc_t size_a = size[b * tokens + grid.a_token(row % num_a)];
      const acc_t* s_row = scores + row * num_b;
      const acc_t* q_row = q + b * num_b;
      acc_t* g_row = grad + row * num_b;
      Top2<acc_t> top;
      for (int64_t j = prefix; j < num_b; ++j) top.push(s_row[j], j);
      top.finish();
      const acc_t threshold = top.threshold();
      acc_t row_sum = 0;
      for (int64_t j = 0; j < prefix; ++j) g_row[j] = acc_t(0);
      for (int64_t j = prefix; j < num_b; ++j) {
        g_row[j] = sigmoid_grad(s_row[j], threshold) * matching_grad(size_a, g_row[j], q_row[j]);
        row_sum += g_row[j];
      }
      for (int64_t j = prefix; j < num_b; ++j) g_row[j] = ste_score_grad(g_row[j], row_sum, j, top);
    }
  });
}

// Calls run(matching_view) with an IndexMatching (int64 index) or a DenseMatching (float matching) in acc_t.
template <typename acc_t, typename Run>
void with_matching(const Tensor& matching, const Checkerboard& grid, Run run) {
  if (matching.scalar_type() == at::kLong) {
    const Tensor index = matching.contiguous();
    const InverseIndex inverse = invert_index(index, grid.num_b());
    run(IndexMatching<acc_t>{index.data_ptr<int64_t>(), inverse.offsets.data_ptr<int64_t>(),
                             inverse.order.data_ptr<int64_t>(), grid.num_a(), grid.num_b()});
  } else {
    const Tensor weights = matching.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    run(DenseMatching<acc_t>{weights.data_ptr<acc_t>(), grid.num_a(), grid.num_b()});
  }
}

TensorPair merge_forward(const Tensor& x_in, const c10::optional<Tensor>& size, const Tensor& matching,
                         const Checkerboard& grid) {
  const Tensor x = x_in.contiguous();
  const Tensor sizes = sizes_or_ones(size, x);
  Tensor x_merged = at::empty({x.size(0), grid.num_b(), x.size(2)}, x.options());
  Tensor size_merged = at::empty({x.size(0), grid.num_b()}, sizes.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    with_matching<acc_t>(matching, grid, [&](const auto& view) {
      merge_forward_kernel(x.data_ptr<scalar_t>(), sizes.data_ptr<acc_t>(), view, grid, x.size(0), x.size(2),
                           x_merged.data_ptr<scalar_t>(), size_merged.data_ptr<acc_t>());
    });
  });
  return {x_merged, size_merged};
}

MergeGrads merge_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x_in,
                          const c10::optional<Tensor>& size, const Tensor& matching, const Checkerboard& grid) {
  MergeGrads grads = allocate_merge_grads(grad_x_merged, grad_size_merged, x_in, size, grid);
  const Tensor& x = grads.x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    with_matching<acc_t>(matching, grid, [&](const auto& view) {
      merge_backward_kernel(grads.g.data_ptr<scalar_t>(), grads.h.data_ptr<acc_t>(), x.data_ptr<scalar_t>(),
                            grads.sizes.data_ptr<acc_t>(), view, grid, x.size(0), x.size(2),
                            grads.gz.data_ptr<acc_t>(), grads.q.data_ptr<acc_t>(), grads.grad_x.data_ptr<scalar_t>(),
                            grads.grad_size.data_ptr<acc_t>());
    });
  });
  return grads;
}

}  // namespace

TensorPair scatter_mean_merge(const Tensor& x, const c10::optional<Tensor>& size, const Tensor& matching,
                              int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(x, height, width, num_prefix_tokens, "x");
  check_size(size, x);
  check_matching(matching, x, grid);
  return merge_forward(x, size, matching, grid);
}

TensorTriple scatter_mean_merge_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged,
                                         const Tensor& x, const c10::optional<Tensor>& size, const Tensor& matching,
                                         int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(x, height, width, num_prefix_tokens, "x");
  check_size(size, x);
  check_matching(matching, x, grid);
  const MergeGrads grads = merge_backward(grad_x_merged, grad_size_merged, x, size, matching, grid);
  if (matching.scalar_type() == at::kLong) {  // an index carries no gradient
    return {grads.grad_x, grads.grad_size, at::empty({0}, matching.options())};
  }
  // dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> + q_j)
  const Tensor size_a = grads.sizes.index_select(1, a_token_index(grid, x));
  const Tensor grad_matching = size_a.unsqueeze(-1) * (a_dot_gz(grads, grid) + grads.q.unsqueeze(1));
  return {grads.grad_x, grads.grad_size, grad_matching.to(matching.scalar_type())};
}

namespace {

Checkerboard checked_merge_inputs(const Tensor& x, const Tensor& metric, const c10::optional<Tensor>& size,
                                  int64_t height, int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_grid(x, height, width, num_prefix_tokens, "x");
  checked_grid(metric, height, width, num_prefix_tokens, "metric");
  TORCH_CHECK(metric.size(0) == x.size(0) && metric.device() == x.device(), "metric must match x in B and device");
  check_size(size, x);
  return grid;
}

}  // namespace

TensorPair merge_tokens(const Tensor& x, const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor index = at::empty({x.size(0), grid.num_a()}, x.options().dtype(at::kLong));
  score_rows(normalized, grid, Tensor(), index);  // argmax only: no score matrix is kept
  return merge_forward(x, size, index, grid);
}

TensorTriple merge_tokens_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,
                                   const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                                   int64_t width, int64_t num_prefix_tokens, bool metric_grad) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const auto metric_acc = normalized.hat.scalar_type();
  const Tensor index = at::empty({x.size(0), grid.num_a()}, x.options().dtype(at::kLong));
  const Tensor scores = metric_grad ? at::empty({x.size(0), grid.num_a(), grid.num_b()}, normalized.hat.options())
                                    : Tensor();
  score_rows(normalized, grid, scores, index);  // the same scores and k(i) as the forward
  const MergeGrads grads = merge_backward(grad_x_merged, grad_size_merged, x, size, index, grid);
  if (!metric_grad) return {grads.grad_x, at::empty({0}, metric.options()), grads.grad_size};

  Tensor grad_scores = a_dot_gz(grads, grid).to(metric_acc).contiguous();
  const Tensor sizes = grads.sizes.to(metric_acc).contiguous();
  const Tensor q = grads.q.to(metric_acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(metric_acc, "ste_rows_in_place", [&] {
    ste_rows_in_place(grad_scores.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), sizes.data_ptr<scalar_t>(),
                      q.data_ptr<scalar_t>(), grid, x.size(0));
  });
  const Tensor grad_metric = similarity_backward(grad_scores, normalized, grid, metric.scalar_type());
  return {grads.grad_x, grad_metric, grads.grad_size};
}

}  // namespace cpu
}  // namespace fpet
