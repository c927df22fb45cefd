// scatter_mean_merge, scatter_mean_merge_dense and the fused merge_tokens on the CPU (docs/design.md §2 steps 3-6,
// §3).
//
// One-hot matching (an index k): the forward reads x once, in memory order, per (batch, channel slice), adding
// s_t x[t] into the B row that token t is merged into (itself for a B token, k(i) for A cell i), then divides each
// row by Z_j. Each output element is summed in that fixed order by one thread, never with atomics, so results do
// not depend on the thread count or on how channels are sliced. The backward applies the closed forms of
// docs/design.md §3 per batch; dL/dM is formed from one GEMM X_A (G/Z)^T and, in merge_tokens, turned into dL/dS in
// the same buffer (dL/dM is never stored on its own). Dense matchings (scatter_mean_merge_dense) walk the non-zero
// entries of M instead. The two kinds of kernel are overloads on the matching (an index pointer or a DenseMatching),
// so the host code below is written once for both.
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

// ------------------------------------------------------------------------------------- one-hot matching (index)

// Channel slices per batch row: one when the batch alone keeps every thread busy, more for small batches (and one
// for an empty batch, which has no rows to slice).
int64_t channel_slices(int64_t batch, int64_t channels) {
  if (batch <= 0) return 1;
  const int64_t wanted = (2 * at::get_num_threads() + batch - 1) / batch;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, channels / 64));
}

// The B row token t goes to: itself for a prefix token or B cell, its match k(i) for A cell i. Sets a_rank to i
// for an A cell, -1 otherwise. index points at the batch's k [NA].
inline int64_t merge_target(const Checkerboard& grid, const int64_t* index, int64_t token, int64_t& a_rank) {
  const TokenSlot slot = token_slot(grid, token);
  a_rank = slot.is_a ? slot.rank : -1;
  if (slot.rank < 0) return token;                       // prefix token
  if (!slot.is_a) return grid.prefix + slot.rank;        // B cell
  const int64_t k = index[slot.rank];
  TORCH_CHECK(k >= 0 && k < grid.num_b(), "matching index ", k, " out of range [0, ", grid.num_b(), ")");
  return k;
}

// acc[j, :] = sum over the tokens t merged into B row j (itself and the A cells with k(i) = j), in token order, of
// s_t x[t, c0:c0+width]; z[j] = Z_j, the sum of their sizes (docs/design.md §2 step 6). One pass over x in memory
// order, for one batch: x, size and index point at that batch.
template <typename scalar_t>
void accumulate_merge(const scalar_t* x, const acc_type<scalar_t>* size, const int64_t* index,
                      const Checkerboard& grid, int64_t channels, int64_t c0, int64_t width,
                      acc_type<scalar_t>* acc, acc_type<scalar_t>* z, std::vector<bool>& touched) {
  touched.assign(grid.num_b(), false);
  for (int64_t token = 0; token < grid.num_tokens(); ++token) {
    int64_t a_rank;
    const int64_t j = merge_target(grid, index, token, a_rank);
    const scalar_t* src = x + token * channels + c0;
    if (touched[j]) {
      axpy(acc + j * width, size[token], src, width);
      z[j] += size[token];
    } else {  // the first token of row j initialises it: no zero-fill pass
      scale_into(acc + j * width, size[token], src, width);
      z[j] = size[token];
      touched[j] = true;
    }
  }
}

template <typename scalar_t>
void merge_forward_kernel(const scalar_t* x, const acc_type<scalar_t>* size, const int64_t* index,
                          const Checkerboard& grid, int64_t batch, int64_t channels, scalar_t* x_merged,
                          acc_type<scalar_t>* size_merged) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t slices = channel_slices(batch, channels);
  const int64_t slice_width = (channels + slices - 1) / slices;
  at::parallel_for(0, batch * slices, 1, [&](int64_t begin, int64_t end) {
    const auto acc = scratch<acc_t>(num_b * slice_width);
    const auto z = scratch<acc_t>(num_b);
    std::vector<bool> touched;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slices;
      const int64_t c0 = (task % slices) * slice_width;
      const int64_t width = std::min(slice_width, channels - c0);
      if (width <= 0) continue;
      accumulate_merge(x + b * tokens * channels, size + b * tokens, index + b * num_a, grid, channels, c0, width,
                       acc.get(), z.get(), touched);
      for (int64_t j = 0; j < num_b; ++j) {
        store_divided(x_merged + (b * num_b + j) * channels + c0, acc.get() + j * width, z[j], width);
      }
      if (c0 == 0) std::copy(z.get(), z.get() + num_b, size_merged + b * num_b);
    }
  });
}

// merge_tokens forward fused per batch (docs/design.md §2 steps 4-6): normalise, score (one GEMM), argmax and merge
// one batch at a time on one thread, so the metric's intermediates (normalised rows, scores, index) never leave the
// caches and no parallel region waits between phases. The same per-batch code as the phased path: the same k(i).
template <typename scalar_t>
void merge_tokens_fused_kernel(const scalar_t* x, const scalar_t* metric, const acc_type<scalar_t>* size,
                               const Checkerboard& grid, int64_t batch, int64_t channels, int64_t dim,
                               scalar_t* x_merged, acc_type<scalar_t>* size_merged) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t cells = num_b - grid.prefix;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const auto hat_a = scratch<acc_t>(num_a * dim);
    const auto hat_b = scratch<acc_t>(cells * dim);
    const auto scores = scratch<acc_t>(num_a * cells);
    const auto index = scratch<int64_t>(num_a);
    const auto acc = scratch<acc_t>(num_b * channels);
    const auto z = scratch<acc_t>(num_b);
    std::vector<bool> touched;
    for (int64_t b = begin; b < end; ++b) {
      normalize_batch(metric + b * tokens * dim, grid, dim, hat_a.get(), hat_b.get(), static_cast<acc_t*>(nullptr));
      batch_scores(hat_a.get(), hat_b.get(), grid, dim, scores.get());
      batch_argmax(scores.get(), grid, index.get());
      accumulate_merge(x + b * tokens * channels, size + b * tokens, index.get(), grid, channels, 0, channels,
                       acc.get(), z.get(), touched);
      for (int64_t j = 0; j < num_b; ++j) {
        store_divided(x_merged + (b * num_b + j) * channels, acc.get() + j * channels, z[j], channels);
      }
      std::copy(z.get(), z.get() + num_b, size_merged + b * num_b);
    }
  });
}

// Gradients of x and size for a one-hot matching (docs/design.md §3), plus what dL/dM needs: gz = g / Z [B, NB, C],
// q_j = h_j - <x'_j, gz_j> [B, NB], so that dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> + q_j); and, if x_a is given, x_A
// as a contiguous [B, NA, C] matrix in the accumulation dtype (the GEMM's left operand), copied on the way.
template <typename scalar_t>
void merge_backward_kernel(const scalar_t* grad_x_merged, const acc_type<scalar_t>* grad_size_merged,
                           const scalar_t* x, const acc_type<scalar_t>* size, const int64_t* index,
                           const Checkerboard& grid, int64_t batch, int64_t channels, acc_type<scalar_t>* gz,
                           acc_type<scalar_t>* q, scalar_t* grad_x, acc_type<scalar_t>* grad_size,
                           acc_type<scalar_t>* x_a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const auto merged = scratch<acc_t>(num_b * channels);
    const auto z = scratch<acc_t>(num_b);
    std::vector<bool> touched;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = x + b * tokens * channels;
      const acc_t* sb = size + b * tokens;
      const int64_t* kb = index + b * num_a;
      accumulate_merge(xb, sb, kb, grid, channels, 0, channels, merged.get(), z.get(), touched);
      for (int64_t j = 0; j < num_b; ++j) {
        const int64_t row = b * num_b + j;
        acc_t* merged_row = merged.get() + j * channels;
        acc_t* gz_row = gz + row * channels;
        const scalar_t* g_row = grad_x_merged + row * channels;
        for (int64_t c = 0; c < channels; ++c) {
          merged_row[c] /= z[j];  // x'_j
          gz_row[c] = static_cast<acc_t>(g_row[c]) / z[j];
        }
        q[row] = grad_size_merged[row] - dot<acc_t>(merged_row, gz_row, channels);
      }
      // Every token t merged into B row j (j itself, or A cell i with k(i) = j), in memory order:
      // dL/dx[t] = s_t gz_j, dL/ds[t] = <x[t], gz_j> + q_j.
      for (int64_t token = 0; token < tokens; ++token) {
        int64_t a_rank;
        const int64_t row = b * num_b + merge_target(grid, kb, token, a_rank);
        const acc_t* gz_row = gz + row * channels;
        const scalar_t* x_row = xb + token * channels;
        store_scaled(grad_x + (b * tokens + token) * channels, gz_row, sb[token], channels);
        grad_size[b * tokens + token] = dot<acc_t>(x_row, gz_row, channels) + q[row];
        if (x_a && a_rank >= 0) scale_into(x_a + (b * num_a + a_rank) * channels, acc_t(1), x_row, channels);
      }
    }
  });
}

// ---------------------------------------------------------------------------------- dense matching (float M)

// total = s_B[j] x_B[j] + sum_i M[i, j] s_A[i] x_A[i], returns Z_j = s_B[j] + sum_i M[i, j] s_A[i]
// (docs/design.md §2 step 6). x and size point at batch b; total has C entries.
template <typename scalar_t>
acc_type<scalar_t> merge_row(const scalar_t* x, const acc_type<scalar_t>* size,
                             const DenseMatching<acc_type<scalar_t>>& matching, const Checkerboard& grid, int64_t b,
                             int64_t j, int64_t channels, acc_type<scalar_t>* total) {
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

template <typename scalar_t>
void merge_forward_kernel(const scalar_t* x, const acc_type<scalar_t>* size,
                          const DenseMatching<acc_type<scalar_t>>& matching, const Checkerboard& grid, int64_t batch,
                          int64_t channels, scalar_t* x_merged, acc_type<scalar_t>* size_merged) {
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

// The dense counterpart of the index merge_backward_kernel (docs/design.md §3 with M summed over instead of
// gathered), x_a likewise.
template <typename scalar_t>
void merge_backward_kernel(const scalar_t* grad_x_merged, const acc_type<scalar_t>* grad_size_merged,
                           const scalar_t* x, const acc_type<scalar_t>* size,
                           const DenseMatching<acc_type<scalar_t>>& matching, const Checkerboard& grid, int64_t batch,
                           int64_t channels, acc_type<scalar_t>* gz, acc_type<scalar_t>* q, scalar_t* grad_x,
                           acc_type<scalar_t>* grad_size, acc_type<scalar_t>* x_a) {
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
      if (x_a) scale_into(x_a + row * channels, acc_t(1), xa, channels);
    }
  });
}

// ------------------------------------------------------------------------------------------------- STE rows

// In place over the B cells: grad[b, i, j'] = <x_A[i], gz_j> (from the GEMM) becomes dL/dS[b, i, j']
// (docs/design.md §3 "STE"), with dL/dM[i, j] = s_A[i] (grad + q_j) formed on the fly. grad and scores are
// [B, NA, NB - P].
template <typename acc_t>
void ste_rows_in_place(acc_t* grad, const acc_t* scores, const acc_t* size, const acc_t* q, const Checkerboard& grid,
                       int64_t batch) {
  const int64_t tokens = grid.num_tokens();
  const int64_t num_a = grid.num_a();
  const int64_t num_b = grid.num_b();
  const int64_t cells = num_b - grid.prefix;
  at::parallel_for(0, batch * num_a, grain_for(8 * cells), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_a;
      const acc_t size_a = size[b * tokens + grid.a_token(row % num_a)];
      const acc_t* s_row = scores + row * cells;
      const acc_t* q_row = q + b * num_b + grid.prefix;
      acc_t* g_row = grad + row * cells;
      Top2<acc_t> top;
      for (int64_t j = 0; j < cells; ++j) top.push(s_row[j], j);
      top.finish();
      const acc_t threshold = top.threshold();
      acc_t row_sum = 0;
      for (int64_t j = 0; j < cells; ++j) {
        g_row[j] = sigmoid_grad(s_row[j], threshold) * matching_grad(size_a, g_row[j], q_row[j]);
        row_sum += g_row[j];
      }
      for (int64_t j = 0; j < cells; ++j) g_row[j] = ste_score_grad(g_row[j], row_sum, j, top);
    }
  });
}

// ------------------------------------------------------------------------------------------------ host side

// The CPU merge, as ScatterMeanMergeOps (merge_host.h) and merge_tokens use it.
struct Merge {
  // scatter_mean_merge's index k [B, NA] as the CPU kernels take it: view<acc_t>(k, grid, run) calls run(pointer to k,
  // contiguous). The counterpart of DenseInput (merge_host.h).
  struct IndexInput {
    template <typename acc_t, typename Run>
    static void view(const Tensor& index, const Checkerboard&, Run run) {
      const Tensor k = index.contiguous();
      run(static_cast<const int64_t*>(k.data_ptr<int64_t>()));
    }
  };

  // The merge forward for a matching of kind Input (IndexInput or DenseInput).
  template <typename Input>
  static TensorPair forward(const Tensor& x_in, const c10::optional<Tensor>& size, const Tensor& matching,
                            const Checkerboard& grid) {
    const Tensor x = x_in.contiguous();
    const Tensor sizes = sizes_or_ones(size, x);
    Tensor x_merged = at::empty({x.size(0), grid.num_b(), x.size(2)}, x.options());
    Tensor size_merged = at::empty({x.size(0), grid.num_b()}, sizes.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_forward", [&] {
      using acc_t = acc_type<scalar_t>;
      Input::template view<acc_t>(matching, grid, [&](const auto& view) {
        merge_forward_kernel(x.data_ptr<scalar_t>(), sizes.data_ptr<acc_t>(), view, grid, x.size(0), x.size(2),
                             x_merged.data_ptr<scalar_t>(), size_merged.data_ptr<acc_t>());
      });
    });
    return {x_merged, size_merged};
  }

  // The merge backward for a matching of kind Input; with x_a defined ([B, NA, C], accumulation dtype) it also copies
  // x_A there.
  template <typename Input>
  static MergeGrads backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x_in,
                             const c10::optional<Tensor>& size, const Tensor& matching, const Checkerboard& grid,
                             const Tensor& x_a = Tensor()) {
    MergeGrads grads = allocate_merge_grads(grad_x_merged, grad_size_merged, x_in, size, grid);
    const Tensor& x = grads.x;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_backward", [&] {
      using acc_t = acc_type<scalar_t>;
      Input::template view<acc_t>(matching, grid, [&](const auto& view) {
        merge_backward_kernel(grads.g.data_ptr<scalar_t>(), grads.h.data_ptr<acc_t>(), x.data_ptr<scalar_t>(),
                              grads.sizes.data_ptr<acc_t>(), view, grid, x.size(0), x.size(2),
                              grads.gz.data_ptr<acc_t>(), grads.q.data_ptr<acc_t>(), grads.grad_x.data_ptr<scalar_t>(),
                              grads.grad_size.data_ptr<acc_t>(), x_a.defined() ? x_a.data_ptr<acc_t>() : nullptr);
      });
    });
    return grads;
  }
};

}  // namespace

FPET_DEFINE_SCATTER_MEAN_MERGE_OPS(Merge)

TensorPair merge_tokens(const Tensor& x, const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                        int64_t width, int64_t num_prefix_tokens) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const int64_t batch = x.size(0);
  if (batch < 2 * at::get_num_threads() || metric.scalar_type() != x.scalar_type()) {
    // Too few batches to keep every thread busy with whole batches: phase by phase, the merge sliced by channels.
    const Tensor index = at::empty({batch, grid.num_a()}, x.options().dtype(at::kLong));
    argmax_rows(cell_scores(normalize_metric(metric, grid), grid), grid, index);  // transient scores, nothing kept
    return Merge::forward<Merge::IndexInput>(x, size, index, grid);
  }
  const Tensor xc = x.contiguous();
  const Tensor mc = metric.contiguous();
  const Tensor sizes = sizes_or_ones(size, xc);
  Tensor x_merged = at::empty({batch, grid.num_b(), x.size(2)}, x.options());
  Tensor size_merged = at::empty({batch, grid.num_b()}, sizes.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "merge_tokens", [&] {
    using acc_t = acc_type<scalar_t>;
    merge_tokens_fused_kernel(xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(), sizes.data_ptr<acc_t>(), grid, batch,
                              x.size(2), metric.size(2), x_merged.data_ptr<scalar_t>(),
                              size_merged.data_ptr<acc_t>());
  });
  return {x_merged, size_merged};
}

TensorTriple merge_tokens_backward(const Tensor& grad_x_merged, const Tensor& grad_size_merged, const Tensor& x,
                                   const Tensor& metric, const c10::optional<Tensor>& size, int64_t height,
                                   int64_t width, int64_t num_prefix_tokens, bool metric_grad) {
  const Checkerboard grid = checked_merge_inputs(x, metric, size, height, width, num_prefix_tokens);
  const NormalizedMetric normalized = normalize_metric(metric, grid);
  const Tensor scores = cell_scores(normalized, grid);  // the same scores and k(i) as the forward
  const Tensor index = at::empty({x.size(0), grid.num_a()}, x.options().dtype(at::kLong));
  argmax_rows(scores, grid, index);
  const auto x_acc = accumulation_dtype(x.scalar_type());
  const Tensor x_a = metric_grad ? at::empty({x.size(0), grid.num_a(), x.size(2)}, x.options().dtype(x_acc))
                                 : Tensor();
  const MergeGrads grads =
      Merge::backward<Merge::IndexInput>(grad_x_merged, grad_size_merged, x, size, index, grid, x_a);
  if (!metric_grad) return {grads.grad_x, at::empty({0}, metric.options()), grads.grad_size};

  // dL/dS over the B cells, [B, NA, NB - P], in the metric's accumulation dtype (x's may differ).
  const auto acc = normalized.norm.scalar_type();
  const int64_t cells = grid.num_b() - grid.prefix;
  const NoAutocast no_autocast;
  Tensor grad_scores = at::bmm(x_a, grads.gz.narrow(1, grid.prefix, cells).transpose(1, 2)).to(acc);
  const Tensor sizes = grads.sizes.to(acc);
  const Tensor q = grads.q.to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "ste_rows_in_place", [&] {
    ste_rows_in_place(grad_scores.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), sizes.data_ptr<scalar_t>(),
                      q.data_ptr<scalar_t>(), grid, x.size(0));
  });
  const Tensor grad_metric = similarity_backward(grad_scores, normalized, grid, metric.scalar_type());
  return {grads.grad_x, grad_metric, grads.grad_size};
}

}  // namespace cpu
}  // namespace fpet
