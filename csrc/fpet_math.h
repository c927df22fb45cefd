// Host/device math shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Section numbers (§N) refer to docs/design.md. Everything here is header-only, has no ATen dependency and compiles
// with both the host compiler and nvcc (FPET_HOST_DEVICE is empty on the host compiler).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPET_HOST_DEVICE inline
#endif

namespace fpet {

#if !defined(__CUDA_ARCH__)
using std::exp;
using std::isinf;
using std::sqrt;
#endif

// Lower clamp of the L2 norm in the cosine normalisation (docs/design.md §2 step 4).
constexpr double kNormEps = 1e-12;

// Checkerboard partition of an H x W grid behind P prefix tokens (docs/design.md §2 step 3).
// Cell q = r * W + c is an A cell when r + c is even. In both parities of W, the rank of a cell among the cells of
// its own set, in row-major order, is floor(q / 2); the maps below invert that rank.
struct Checkerboard {
  int64_t height;
  int64_t width;
  int64_t prefix;

  FPET_HOST_DEVICE int64_t cells() const { return height * width; }
  FPET_HOST_DEVICE int64_t num_a() const { return (cells() + 1) / 2; }
  FPET_HOST_DEVICE int64_t num_b() const { return prefix + cells() / 2; }
  FPET_HOST_DEVICE int64_t num_tokens() const { return prefix + cells(); }

  // Token index (axis 1 of x) of A token i, 0 <= i < num_a().
  FPET_HOST_DEVICE int64_t a_token(int64_t i) const {
    int64_t q = 2 * i;
    if (width % 2 == 0) q += (q / width) & 1;  // odd rows start their A cells at column 1
    return prefix + q;
  }
  // Token index of B token j, 0 <= j < num_b(): the prefix tokens first, then the B cells.
  FPET_HOST_DEVICE int64_t b_token(int64_t j) const {
    if (j < prefix) return j;
    int64_t q = 2 * (j - prefix);
    q += (width % 2 == 0) ? 1 - ((q / width) & 1) : 1;  // odd rows (even W) start their B cells at column 0
    return prefix + q;
  }
};

// max(||m||, eps): tokens are divided by it, as in the reference.
template <typename acc_t>
FPET_HOST_DEVICE acc_t clamped_norm(acc_t norm) {
  return norm > acc_t(kNormEps) ? norm : acc_t(kNormEps);
}

// Backward of m^ = m / max(||m||, eps) for one token (docs/design.md §3 "Cosine"): given <m^, dm^> and ||m||,
// dm = (dm^ - m^ <m^, dm^>) / ||m|| while the clamp is inactive, dm = dm^ / eps when it is.
template <typename acc_t>
FPET_HOST_DEVICE acc_t normalize_backward(acc_t grad_hat, acc_t m_hat, acc_t hat_dot_grad, acc_t norm) {
  return norm >= acc_t(kNormEps) ? (grad_hat - m_hat * hat_dot_grad) / norm : grad_hat / acc_t(kNormEps);
}

// The ranking key of a score (docs/design.md §2 step 5, "NaN"): NaN counts as +inf, so a row with NaN merges into
// its first NaN (or +inf) column, the same column in every backend, and always a B cell.
template <typename acc_t>
FPET_HOST_DEVICE acc_t match_key(acc_t v) {
  return v != v ? acc_t(INFINITY) : v;
}

// Running top-2 of a score row with the tie rule of docs/design.md §2 step 5: among equal values the lowest column
// wins. index1 is the argmax k(i); index2 the runner-up. Pushes may come in any order (so that partial results of
// different threads can be merged), which is why ties compare the column index explicitly.
template <typename acc_t>
struct Top2 {
  acc_t value1, value2;
  int64_t index1, index2;  // -1: empty slot

  FPET_HOST_DEVICE Top2() : value1(-INFINITY), value2(-INFINITY), index1(-1), index2(-1) {}

  FPET_HOST_DEVICE static bool beats(acc_t v, int64_t i, acc_t w, int64_t k) {
    return k < 0 || v > w || (v == w && i < k);
  }
  FPET_HOST_DEVICE void push(acc_t v, int64_t i) {
    if (i < 0) return;  // empty slot
    v = match_key(v);
    if (beats(v, i, value1, index1)) {
      value2 = value1;
      index2 = index1;
      value1 = v;
      index1 = i;
    } else if (beats(v, i, value2, index2)) {
      value2 = v;
      index2 = i;
    }
  }
  FPET_HOST_DEVICE void merge(const Top2& other) {
    push(other.value1, other.index1);
    push(other.value2, other.index2);
  }
  // A row with a single finite column (one B patch, the rest -inf prefix columns): top2 = top1 (docs/design.md §2
  // step 5), so that column receives both halves of the threshold gradient (docs/design.md §3).
  FPET_HOST_DEVICE void finish() {
    if (index2 < 0 || isinf(value2)) {
      value2 = value1;
      index2 = index1;
    }
  }
  // t = (top1 + top2) / 2
  FPET_HOST_DEVICE acc_t threshold() const { return (value1 + value2) / acc_t(2); }
};

template <typename acc_t>
FPET_HOST_DEVICE acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp(-z));
}

// sigma'(z) = Soft (1 - Soft), with Soft = sigmoid(S - t) (docs/design.md §3 "STE").
template <typename acc_t>
FPET_HOST_DEVICE acc_t sigmoid_grad(acc_t score, acc_t threshold) {
  const acc_t z = score - threshold;
  if (z != z) return acc_t(0);  // a NaN score or threshold carries no STE gradient (docs/design.md §3)
  const acc_t soft = sigmoid(z);
  return soft * (acc_t(1) - soft);
}

// dL/dS[i, j] = sigma'(z_ij) dL/dM[i, j] - [j in top2(i)] * 1/2 * sum_l sigma'(z_il) dL/dM[i, l] (docs/design.md §3).
// weighted = sigma'(z_ij) dL/dM[i, j], row_sum = sum_l sigma'(z_il) dL/dM[i, l].
template <typename acc_t>
FPET_HOST_DEVICE acc_t ste_score_grad(acc_t weighted, acc_t row_sum, int64_t j, const Top2<acc_t>& top) {
  acc_t g = weighted;
  if (j == top.index1) g -= row_sum / acc_t(2);
  if (j == top.index2) g -= row_sum / acc_t(2);
  return g;
}

// dL/dM[i, j] = s_A[i] * ( <x_A[i], g_j / Z_j> + q_j ) with q_j = h_j - <x'_j, g_j / Z_j> (docs/design.md §3).
template <typename acc_t>
FPET_HOST_DEVICE acc_t matching_grad(acc_t size_a, acc_t xa_dot_gz, acc_t q) {
  return size_a * (xa_dot_gz + q);
}

// The two kinds of matching, scatter_mean_merge's index and scatter_mean_merge_dense's M (docs/design.md §4), seen
// per batch b as lists of (row, weight):
// for_each_a_of_b(b, j, f) calls f(i, M[i, j]) for the A rows merged into B row j, in ascending i;
// for_each_b_of_a(b, i, f) calls f(j, M[i, j]) for the B rows A row i is merged into.
//
// One-hot matching given as the index k [B, NA], with its inverse index: A rows order[offsets[j] .. offsets[j+1])
// are the ones matched to B row j (a stable counting sort of k per batch; offsets [B, NB + 1], order [B, NA]).
template <typename acc_t>
struct IndexMatching {
  const int64_t* index;
  const int64_t* offsets;
  const int64_t* order;
  int64_t num_a, num_b;

  template <typename F>
  FPET_HOST_DEVICE void for_each_a_of_b(int64_t b, int64_t j, F f) const {
    const int64_t* off = offsets + b * (num_b + 1);
    for (int64_t p = off[j]; p < off[j + 1]; ++p) f(order[b * num_a + p], acc_t(1));
  }
  template <typename F>
  FPET_HOST_DEVICE void for_each_b_of_a(int64_t b, int64_t i, F f) const {
    f(index[b * num_a + i], acc_t(1));
  }
};

// Float matching [B, NA, NB] (contiguous, accumulation dtype): the non-zero entries of a column / row (a
// zero entry contributes nothing, so skipping it changes no value).
template <typename acc_t>
struct DenseMatching {
  const acc_t* weights;
  int64_t num_a, num_b;

  template <typename F>
  FPET_HOST_DEVICE void for_each_a_of_b(int64_t b, int64_t j, F f) const {
    const acc_t* column = weights + b * num_a * num_b + j;
    for (int64_t i = 0; i < num_a; ++i) {
      if (column[i * num_b] != acc_t(0)) f(i, column[i * num_b]);
    }
  }
  template <typename F>
  FPET_HOST_DEVICE void for_each_b_of_a(int64_t b, int64_t i, F f) const {
    const acc_t* row = weights + (b * num_a + i) * num_b;
    for (int64_t j = 0; j < num_b; ++j) {
      if (row[j] != acc_t(0)) f(j, row[j]);
    }
  }
};

}  // namespace fpet
