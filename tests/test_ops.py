"""The public functional API: dispatch to the reference, and clear errors for bad input."""
import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import ops, reference as ref


def inputs(grid=(3, 4), prefix=1, batch=2, channels=6, head_dim=4):
    n = prefix + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, n, channels, generator=gen),
        torch.randn(batch, n, head_dim, generator=gen),
        torch.rand(batch, n, generator=gen) + 0.5,
    )


def test_reference_backend_matches_reference_module():
    x, metric, size = inputs()
    got = fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend="reference")
    want = ref.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    scores = fk.checkerboard_similarity(metric, (3, 4), 1, backend="reference")
    assert torch.equal(scores, ref.checkerboard_similarity(metric, (3, 4), 1))
    matching, index = fk.ste_match(scores, backend="reference")
    merged = fk.scatter_mean_merge(x, size, index, (3, 4), 1, backend="reference")
    assert torch.equal(merged[0], want[0])
    w_down, w_up = torch.randn(8, 4), torch.randn(4, 8)
    got = fk.refine_keys(metric, w_down, w_up, 0.5, backend="reference")
    assert torch.equal(got, ref.refine_keys(metric, w_down, w_up, 0.5))


def test_auto_resolves_to_an_available_backend():
    assert "reference" in fk.available_backends()
    assert ops.resolve_backend("auto", torch.device("cpu")) in fk.available_backends()


@pytest.mark.parametrize("backend", [b for b in ("cpp", "cuda", "triton") if b not in fk.available_backends()])
def test_unavailable_backend_says_how_to_get_it(backend):
    x, metric, size = inputs()
    with pytest.raises(fk.BackendUnavailableError, match=backend):
        fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend=backend)


def test_unknown_backend():
    x, metric, size = inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend="fast")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(metric=torch.randn(2, 13)), r"metric must have shape \[B, N, D\]"),
        (dict(metric=torch.randn(2, 12, 4)), "metric must have shape"),
        (dict(grid_size=(3, 3)), "N=13 tokens but num_prefix_tokens"),
        (dict(num_prefix_tokens=2), "N=13 tokens but num_prefix_tokens"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0"),
        (dict(grid_size=(3,)), "grid_size must be two positive ints"),
        (dict(size=torch.ones(2, 12)), r"size must have shape \[B, N\]"),
        (dict(x=torch.ones(2, 13, 6, dtype=torch.int32)), "x must be float64, float32, bfloat16 or float16"),
        (dict(metric=torch.randn(2, 13, 4, device="meta")), "all inputs must be on one device"),
    ],
)
def test_merge_tokens_bad_input(change, match):
    x, metric, size = inputs()
    kwargs = dict(x=x, metric=metric, size=size, grid_size=(3, 4), num_prefix_tokens=1)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fk.merge_tokens(kwargs.pop("x"), kwargs.pop("metric"), kwargs.pop("size"), **kwargs)


def test_grid_with_one_patch_is_refused():
    x, metric, _ = inputs(grid=(1, 1), prefix=1)
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        fk.merge_tokens(x, metric, grid_size=(1, 1), num_prefix_tokens=1)


def test_other_ops_bad_input():
    x, metric, size = inputs()
    with pytest.raises(ValueError, match=r"w_down must have shape \[d, Dh=4\]"):
        fk.refine_keys(metric, torch.randn(8, 5), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"w_up must have shape \[Dh, d\]"):
        fk.refine_keys(metric, torch.randn(8, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        fk.refine_keys(metric, torch.randn(8, 4), torch.randn(4, 8), dropout_p=1.0)
    with pytest.raises(ValueError, match=r"scores must have shape \[B, NA, NB\]"):
        fk.ste_match(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"matching must have shape \[B, NA, NB\] = \[2, 6, 7\]"):
        fk.scatter_mean_merge(x, size, torch.rand(2, 6, 6), (3, 4), 1)
    with pytest.raises(ValueError, match=r"matching index values must lie in \[P, NB\)"):
        fk.scatter_mean_merge(x, size, torch.zeros(2, 6, dtype=torch.int64), (3, 4), 1)
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        fk.checkerboard_similarity(metric[:, :2], (1, 1), 1)
