"""NaN / inf inputs (docs/design.md §2 step 5 "NaN", §3): one rule on every backend, never a crash or an index
outside the B cells. A NaN score ranks as +inf, so an A token whose scores are all NaN merges into its first B cell
and a B token with a NaN key draws every A token; the matching stays exactly one-hot, such rows carry no STE
gradient (the gradient into x stays finite), and NaN in x propagates into its merged token only."""
import pytest
import torch

from fpet_kernels import ops
from fpet_kernels.geometry import Checkerboard

from tests.helpers import backend_device, backend_marks

NAMES = ("reference", "cpp", "triton", "cuda")
BACKENDS = [pytest.param(name, marks=backend_marks(name)) for name in NAMES]
GRID = Checkerboard(3, 4, 1)  # NA = 6, NB = 1 + 6


def _inputs(device, poison, value):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, GRID.num_tokens, 5, generator=generator)
    metric = torch.randn(3, GRID.num_tokens, 7, generator=generator)
    idx_a, idx_b = GRID.indices()
    if poison == "a_key":  # batch 0: A token 2's key; batch 1: the keys of A tokens 0 and 5
        metric[0, idx_a[2], 3] = value
        metric[1, idx_a[0]] = value
        metric[1, idx_a[5], 0] = value
    elif poison == "b_key":  # batch 0: B cell 4's key, batch 2: B cells 2 and 5
        metric[0, idx_b[GRID.prefix + 4], 1] = value
        metric[2, idx_b[GRID.prefix + 2]] = value
        metric[2, idx_b[GRID.prefix + 5], 6] = value
    else:  # x: A token 1 of batch 0, B cell 3 of batch 1
        x[0, idx_a[1], 2] = value
        x[1, idx_b[GRID.prefix + 3], 0] = value
    return x.to(device), metric.to(device)


def _expected_index(poison):
    """The matched B column of each A row the rule gives, where the poison decides it (else None)."""
    p = GRID.prefix
    expected = [[None] * GRID.num_a for _ in range(3)]
    if poison == "a_key":
        expected[0][2], expected[1][0], expected[1][5] = p, p, p  # all scores NaN: the first B cell
    elif poison == "b_key":
        expected[0] = [p + 4] * GRID.num_a  # a NaN column ranks above every finite score
        expected[2] = [p + 2] * GRID.num_a  # the first of two NaN columns
    return expected


def _merge(backend, x, metric, grad):
    x, metric = x.clone().requires_grad_(grad), metric.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        merged, size = ops.merge_tokens(x, metric, None, grid_size=GRID.size, num_prefix_tokens=GRID.prefix,
                                        backend=backend)
    grads = None
    if grad:
        weights = torch.randn(merged.shape, generator=torch.Generator().manual_seed(1)).to(merged.device)
        grads = torch.autograd.grad((merged * weights).sum(), [x, metric])
    return merged.detach().cpu(), size.detach().cpu(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("poison", ["a_key", "b_key"])
def test_nan_keys_merge_by_one_rule(backend, poison, value):
    device = backend_device(backend)
    x, metric = _inputs(device, poison, value)
    scores = ops.checkerboard_similarity(metric, GRID.size, GRID.prefix, backend=backend)
    matching, index = ops.ste_match(scores, backend=backend)
    _, want = ops.ste_match(ops.checkerboard_similarity(metric.cpu(), GRID.size, GRID.prefix, backend="reference"),
                            backend="reference")
    assert torch.equal(index.cpu(), want)
    assert bool(((index >= GRID.prefix) & (index < GRID.num_b)).all())
    for b, row in enumerate(_expected_index(poison)):
        for i, column in enumerate(row):
            if column is not None:
                assert int(index[b, i]) == column, (b, i)
    assert torch.equal(matching.cpu(), torch.nn.functional.one_hot(want, GRID.num_b).to(matching.dtype))
    for grad in (False, True):
        merged, size, grads = _merge(backend, x, metric, grad)
        ref_merged, ref_size, ref_grads = _merge("reference", x.cpu(), metric.cpu(), grad)
        assert torch.equal(size, ref_size)
        assert merged.isfinite().all()  # x is finite and the matching one-hot: the merge itself stays finite
        torch.testing.assert_close(merged, ref_merged, atol=1e-5, rtol=1e-5)
        if grad:
            torch.testing.assert_close(grads[0].cpu(), ref_grads[0], atol=1e-5, rtol=1e-5)
            assert grads[0].isfinite().all()
            # The metric gradient of an image with a NaN key propagates NaN (how far depends on the backend's GEMMs:
            # 0 * NaN); the clean image's matches the reference.
            clean = 2 if poison == "a_key" else 1
            torch.testing.assert_close(grads[1][clean].cpu(), ref_grads[1][clean], atol=1e-5, rtol=1e-5)
            assert grads[1][clean].isfinite().all() and grads[1].shape == metric.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_x_reaches_its_merged_token_only(backend, value):
    device = backend_device(backend)
    x, metric = _inputs(device, "x", value)
    with torch.no_grad():
        merged, size = ops.merge_tokens(x, metric, None, grid_size=GRID.size, num_prefix_tokens=GRID.prefix,
                                        backend=backend)
        _, index = ops.ste_match(ops.checkerboard_similarity(metric, GRID.size, GRID.prefix, backend=backend),
                                 backend=backend)
        ref_merged, _ = ops.merge_tokens(x.cpu(), metric.cpu(), None, grid_size=GRID.size,
                                         num_prefix_tokens=GRID.prefix, backend="reference")
    bad = ~merged.cpu().isfinite().all(-1)
    expected = torch.zeros_like(bad)
    expected[0, int(index[0, 1])] = True  # A token 1 of batch 0 went there
    expected[1, GRID.prefix + 3] = True  # B cell 3 of batch 1 is its own merged token
    assert torch.equal(bad, expected)
    torch.testing.assert_close(merged.cpu(), ref_merged, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ste_match_ranks_nan_as_inf_and_gives_such_rows_no_gradient(backend):
    device = backend_device(backend)
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[[-inf, nan, nan, nan, nan],     # all NaN: the first B column
                            [-inf, 0.1, nan, 0.3, 0.2],     # a NaN outranks every finite score
                            [-inf, 0.1, inf, nan, 0.9],     # NaN and +inf tie: the lowest column
                            [-inf, 0.4, 0.1, 0.3, 0.2]]])   # finite: the plain argmax
    grad_matching = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3))

    def run(name, s, g):
        s = s.clone().requires_grad_(True)
        matching, index = ops.ste_match(s, backend=name)
        (grad,) = torch.autograd.grad(matching, s, g)
        return matching.detach().cpu(), index.cpu(), grad.cpu()

    matching, index, grad = run(backend, scores.to(device), grad_matching.to(device))
    ref_matching, ref_index, ref_grad = run("reference", scores, grad_matching)
    assert index.tolist() == [[1, 2, 2, 1]] == ref_index.tolist()
    assert torch.equal(matching, ref_matching) and torch.equal(matching.sum(-1), torch.ones(1, 4))
    assert torch.equal(grad[0, :3], torch.zeros(3, 5))  # rows with NaN / inf scores: no STE gradient
    assert grad[0, 3].abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param(n, marks=backend_marks(n)) for n in ("reference", "cpp")])
def test_a_nan_image_stays_in_its_own_row_of_a_patched_model(backend):
    import fpet_kernels as fk
    from tests.helpers import images, tiny_vit

    model = fk.apply_fpet(fk.add_pet(tiny_vit(global_pool="avg"), "lora"), layer=1, backend=backend).eval()
    batch = images(model, batch=3)
    batch[1, :, 5, 7] = float("nan")
    with torch.no_grad():
        out = model(batch)
        clean = model(batch[[0, 2]])
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    torch.testing.assert_close(out[[0, 2]], clean)
    model.train()
    loss = model(batch[[0, 2]]).square().mean()  # training on clean images after a NaN forward: state is per forward
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
