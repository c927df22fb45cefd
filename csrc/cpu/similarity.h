// CPU building blocks shared by checkerboard_similarity (similarity.cpp) and the fused merge_tokens (merge.cpp).
//
// The O(NA * NB * Dh) products (the scores and their backward) are GEMMs through ATen's BLAS (MKL or OpenBLAS,
// whichever torch links); everything else (normalisation, top-2/argmax, the cosine backward) is a row
// kernel here. Scores are kept in a compact [B, NA, NB - P] layout, the B cells only: prefix columns are -inf by
// definition (docs/design.md §2 step 4) and are only materialised for the checkerboard_similarity op's output.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>

#include "../checks.h"
#include "../fpet_math.h"
#include "cpu_common.h"

namespace fpet {
namespace cpu {

using at::Tensor;

// ----------------------------------------------------------------------------- one batch, on the calling thread
// The building blocks of one batch; the whole-batch functions below run them in parallel over batches, and the
// fused merge_tokens forward (merge.cpp) runs all of them per batch. Both use the same code, hence the same k(i).

// Token row -> (set, rank): A cells go to hat_a[rank], B cells to hat_b[rank], prefix tokens to neither.
// The rank of a cell among its own set is floor(cell / 2) (see Checkerboard).
struct TokenSlot {
  bool is_a;
  int64_t rank;  // -1 for a prefix token
};

inline TokenSlot token_slot(const Checkerboard& grid, int64_t token) {
  const int64_t cell = token - grid.prefix;
  if (cell < 0) return {false, -1};
  return {(cell / grid.width + cell % grid.width) % 2 == 0, cell / 2};
}

// m^ = m / max(||m||, eps) of one batch's tokens (metric [N, Dh]) into hat_a [NA, Dh] and hat_b [NB - P, Dh];
// ||m|| into norm [N] unless it is null.
template <typename scalar_t>
void normalize_batch(const scalar_t* metric, const Checkerboard& grid, int64_t dim, acc_type<scalar_t>* hat_a,
                     acc_type<scalar_t>* hat_b, acc_type<scalar_t>* norm) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t token = 0; token < grid.num_tokens(); ++token) {
    const TokenSlot slot = token_slot(grid, token);
    if (slot.rank < 0 && !norm) continue;
    const scalar_t* src = metric + token * dim;
    const acc_t row_norm = std::sqrt(dot<acc_t>(src, src, dim));
    if (norm) norm[token] = row_norm;
    if (slot.rank < 0) continue;
    acc_t* dst = (slot.is_a ? hat_a : hat_b) + slot.rank * dim;
    const acc_t denom = clamped_norm(row_norm);
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<acc_t>(src[d]) / denom;
  }
}

// scores [NA, NB - P] = hat_a [NA, Dh] hat_b [NB - P, Dh]^T for one batch: one GEMM through ATen's BLAS.
template <typename acc_t>
void batch_scores(const acc_t* hat_a, const acc_t* hat_b, const Checkerboard& grid, int64_t dim, acc_t* scores) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t num_a = grid.num_a();
  const int64_t cells = grid.num_b() - grid.prefix;
  const NoAutocast no_autocast;
  Tensor out = at::from_blob(scores, {num_a, cells}, options);
  at::mm_out(out, at::from_blob(const_cast<acc_t*>(hat_a), {num_a, dim}, options),
             at::from_blob(const_cast<acc_t*>(hat_b), {cells, dim}, options).t());
}

// k(i) = P + argmax over the B cells of score row i, lowest column on ties (docs/design.md §2 step 5), for one batch:
// scores [NA, NB - P] -> index [NA] in B numbering.
template <typename acc_t>
void batch_argmax(const acc_t* scores, const Checkerboard& grid, int64_t* index) {
  const int64_t cells = grid.num_b() - grid.prefix;
  for (int64_t i = 0; i < grid.num_a(); ++i) index[i] = grid.prefix + argmax(scores + i * cells, cells);
}

// ------------------------------------------------------------------------------------------------- whole batch

// The cosine-normalised metric of docs/design.md §2 step 4, in the accumulation dtype (float32; float64 for float64).
struct NormalizedMetric {
  Tensor hat_a;  // [B, NA, Dh]: m / max(||m||, eps) of the A tokens, in A order
  Tensor hat_b;  // [B, NB - P, Dh]: the same for the B cells, in B order
  Tensor norm;   // [B, N]: ||m|| of every token
};

NormalizedMetric normalize_metric(const Tensor& metric, const Checkerboard& grid);

// S[b, i, j'] = <m^_A[i], m^_B[P + j']> for the B cells j' (a GEMM per batch): [B, NA, NB - P], contiguous.
Tensor cell_scores(const NormalizedMetric& metric, const Checkerboard& grid);

// k(i) = argmax_j S[i, j] over the B cells, lowest column on ties (docs/design.md §2 step 5), written into index
// [B, NA] (int64) in B numbering (prefix included, so k(i) >= P).
void argmax_rows(const Tensor& cell_scores, const Checkerboard& grid, const Tensor& index);

// dL/dm from dL/dS over the B cells (docs/design.md §3 "Cosine"): grad_cell_scores [B, NA, NB - P] in the
// accumulation dtype, any strides. Returns [B, N, Dh] in out_dtype; prefix tokens get zero.
Tensor similarity_backward(const Tensor& grad_cell_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype);

}  // namespace cpu
}  // namespace fpet
