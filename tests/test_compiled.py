"""The compiled backends (``cpp`` on CPU, ``cuda`` on CUDA) against the pure-PyTorch reference (SPEC sections 2-4).

Every op and ``merge_tokens``: forward and backward over many shapes (grids 1x2, odd, non-square; P = 0..4; B = 1;
non-contiguous inputs; C and Dh not multiples of 8) and dtypes, gradcheck in float64, ``torch.library.opcheck``,
the tie rule, and bitwise determinism (run to run, and 1 vs 2 CPU threads). CUDA cases skip without a GPU or
without CUDA kernels in the build; everything skips when the extension is not built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from fpet_kernels import compiled, ops
from fpet_kernels import reference as ref

pytestmark = pytest.mark.skipif(not compiled.is_loaded(), reason=f"fpet_kernels._C not built: {compiled.LOAD_ERROR}")

CUDA_OK = compiled.is_loaded() and compiled.cuda_kernels_built() and torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and CUDA kernels"))]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# (atol, rtol) per dtype: forward values, gradients. bfloat16 outputs are rounded to 8 bits of mantissa.
FORWARD_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-2, 2e-2)}
GRAD_TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (2e-5, 1e-4), torch.bfloat16: (5e-2, 5e-2)}


@dataclass(frozen=True)
class Shape:
    batch: int
    height: int
    width: int
    prefix: int
    channels: int
    dim: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width

    @property
    def grid(self):
        return (self.height, self.width)

    def __str__(self) -> str:
        return f"B{self.batch}_{self.height}x{self.width}_P{self.prefix}_C{self.channels}_D{self.dim}"


SHAPES = [
    Shape(2, 1, 2, 0, 8, 4),  # smallest grid: one A, one B patch
    Shape(1, 2, 1, 3, 5, 3),  # column grid, B = 1, prefix tokens only B besides one patch
    Shape(3, 3, 3, 1, 13, 7),  # odd square
    Shape(2, 3, 5, 2, 24, 16),  # odd, non-square
    Shape(2, 4, 6, 4, 17, 9),  # even, non-square, P = 4
    Shape(1, 5, 4, 0, 33, 12),
    Shape(2, 7, 7, 1, 40, 20),
    Shape(2, 14, 14, 1, 32, 64),  # ViT-B/16 grid
]
SHAPE_IDS = [str(s) for s in SHAPES]


def tolerance(table, dtype):
    atol, rtol = table[dtype]
    return {"atol": atol, "rtol": rtol}


def make(shape, *trailing, dtype, device, noncontiguous=False, positive=False, seed=0):
    """A random tensor [*shape, *trailing]; noncontiguous makes it a transposed view of the same values."""
    g = torch.Generator().manual_seed(seed)
    full = tuple(shape) + tuple(trailing)
    t = torch.rand(full, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(full, generator=g, dtype=torch.float64)
    t = t.to(device=device, dtype=dtype)
    if noncontiguous:
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
        assert not t.is_contiguous() or t.dim() < 2 or 1 in t.shape
    return t


def inputs(shape: Shape, dtype, device, noncontiguous=False, seed=0):
    x = make((shape.batch, shape.tokens), shape.channels, dtype=dtype, device=device, noncontiguous=noncontiguous, seed=seed)
    metric = make((shape.batch, shape.tokens), shape.dim, dtype=dtype, device=device, noncontiguous=noncontiguous, seed=seed + 1)
    size = make((shape.batch, shape.tokens), dtype=dtype, device=device, positive=True, seed=seed + 2)
    return x, metric, size


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def weighted_loss(outputs, seed=7):
    """sum_k <out_k, w_k> with fixed random weights w_k (finite entries only), so that every output gets a gradient."""
    total = 0
    for k, out in enumerate(outputs):
        if not out.is_floating_point():
            continue
        g = torch.Generator().manual_seed(seed + k)
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
        total = total + (out.masked_fill(torch.isinf(out), 0) * w).sum()
    return total


def grads_of(fn, tensors):
    out = fn(*tensors)
    out = out if isinstance(out, tuple) else (out,)
    weighted_loss(out).backward()
    return [None if t is None else t.grad for t in tensors], out


def assert_close(actual, expected, tol):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **tol)


def assert_matches_reference(run, tensors, dtype):
    """run(impl) -> a function of tensors; the compiled outputs and gradients match the reference's (outputs within
    the forward tolerance, gradients within the gradient tolerance; no gradient where the reference has none)."""
    got_grads, got = grads_of(run(compiled), leaves(*tensors))
    want_grads, want = grads_of(run(ref), leaves(*tensors))
    for a, b in zip(got, want):
        assert_close(a.detach(), b.detach(), tolerance(FORWARD_TOL, dtype))
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None
        else:
            assert_close(a, b, tolerance(GRAD_TOL, dtype))


# ---------------------------------------------------------------------------------------------- forward + backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_merge_tokens(shape, dtype, device):
    noncontiguous = shape.batch > 1  # half of the shapes run on transposed views
    x, metric, size = inputs(shape, dtype, device, noncontiguous)
    for size_arg in (size, None):
        kwargs = dict(grid_size=shape.grid, num_prefix_tokens=shape.prefix)
        with torch.no_grad():  # the fast path
            fast = compiled.merge_tokens(x, metric, size_arg, **kwargs)
            expected = ref.merge_tokens(x, metric, size_arg, **kwargs)
        for got, want in zip(fast, expected):
            assert_close(got, want, tolerance(FORWARD_TOL, dtype))

        def run(impl):
            return lambda x_, m_, s_: impl.merge_tokens(x_, m_, s_, **kwargs)

        assert_matches_reference(run, (x, metric, size_arg), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_checkerboard_similarity(shape, dtype, device):
    _, metric, _ = inputs(shape, dtype, device, noncontiguous=shape.batch > 1)

    def run(impl):
        return lambda m_: impl.checkerboard_similarity(m_, shape.grid, shape.prefix)

    (got_grad,), (got,) = grads_of(run(compiled), leaves(metric))
    (want_grad,), (want,) = grads_of(run(ref), leaves(metric))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got.detach(), want.detach(), tolerance(FORWARD_TOL, dtype))
    assert_close(got_grad, want_grad, tolerance(GRAD_TOL, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ste_match(shape, dtype, device):
    _, metric, _ = inputs(shape, torch.float64, device)
    scores = ref.checkerboard_similarity(metric, shape.grid, shape.prefix).to(dtype)

    (got_grad,), (got_matching, got_index) = grads_of(compiled.ste_match, leaves(scores))
    (want_grad,), (want_matching, want_index) = grads_of(ref.ste_match, leaves(scores))
    assert torch.equal(got_index, want_index)
    assert torch.equal(got_matching.detach(), want_matching.detach())
    if dtype != torch.bfloat16:
        # bfloat16 scores: the compiled backward computes the threshold and sigmoid in float32, the reference in
        # bfloat16, where exact 3-way ties are common and topk's pick among them is unspecified; forward only.
        assert_close(got_grad, want_grad, tolerance(GRAD_TOL, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("matching_kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=SHAPE_IDS[:5])
def test_scatter_mean_merge(shape, dtype, matching_kind, device):
    x, metric, size = inputs(shape, dtype, device, noncontiguous=shape.batch > 1)
    scores = ref.checkerboard_similarity(metric.double(), shape.grid, shape.prefix)
    acc = ref.accumulation_dtype(dtype)
    if matching_kind == "index":
        matching = scores.argmax(-1)
    elif matching_kind == "onehot":
        matching = ref.ste_match(scores)[0].to(acc)
    else:  # a dense soft matching, with some exact zeros
        matching = torch.softmax(scores, -1).to(acc)
        matching = matching.masked_fill(matching < matching.mean(), 0)

    def run(impl):
        return lambda x_, s_, m_: impl.scatter_mean_merge(x_, s_, m_, shape.grid, shape.prefix)

    assert_matches_reference(run, (x, size, matching), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_refine_keys(dtype, device):
    shape = SHAPES[3]
    _, metric, _ = inputs(shape, dtype, device, noncontiguous=True)
    w_down = make((5,), shape.dim, dtype=dtype, device=device, seed=11) * 0.3
    w_up = make((shape.dim,), 5, dtype=dtype, device=device, seed=12) * 0.3

    def run(impl):
        return lambda m_, d_, u_: impl.refine_keys(m_, d_, u_, 0.7, 0.1, False)

    got_grads, (got,) = grads_of(run(compiled), leaves(metric, w_down, w_up))
    want_grads, (want,) = grads_of(run(ref), leaves(metric, w_down, w_up))
    assert_close(got.detach(), want.detach(), tolerance(FORWARD_TOL, dtype))
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b, tolerance(GRAD_TOL if dtype != torch.bfloat16 else {dtype: (0.1, 0.05)}, dtype))
    # dropout active: the compiled backend defers to the reference (same generator draws, same values)
    torch.manual_seed(3)
    with_dropout = compiled.refine_keys(metric, w_down, w_up, 0.7, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(with_dropout, ref.refine_keys(metric, w_down, w_up, 0.7, 0.5, True))


# ---------------------------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("device", DEVICES)
def test_ties_pick_lowest_column(device):
    """Identical B tokens tie exactly: the lowest column wins, in the fused op and in ste_match (SPEC section 2)."""
    shape = Shape(2, 4, 4, 1, 6, 5)
    x, metric, size = inputs(shape, torch.float32, device)
    idx_a, idx_b = ref.checkerboard_indices(shape.grid, shape.prefix, device)
    metric[:, idx_b[2:]] = metric[:, idx_b[1:2]]  # every B cell has the same key
    scores = compiled.checkerboard_similarity(metric, shape.grid, shape.prefix)
    _, index = compiled.ste_match(scores)
    assert torch.all(index == shape.prefix)
    kwargs = dict(grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    got = compiled.merge_tokens(x, metric, size, **kwargs)
    want = ref.merge_tokens(x, metric, size, **kwargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_every_a_token_is_merged(device):
    """Sizes are conserved: sum of merged sizes = sum of input sizes (no token is lost, SPEC section 2 step 5)."""
    shape = Shape(3, 6, 5, 2, 8, 8)
    x, metric, size = inputs(shape, torch.float64, device)
    _, merged_size = compiled.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    torch.testing.assert_close(merged_size.sum(-1), size.sum(-1))


# ---------------------------------------------------------------------------------------------- gradcheck, opcheck
GRADCHECK_SHAPES = [Shape(2, 3, 3, 1, 5, 4), Shape(1, 2, 3, 0, 3, 3), Shape(1, 1, 2, 2, 4, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=[str(s) for s in GRADCHECK_SHAPES])
def test_gradcheck(shape, device):
    """float64 gradcheck of every smooth input. The STE paths (metric -> merge_tokens, scores -> ste_match) have a
    one-hot forward whose numerical derivative is 0 by design; they are checked against the reference's autograd
    in float64 above (test_merge_tokens, test_ste_match)."""
    x, metric, size = leaves(*inputs(shape, torch.float64, device, seed=5))
    grid, prefix = shape.grid, shape.prefix

    def check(fn, *args):
        return torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)

    fixed_metric = metric.detach()
    assert check(lambda x_, s_: compiled.merge_tokens(x_, fixed_metric, s_, grid_size=grid, num_prefix_tokens=prefix), x, size)
    finite = ~torch.isinf(ref.checkerboard_similarity(fixed_metric, grid, prefix))
    assert check(lambda m_: compiled.checkerboard_similarity(m_, grid, prefix)[finite], metric)
    matching = torch.softmax(ref.checkerboard_similarity(fixed_metric, grid, prefix), -1).requires_grad_()
    assert check(lambda x_, s_, m_: compiled.scatter_mean_merge(x_, s_, m_, grid, prefix), x, size, matching)
    w_down, w_up = leaves(make((3,), shape.dim, dtype=torch.float64, device=device, seed=8),
                          make((shape.dim,), 3, dtype=torch.float64, device=device, seed=9))
    assert check(lambda m_, d_, u_: compiled.refine_keys(m_, d_, u_, 0.5), metric, w_down, w_up)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    shape = Shape(2, 3, 4, 1, 6, 5)
    x, metric, size = leaves(*inputs(shape, torch.float32, device))
    h, w, p = shape.height, shape.width, shape.prefix
    fpet = torch.ops.fpet
    scores = ref.checkerboard_similarity(metric.detach(), shape.grid, p)
    index = scores.argmax(-1)
    matching = torch.softmax(scores, -1).requires_grad_()
    w_down, w_up = leaves(make((3,), shape.dim, dtype=torch.float32, device=device),
                          make((shape.dim,), 3, dtype=torch.float32, device=device))
    cases = [
        (fpet.refine_keys.default, (metric, w_down, w_up, 0.5)),
        (fpet.checkerboard_similarity.default, (metric, h, w, p)),
        (fpet.ste_match.default, (scores.masked_fill(torch.isinf(scores), -1e4).requires_grad_(),)),
        (fpet.scatter_mean_merge.default, (x, size, matching, h, w, p)),
        (fpet.scatter_mean_merge.default, (x, None, index, h, w, p)),
        (fpet.merge_tokens.default, (x, metric, size, h, w, p)),
        (fpet.merge_tokens.default, (x, metric, None, h, w, p)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------- determinism
def _merge_tokens_fwd_bwd(x, metric, size, shape):
    x, metric, size = leaves(x, metric, size)
    out = compiled.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    weighted_loss(out).backward()
    return [t.detach().clone() for t in out] + [x.grad, metric.grad, size.grad]


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device):
    shape = Shape(4, 14, 14, 1, 96, 64)
    x, metric, size = inputs(shape, torch.float32, device, seed=21)
    first = _merge_tokens_fwd_bwd(x, metric, size, shape)
    second = _merge_tokens_fwd_bwd(x, metric, size, shape)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_identical_across_thread_counts(dtype):
    shape = Shape(4, 14, 14, 1, 96, 64)
    x, metric, size = inputs(shape, dtype, "cpu", seed=22)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _merge_tokens_fwd_bwd(x, metric, size, shape)
        torch.set_num_threads(2)
        two = _merge_tokens_fwd_bwd(x, metric, size, shape)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_merge_tokens_forward_paths_agree():
    """The cpp forward runs whole batches per thread (normalise, score, argmax and merge fused per batch) when
    B >= 2 * threads, and phase by phase with the merge sliced by channels otherwise. B = 3 takes the first path on
    one thread and the second on two: both match the reference and each other, bitwise."""
    shape = Shape(3, 14, 14, 1, 96, 64)
    x, metric, size = inputs(shape, torch.float32, "cpu", seed=23)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(torch.ops.fpet.merge_tokens(x, metric, size, 14, 14, 1))
    finally:
        torch.set_num_threads(before)
    expected = ref.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    for fused, sliced, want in zip(*results, expected):
        assert torch.equal(fused, sliced)
        torch.testing.assert_close(fused, want)


def test_autocast_keeps_scores_in_float32():
    """Under torch.autocast the GEMMs inside the kernels still run in float32 (the index matches float32 inputs)."""
    shape = Shape(4, 14, 14, 1, 32, 64)
    x, metric, size = inputs(shape, torch.float32, "cpu", seed=24)
    with torch.no_grad():
        want = torch.ops.fpet.merge_tokens(x, metric, size, 14, 14, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = torch.ops.fpet.merge_tokens(x, metric, size, 14, 14, 1)
            scores = torch.ops.fpet.checkerboard_similarity(metric, 14, 14, 1)
    assert scores.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------- dispatch
def test_auto_picks_cpp_on_cpu():
    assert "cpp" in ops.available_backends()
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpp"
    shape = SHAPES[2]
    x, metric, size = inputs(shape, torch.float32, "cpu")
    kwargs = dict(grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    for a, b in zip(ops.merge_tokens(x, metric, size, backend="cpp", **kwargs), ref.merge_tokens(x, metric, size, **kwargs)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and CUDA kernels")
def test_cpp_backend_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        compiled.cpp.checkerboard_similarity(torch.randn(1, 3, 4, device="cuda"), (1, 2), 1)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(compiled, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(compiled, "_warned", type(compiled._warned)())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled.warn_fallback_once()
        compiled.warn_fallback_once()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]
    reasons = compiled.unavailable_reasons()
    assert set(reasons) == {"cpp", "cuda"} and "pip install" in reasons["cpp"]
