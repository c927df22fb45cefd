"""The pure-PyTorch reference against an independent loop implementation of SPEC section 2, the closed-form
gradients of SPEC section 3, and float64 gradcheck of every op."""
import functools
import math

import pytest
import torch

from fpet_kernels import reference as ref
from fpet_kernels.merger import TokenMerger
from fpet_kernels.pet.binary import BINARY_MAGNITUDE, binarize

GRIDS = [(1, 2), (2, 2), (3, 5), (5, 3), (7, 7), (14, 14)]
PREFIXES = [0, 1, 2, 3]


def make_inputs(grid, prefix, batch=2, channels=5, head_dim=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    x = torch.randn(batch, n, channels, generator=gen, dtype=dtype)
    metric = torch.randn(batch, n, head_dim, generator=gen, dtype=dtype)
    size = torch.rand(batch, n, generator=gen, dtype=dtype) * 3 + 0.5
    return x, metric, size


# ------------------------------------------------------------------------------------------ a slow loop version
def loop_merge(x, metric, size, grid, prefix):
    """SPEC section 2, steps 3-6, one token at a time in Python (float64)."""
    height, width = grid
    batch, _, channels = x.shape
    a_tokens = [prefix + r * width + c for r in range(height) for c in range(width) if (r + c) % 2 == 0]
    b_tokens = list(range(prefix)) + [
        prefix + r * width + c for r in range(height) for c in range(width) if (r + c) % 2 == 1
    ]
    x_out = torch.zeros(batch, len(b_tokens), channels, dtype=torch.float64)
    size_out = torch.zeros(batch, len(b_tokens), dtype=torch.float64)
    index = torch.zeros(batch, len(a_tokens), dtype=torch.int64)
    for b in range(batch):
        unit = [metric[b, t].double() / max(float(metric[b, t].double().norm()), 1e-12) for t in range(x.shape[1])]
        for i, a in enumerate(a_tokens):
            best, best_j = -math.inf, None
            for j, t in enumerate(b_tokens):
                score = -math.inf if j < prefix else float(unit[a] @ unit[t])
                if score > best:  # strict: the lowest j wins a tie
                    best, best_j = score, j
            index[b, i] = best_j
        for j, t in enumerate(b_tokens):
            total = size[b, t].double() * x[b, t].double()
            weight = size[b, t].double()
            for i, a in enumerate(a_tokens):
                if index[b, i] == j:
                    total = total + size[b, a].double() * x[b, a].double()
                    weight = weight + size[b, a].double()
            x_out[b, j] = total / weight
            size_out[b, j] = weight
    return x_out, size_out, index


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_merge_matches_loop_implementation(grid, prefix):
    x, metric, size = make_inputs(grid, prefix, seed=grid[0] * 10 + grid[1] + prefix)
    want_x, want_size, want_index = loop_merge(x, metric, size, grid, prefix)
    scores = ref.checkerboard_similarity(metric, grid, prefix)
    matching, index = ref.ste_match(scores)
    assert torch.equal(index, want_index)
    assert torch.equal(matching, torch.nn.functional.one_hot(want_index, scores.shape[-1]).double())
    for path_needs_grad in (False, True):
        x_in = x.clone().requires_grad_(path_needs_grad)
        got_x, got_size = ref.merge_tokens(x_in, metric, size, grid_size=grid, num_prefix_tokens=prefix)
        torch.testing.assert_close(got_x.detach(), want_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_size.detach(), want_size, rtol=1e-12, atol=1e-12)
    # Every A token is merged, none is lost; prefix tokens pass through untouched.
    torch.testing.assert_close(got_size.sum(-1), size.sum(-1))
    torch.testing.assert_close(got_x[:, :prefix].detach(), x[:, :prefix])


def test_checkerboard_order():
    idx_a, idx_b = ref.checkerboard_indices((3, 4), 2)
    # cells (r, c) with r + c even: (0,0) (0,2) (1,1) (1,3) (2,0) (2,2) -> tokens 2 + r*4 + c
    assert idx_a.tolist() == [2, 4, 7, 9, 10, 12]
    assert idx_b.tolist() == [0, 1, 3, 5, 6, 8, 11, 13]


def test_similarity_is_cosine_with_prefix_columns_masked():
    x, metric, _ = make_inputs((3, 3), 2, dtype=torch.float32)
    scores = ref.checkerboard_similarity(metric, (3, 3), 2)
    assert scores.dtype == torch.float32 and scores.shape == (2, 5, 6)
    assert torch.isinf(scores[..., :2]).all() and (scores[..., :2] < 0).all()
    assert (scores[..., 2:].abs() <= 1 + 1e-6).all()
    half = ref.checkerboard_similarity(metric.half(), (3, 3), 2)
    assert half.dtype == torch.float32
    assert ref.checkerboard_similarity(metric.double(), (3, 3), 2).dtype == torch.float64


def test_ties_pick_lowest_column_and_lose_no_token():
    # All metric vectors equal: every score ties; every A token must go to the first B patch column.
    grid, prefix = (3, 4), 1
    metric = torch.ones(1, prefix + 12, 4)
    x = torch.randn(1, prefix + 12, 3)
    scores = ref.checkerboard_similarity(metric, grid, prefix)
    matching, index = ref.ste_match(scores)
    assert (index == prefix).all()
    assert torch.equal(matching.sum(-1), torch.ones(1, 6))
    _, size = ref.merge_tokens(x, metric, grid_size=grid, num_prefix_tokens=prefix)
    assert size[0, prefix].item() == 7 and size.sum().item() == 13


def test_zero_metric_is_finite():
    x, metric, size = make_inputs((2, 3), 1, dtype=torch.float32)
    metric.zero_()
    out, new_size = ref.merge_tokens(x, metric, size, grid_size=(2, 3), num_prefix_tokens=1)
    assert torch.isfinite(out).all() and torch.isfinite(new_size).all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_close_to_float32(dtype, tol):
    x, metric, size = make_inputs((5, 4), 1, dtype=torch.float32, seed=3)
    want_x, want_size = ref.merge_tokens(x, metric, size, grid_size=(5, 4), num_prefix_tokens=1)
    # Same matching (scores come from the same rounded metric), so compare against a float32 run on rounded inputs.
    xr, mr = x.to(dtype), metric.to(dtype)
    want_x, want_size = ref.merge_tokens(xr.float(), mr.float(), size, grid_size=(5, 4), num_prefix_tokens=1)
    got_x, got_size = ref.merge_tokens(xr, mr, size, grid_size=(5, 4), num_prefix_tokens=1)
    assert got_x.dtype == dtype and got_size.dtype == torch.float32
    torch.testing.assert_close(got_x.float(), want_x, rtol=tol, atol=tol)
    torch.testing.assert_close(got_size, want_size)


# ------------------------------------------------------------------------------------------ gradients
def frozen_ste(scores_fn):
    """A smooth function with the STE's value and Jacobian at the evaluation point.

    ``M = Soft + stopgrad(Hard - Soft)`` is piecewise constant, so finite differences of it are zero. Its gradient is
    that of ``Soft(theta) + C`` with ``C = (Hard - Soft)(theta0)`` frozen at the point: gradcheck that function
    numerically, then require the op's autograd gradient to equal it.
    """

    def soft(*inputs):
        scores = scores_fn(*inputs)
        top = scores.topk(2, dim=-1).values if scores.shape[-1] >= 2 else scores.expand(*scores.shape[:-1], 2)
        top2 = torch.where(torch.isinf(top[..., 1:]), top[..., :1], top[..., 1:])
        return torch.sigmoid(scores - (top[..., :1] + top2) / 2)

    def make(*point):
        with torch.no_grad():
            scores = scores_fn(*point)
            hard = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)
            offset = hard - soft(*point)
        return lambda *inputs: soft(*inputs) + offset

    return make


def assert_same_vjp(fn_a, fn_b, inputs, seed=0):
    outs_a, outs_b = fn_a(*inputs), fn_b(*inputs)
    outs_a = outs_a if isinstance(outs_a, tuple) else (outs_a,)
    outs_b = outs_b if isinstance(outs_b, tuple) else (outs_b,)
    gen = torch.Generator().manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs_a]
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_a = torch.autograd.grad(outs_a, inputs, probes, allow_unused=True)
    grads_b = torch.autograd.grad(outs_b, inputs, probes, allow_unused=True)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid,prefix", [((1, 2), 0), ((2, 2), 1), ((3, 5), 2), ((5, 3), 0), ((1, 3), 3)])
def test_gradcheck_every_op(grid, prefix):
    x, metric, size = make_inputs(grid, prefix, batch=2, channels=3, head_dim=4)
    x.requires_grad_(), metric.requires_grad_(), size.requires_grad_()
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=True)

    # refine_keys and checkerboard_similarity are smooth: plain gradcheck. The prefix columns are a constant -inf
    # (no finite differences there): check the patch columns.
    w_down = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda m, d, u: ref.refine_keys(m, d, u, 0.7, 0.0, False), (metric, w_down, w_up))
    assert gradcheck(lambda m: ref.checkerboard_similarity(m, grid, prefix)[..., prefix:], (metric,))

    # scatter_mean_merge is smooth in x, size and a dense matching.
    matching = torch.rand(x.shape[0], (grid[0] * grid[1] + 1) // 2, prefix + grid[0] * grid[1] // 2,
                          dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, s, m: ref.scatter_mean_merge(a, s, m, grid, prefix), (x, size, matching))

    # ste_match: the straight-through gradient against a numerically checked frozen surrogate.
    scores = ref.checkerboard_similarity(metric.detach(), grid, prefix).requires_grad_()
    surrogate = frozen_ste(lambda s: s)(scores)
    assert gradcheck(surrogate, (scores,))
    assert_same_vjp(lambda s: ref.ste_match(s)[0], surrogate, (scores,))

    # merge_tokens: smooth in x and size; in metric through the STE (same surrogate construction).
    assert gradcheck(lambda a, s: ref.merge_tokens(a, metric.detach(), s, grid_size=grid, num_prefix_tokens=prefix),
                     (x, size))
    matching_of = frozen_ste(lambda m: ref.checkerboard_similarity(m, grid, prefix))(metric)
    merge_surrogate = lambda a, m, s: ref.scatter_mean_merge(a, s, matching_of(m), grid, prefix)
    assert gradcheck(merge_surrogate, (x, metric, size))
    assert_same_vjp(
        lambda a, m, s: ref.merge_tokens(a, m, s, grid_size=grid, num_prefix_tokens=prefix),
        merge_surrogate, (x, metric, size),
    )


def test_gradcheck_merge_through_refinement_adapter():
    grid, prefix = (3, 4), 1
    x, metric, size = make_inputs(grid, prefix, batch=2, channels=3, head_dim=8, seed=5)
    merger = TokenMerger(8, refine_dim=4, refine_bits=32, refine_dropout=0.0, backend="reference").double()
    torch.nn.init.normal_(merger.up.weight, std=0.5)  # away from the zero init so the adapter matters
    down, up = merger.down.weight, merger.up.weight

    def refined(w_down, w_up):
        return ref.refine_keys(metric, w_down, w_up, 1.0)

    w_down, w_up = down.detach().requires_grad_(), up.detach().requires_grad_()
    matching_of = frozen_ste(lambda d, u: ref.checkerboard_similarity(refined(d, u), grid, prefix))(w_down, w_up)
    surrogate = lambda a, d, u: ref.scatter_mean_merge(a, size, matching_of(d, u), grid, prefix)
    x.requires_grad_()
    assert torch.autograd.gradcheck(surrogate, (x, w_down, w_up), fast_mode=True)
    assert_same_vjp(
        lambda a, d, u: ref.merge_tokens(a, refined(d, u), size, grid_size=grid, num_prefix_tokens=prefix),
        surrogate, (x, w_down, w_up),
    )
    # The module path gives the same gradients and none to the (detached) metric.
    metric.requires_grad_()
    out, new_size = merger(x, metric, size, grid, prefix)
    (out.square().sum() + new_size.square().sum()).backward()
    assert metric.grad is None and down.grad is not None and up.grad.abs().sum() > 0


def closed_form_gradients(x, size, scores, grad_out, grad_size, grid, prefix):
    """SPEC section 3, written out."""
    idx_a, idx_b = ref.checkerboard_indices(grid, prefix)
    x_a, x_b, s_a, s_b = x[:, idx_a], x[:, idx_b], size[:, idx_a], size[:, idx_b]
    matching, k = ref.ste_match(scores)
    x_new, z = ref.scatter_mean_merge(x, size, k, grid, prefix)
    g, h = grad_out, grad_size
    gather = lambda t: torch.gather(t, 1, k.unsqueeze(-1).expand(-1, -1, *t.shape[2:]) if t.dim() == 3 else k)
    dx_b = s_b.unsqueeze(-1) * g / z.unsqueeze(-1)
    dx_a = s_a.unsqueeze(-1) * gather(g) / gather(z).unsqueeze(-1)
    ds_b = ((x_b - x_new) * g).sum(-1) / z + h
    ds_a = ((x_a - gather(x_new)) * gather(g)).sum(-1) / gather(z) + gather(h)
    # dL/dM[i, j] = s_A[i] * (<x_A[i] - x'_j, g_j> / Z_j + h_j)
    inner = torch.einsum("bic,bjc->bij", x_a, g) - (x_new * g).sum(-1).unsqueeze(1)
    d_m = s_a.unsqueeze(-1) * (inner / z.unsqueeze(1) + h.unsqueeze(1))
    t = scores.topk(2, dim=-1)
    soft = torch.sigmoid(scores - t.values.mean(-1, keepdim=True))
    sig = soft * (1 - soft)
    d_s = sig * d_m
    half = 0.5 * d_s.sum(-1, keepdim=True)
    d_s = d_s - torch.zeros_like(d_s).scatter_add(-1, t.indices, half.expand(-1, -1, 2))
    d_s[..., :prefix] = 0
    dx = torch.zeros_like(x)
    dx[:, idx_a], dx[:, idx_b] = dx_a, dx_b
    dsize = torch.zeros_like(size)
    dsize[:, idx_a], dsize[:, idx_b] = ds_a, ds_b
    return dx, dsize, d_s


@pytest.mark.parametrize("grid,prefix", [((2, 3), 0), ((4, 4), 1), ((5, 3), 3), ((14, 14), 1)])
def test_autograd_equals_closed_form_backward(grid, prefix):
    x, metric, size = make_inputs(grid, prefix, batch=2, channels=6, head_dim=5, seed=11)
    scores = ref.checkerboard_similarity(metric, grid, prefix).requires_grad_()
    x.requires_grad_(), size.requires_grad_()
    matching, _ = ref.ste_match(scores)
    out, new_size = ref.scatter_mean_merge(x, size, matching, grid, prefix)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_size = torch.randn(new_size.shape, generator=gen, dtype=torch.float64)
    dx, dsize, dscores = torch.autograd.grad((out, new_size), (x, size, scores), (grad_out, grad_size))
    want_dx, want_dsize, want_dscores = closed_form_gradients(
        x.detach(), size.detach(), scores.detach(), grad_out, grad_size, grid, prefix
    )
    torch.testing.assert_close(dx, want_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dsize, want_dsize, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dscores, want_dscores, rtol=1e-10, atol=1e-12)


def test_single_b_patch_gets_both_threshold_halves():
    # Grid 1x3 with P = 2: B = [prefix, prefix, one patch]; its column receives the whole threshold gradient.
    scores = torch.tensor([[[-math.inf, -math.inf, 0.3], [-math.inf, -math.inf, -0.2]]], dtype=torch.float64)
    scores.requires_grad_()
    matching, _ = ref.ste_match(scores)
    (matching * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    # z = S - t = 0 on the patch column: d/dS (sigmoid(S - t)) = sigma'(0) - sigma'(0) * (1/2 + 1/2) = 0
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores))


def test_fast_path_equals_autograd_path():
    grid, prefix = (14, 14), 1
    x, metric, size = make_inputs(grid, prefix, batch=3, channels=16, head_dim=8, dtype=torch.float32)
    with torch.no_grad():
        fast = ref.merge_tokens(x, metric, size, grid_size=grid, num_prefix_tokens=prefix)
    slow = ref.merge_tokens(x.requires_grad_(), metric, size, grid_size=grid, num_prefix_tokens=prefix)
    assert slow[0].grad_fn is not None and fast[0].grad_fn is None
    torch.testing.assert_close(fast[0], slow[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1].detach(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ binary weights
def test_binarize_values_and_straight_through_gradient():
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    q = binarize(w)
    mu, sigma = w.mean().detach(), w.std().detach()
    levels = mu + torch.tensor([-1.0, 1.0], dtype=torch.float64) * BINARY_MAGNITUDE * sigma
    assert set(torch.round(q.detach(), decimals=9).unique().tolist()) <= set(torch.round(levels, decimals=9).tolist())
    # Straight-through: the gradient is that of (W^ + K) * sigma + mu with K = c*sign(W^) - W^ held constant.
    normalized = (w.detach() - mu) / (sigma + 1e-5)
    k = BINARY_MAGNITUDE * torch.where(normalized >= 0, 1.0, -1.0).double() - normalized

    def surrogate(weight):
        m, s = weight.mean(), weight.std()
        return ((weight - m) / (s + 1e-5) + k) * s + m

    probe = torch.randn(8, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad((q * probe).sum(), w)
    (want,) = torch.autograd.grad((surrogate(w) * probe).sum(), w)
    torch.testing.assert_close(grad, want)


def test_binarize_sign_of_zero_is_plus_one():
    w = torch.tensor([-1.0, 0.0, 1.0])  # mean 0: the middle weight normalises to exactly 0
    q = binarize(w)
    assert q[1] > 0 and q[1] == q[2]
