// ste_match on the CPU (docs/design.md §2 step 5, §3 "STE"): one-hot argmax forward, sigmoid STE backward.
// Prefix columns need no special case here: they hold -inf, so sigma' is 0 there and they never win the top-2.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../fpet_math.h"
#include "../ops.h"
#include "cpu_common.h"

namespace fpet {
namespace cpu {

namespace {

template <typename scalar_t>
Top2<acc_type<scalar_t>> row_top2(const scalar_t* row, int64_t columns) {
  Top2<acc_type<scalar_t>> top;
  for (int64_t j = 0; j < columns; ++j) top.push(static_cast<acc_type<scalar_t>>(row[j]), j);
  top.finish();
  return top;
}

}  // namespace

TensorPair ste_match(const Tensor& scores_in) {
  TORCH_CHECK(scores_in.dim() == 3 && scores_in.size(2) >= 1, "scores must have shape [B, NA, NB], NB >= 1");
  const Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1);
  const int64_t columns = scores.size(2);
  Tensor matching = at::zeros_like(scores);
  Tensor index = at::empty({scores.size(0), scores.size(1)}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "ste_match", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* m = matching.data_ptr<scalar_t>();
    int64_t* k = index.data_ptr<int64_t>();
    at::parallel_for(0, rows, grain_for(columns), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t best = row_top2(s + row * columns, columns).index1;
        k[row] = best;
        m[row * columns + best] = scalar_t(1);  // forward value of M is exactly one-hot
      }
    });
  });
  return {matching, index};
}

Tensor ste_match_backward(const Tensor& grad_matching_in, const Tensor& scores_in) {
  const Tensor scores = scores_in.contiguous();
  const Tensor grad_matching = grad_matching_in.to(scores.scalar_type()).contiguous();
  const int64_t rows = scores.size(0) * scores.size(1);
  const int64_t columns = scores.size(2);
  Tensor grad_scores = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "ste_match_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const scalar_t* gm = grad_matching.data_ptr<scalar_t>();
    scalar_t* gs = grad_scores.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(4 * columns), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> weighted(columns);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* s_row = s + row * columns;
        const scalar_t* gm_row = gm + row * columns;
        const Top2<acc_t> top = row_top2(s_row, columns);
        const acc_t threshold = top.threshold();
        acc_t row_sum = 0;
        for (int64_t j = 0; j < columns; ++j) {
          weighted[j] = sigmoid_grad(static_cast<acc_t>(s_row[j]), threshold) * static_cast<acc_t>(gm_row[j]);
          row_sum += weighted[j];
        }
        for (int64_t j = 0; j < columns; ++j) {
          gs[row * columns + j] = static_cast<scalar_t>(ste_score_grad(weighted[j], row_sum, j, top));
        }
      }
    });
  });
  return grad_scores;
}

}  // namespace cpu
}  // namespace fpet
