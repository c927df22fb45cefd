// CPU building blocks shared by checkerboard_similarity (similarity.cpp) and the fused merge_tokens (merge.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../fpet_math.h"

namespace fpet {
namespace cpu {

using at::Tensor;

// The cosine-normalised metric of SPEC section 2, step 4, in the accumulation dtype (float32; float64 for float64).
struct NormalizedMetric {
  Tensor hat;           // [B, N, Dh]: m / max(||m||, eps)
  Tensor norm;          // [B, N]: ||m||
  Tensor b_transposed;  // [B, Dh, NB - P]: hat of the B cells, transposed so that a score row vectorises over columns
};

NormalizedMetric normalize_metric(const Tensor& metric, const Checkerboard& grid);

// Scores of every A row against the B cells, their top-2 and argmax (SPEC section 2, steps 4-5). Writes the
// matched column k(i) into index [B, NA] (int64) and, if scores is defined, the full score matrix [B, NA, NB]
// (prefix columns -inf). Without scores no score matrix is kept: each row lives in a per-thread buffer.
void score_rows(const NormalizedMetric& metric, const Checkerboard& grid, const Tensor& scores, const Tensor& index);

// dL/dm from dL/dS (SPEC section 3, "Cosine"). grad_scores: [B, NA, NB] contiguous in the accumulation dtype
// (prefix columns are ignored). Returns [B, N, Dh] in out_dtype; prefix tokens get zero.
Tensor similarity_backward(const Tensor& grad_scores, const NormalizedMetric& metric, const Checkerboard& grid,
                           at::ScalarType out_dtype);

}  // namespace cpu
}  // namespace fpet
