// C++ test of the CMake build: the fpet ops called through the PyTorch dispatcher on CPU. merge_tokens,
// checkerboard_similarity, scatter_mean_merge and scatter_mean_merge_dense against values this test computes itself
// with plain loops (docs/design.md §2 steps 3-6); refine_keys against the reference's ATen op sequence (bitwise) and
// its backward against autograd of that sequence (docs/design.md §2 step 2).
#include <cmath>
#include <cstdio>
#include <string>
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
  std::vector<int64_t> index;               // [NA]: k(i), the B row A token i is merged into
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
    e.index.push_back(static_cast<int64_t>(best));
    e.size[best] += s[0][i];
    for (int64_t c = 0; c < channels; ++c) e.x[best][c] += s[0][i] * xs[0][i][c];
  }
  for (size_t j = 0; j < b_tokens.size(); ++j)
    for (int64_t c = 0; c < channels; ++c) e.x[j][c] /= e.size[j];
  return e;
}

template <typename Signature>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using MergeSignature = TensorPair(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                  int64_t, int64_t);

void expect_merged(const TensorPair& merged, const Expected& expected, const char* what) {
  const auto& [x_merged, size_merged] = merged;
  auto xm = x_merged.accessor<double, 3>();
  auto sm = size_merged.accessor<double, 2>();
  for (size_t j = 0; j < expected.size.size(); ++j) {
    expect_close(sm[0][j], expected.size[j], what);
    for (size_t c = 0; c < expected.x[j].size(); ++c) expect_close(xm[0][j][c], expected.x[j][c], what);
  }
}

void expect_equal(const at::Tensor& actual, const at::Tensor& expected, const char* what) {
  if (!actual.equal(expected)) {
    std::printf("FAIL %s: not bitwise equal (max diff %g)\n", what, (actual - expected).abs().max().item<double>());
    ++failures;
  }
}

void expect_allclose(const at::Tensor& actual, const at::Tensor& expected, const char* what) {
  if (!actual.allclose(expected, 1e-10, 1e-12)) {
    std::printf("FAIL %s: max diff %g\n", what, (actual - expected).abs().max().item<double>());
    ++failures;
  }
}

// scatter_mean_merge with the loops' index k, and scatter_mean_merge_dense with the one-hot M of k: both give the
// loops' merge. scatter_mean_merge refuses a float matching, naming its index argument.
void test_scatter_mean_merge(const at::Tensor& x, const at::Tensor& size, const Expected& expected, int64_t height,
                             int64_t width, int64_t prefix) {
  const int64_t num_a = static_cast<int64_t>(expected.index.size());
  const int64_t num_b = static_cast<int64_t>(expected.size.size());
  const at::Tensor index = torch::tensor(expected.index, torch::kLong).reshape({1, num_a});
  const at::Tensor one_hot = torch::one_hot(index, num_b).to(torch::kFloat64);
  expect_merged(op<MergeSignature>("fpet::scatter_mean_merge").call(x, size, index, height, width, prefix), expected,
                "scatter_mean_merge");
  expect_merged(op<MergeSignature>("fpet::scatter_mean_merge_dense").call(x, size, one_hot, height, width, prefix),
                expected, "scatter_mean_merge_dense");
  try {
    op<MergeSignature>("fpet::scatter_mean_merge").call(x, size, one_hot, height, width, prefix);
    std::printf("FAIL: scatter_mean_merge accepted a float matching\n");
    ++failures;
  } catch (const c10::Error& error) {
    if (std::string(error.what_without_backtrace()).find("index") == std::string::npos) {
      std::printf("FAIL: scatter_mean_merge's error does not name index: %s\n", error.what_without_backtrace());
      ++failures;
    }
  }
}

// refine_keys with and without a dropout keep mask: the forward equals the reference's op sequence bitwise, the
// backward matches autograd of that sequence.
void test_refine_keys(const at::Tensor& metric_in) {
  using RefineSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, double, double);
  using RefineBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      double, double);
  const int64_t hidden_dim = 3;
  const double scale = 0.7, dropout_p = 0.25;
  const auto options = metric_in.options();
  const at::Tensor w_down = torch::randn({hidden_dim, metric_in.size(2)}, options);
  const at::Tensor w_up = torch::randn({metric_in.size(2), hidden_dim}, options);
  const at::Tensor grad = torch::randn(metric_in.sizes(), options);
  const at::Tensor keep_mask = torch::rand({metric_in.size(0), metric_in.size(1), hidden_dim}, options) >= dropout_p;
  for (const std::optional<at::Tensor>& keep : {std::optional<at::Tensor>(), std::optional<at::Tensor>(keep_mask)}) {
    const at::Tensor metric = metric_in.detach().requires_grad_(true);
    const at::Tensor down = w_down.detach().requires_grad_(true);
    const at::Tensor up = w_up.detach().requires_grad_(true);
    at::Tensor hidden = torch::relu(torch::linear(metric, down));
    if (keep) hidden = hidden * *keep * (1.0 / (1.0 - dropout_p));
    const at::Tensor expected = metric + torch::linear(hidden, up) * scale;
    expected.backward(grad);
    const at::Tensor out = op<RefineSignature>("fpet::refine_keys").call(metric_in, w_down, w_up, keep, scale,
                                                                         dropout_p);
    expect_equal(out, expected.detach(), keep ? "refine_keys (dropout)" : "refine_keys");
    const auto [grad_metric, grad_down, grad_up] = op<RefineBackwardSignature>("fpet::refine_keys_backward")
                                                       .call(grad, metric_in, w_down, w_up, keep, scale, dropout_p);
    expect_allclose(grad_metric, metric.grad(), "refine_keys_backward: metric");
    expect_allclose(grad_down, down.grad(), "refine_keys_backward: w_down");
    expect_allclose(grad_up, up.grad(), "refine_keys_backward: w_up");
  }
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

  const Expected expected = expected_merge(x, metric, size, height, width, prefix);
  using MergeTokensSignature = TensorPair(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          int64_t, int64_t, int64_t);
  using SimilaritySignature = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t);
  const auto merged = op<MergeTokensSignature>("fpet::merge_tokens").call(x, metric, size, height, width, prefix);
  const at::Tensor scores =
      op<SimilaritySignature>("fpet::checkerboard_similarity").call(metric, height, width, prefix);

  const int64_t num_b = static_cast<int64_t>(expected.size.size());
  if (std::get<0>(merged).size(1) != num_b || scores.size(1) != static_cast<int64_t>(expected.scores.size())) {
    std::printf("FAIL: wrong output shapes\n");
    return 1;
  }
  expect_merged(merged, expected, "merge_tokens");
  auto sc = scores.accessor<double, 3>();
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
  test_scatter_mean_merge(x, size, expected, height, width, prefix);
  test_refine_keys(metric);
  std::printf(failures ? "test_fpet_ops: %d failures\n" : "test_fpet_ops: ok\n", failures);
  return failures ? 1 : 0;
}
