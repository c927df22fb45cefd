// C++ test of the CMake build: fpet::merge_tokens and fpet::checkerboard_similarity, called through the PyTorch
// dispatcher on CPU, against values this test computes itself with plain loops (SPEC section 2, steps 3-6).
#include <cmath>
#include <cstdio>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

namespace {

int failures = 0;

void expect_close(double actual, double expected, const char* what, double tol = 1e-12) {
  if (!(std::abs(actual - expected) <= tol * (1 + std::abs(expected)))) {
    std::printf("FAIL %s: got %.17g, expected %.17g\n", what, actual, expected);
    ++failures;
  }
}

struct Expected {
  std::vector<std::vector<double>> scores;  // [NA][NB]
  std::vector<std::vector<double>> x;       // [NB][C]
  std::vector<double> size;                 // [NB]
};

// Straightforward loops over one batch element: A = cells (r + c) even, B = prefix tokens then the other cells.
Expected expected_merge(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size, int64_t height,
                        int64_t width, int64_t prefix) {
  std::vector<int64_t> a_tokens, b_tokens;
  for (int64_t p = 0; p < prefix; ++p) b_tokens.push_back(p);
  for (int64_t r = 0; r < height; ++r)
    for (int64_t c = 0; c < width; ++c) ((r + c) % 2 == 0 ? a_tokens : b_tokens).push_back(prefix + r * width + c);
  const int64_t dim = metric.size(2), channels = x.size(2);
  auto m = metric.accessor<double, 3>();
  auto xs = x.accessor<double, 3>();
  auto s = size.accessor<double, 2>();
  auto normalized = [&](int64_t t) {
    double norm = 0;
    for (int64_t d = 0; d < dim; ++d) norm += m[0][t][d] * m[0][t][d];
    norm = std::max(std::sqrt(norm), 1e-12);
    std::vector<double> v(dim);
    for (int64_t d = 0; d < dim; ++d) v[d] = m[0][t][d] / norm;
    return v;
  };
  Expected e;
  e.x.assign(b_tokens.size(), std::vector<double>(channels, 0.0));
  e.size.assign(b_tokens.size(), 0.0);
  for (size_t j = 0; j < b_tokens.size(); ++j) {
    e.size[j] = s[0][b_tokens[j]];
    for (int64_t c = 0; c < channels; ++c) e.x[j][c] = s[0][b_tokens[j]] * xs[0][b_tokens[j]][c];
  }
  for (int64_t i : a_tokens) {
    const auto a = normalized(i);
    std::vector<double> row(b_tokens.size(), -INFINITY);
    size_t best = prefix;
    for (size_t j = prefix; j < b_tokens.size(); ++j) {
      const auto b = normalized(b_tokens[j]);
      row[j] = 0;
      for (int64_t d = 0; d < dim; ++d) row[j] += a[d] * b[d];
      if (row[j] > row[best]) best = j;
    }
    e.scores.push_back(row);
    e.size[best] += s[0][i];
    for (int64_t c = 0; c < channels; ++c) e.x[best][c] += s[0][i] * xs[0][i][c];
  }
  for (size_t j = 0; j < b_tokens.size(); ++j)
    for (int64_t c = 0; c < channels; ++c) e.x[j][c] /= e.size[j];
  return e;
}

}  // namespace

int main() {
  const int64_t height = 3, width = 5, prefix = 2, channels = 7, dim = 5;
  const int64_t tokens = prefix + height * width;
  torch::manual_seed(0);
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  const at::Tensor x = torch::randn({1, tokens, channels}, options);
  const at::Tensor metric = torch::randn({1, tokens, dim}, options);
  const at::Tensor size = torch::rand({1, tokens}, options) + 0.5;

  auto merge_tokens = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fpet::merge_tokens", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const std::optional<at::Tensor>&, int64_t,
                                                                    int64_t, int64_t)>();
  auto similarity = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fpet::checkerboard_similarity", "")
                        .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)>();

  const Expected expected = expected_merge(x, metric, size, height, width, prefix);
  const auto [x_merged, size_merged] = merge_tokens.call(x, metric, size, height, width, prefix);
  const at::Tensor scores = similarity.call(metric, height, width, prefix);

  const int64_t num_b = static_cast<int64_t>(expected.size.size());
  if (x_merged.size(1) != num_b || scores.size(1) != static_cast<int64_t>(expected.scores.size())) {
    std::printf("FAIL: wrong output shapes\n");
    return 1;
  }
  auto xm = x_merged.accessor<double, 3>();
  auto sm = size_merged.accessor<double, 2>();
  auto sc = scores.accessor<double, 3>();
  for (int64_t j = 0; j < num_b; ++j) {
    expect_close(sm[0][j], expected.size[j], "merged size");
    for (int64_t c = 0; c < channels; ++c) expect_close(xm[0][j][c], expected.x[j][c], "merged token");
  }
  for (size_t i = 0; i < expected.scores.size(); ++i) {
    for (int64_t j = 0; j < num_b; ++j) {
      const double want = expected.scores[i][j];
      if (std::isinf(want)) {
        if (!std::isinf(sc[0][i][j])) {
          std::printf("FAIL: prefix score not -inf\n");
          ++failures;
        }
      } else {
        expect_close(sc[0][i][j], want, "score");
      }
    }
  }
  std::printf(failures ? "test_fpet_ops: %d failures\n" : "test_fpet_ops: ok\n", failures);
  return failures ? 1 : 0;
}
