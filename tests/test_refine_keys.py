"""refine_keys, the key refinement adapter ``m + scale * Up(Dropout(ReLU(Down(m))))`` (docs/design.md §2 step 2):
the reference's float64 gradcheck, and every backend against the reference, with and without dropout."""
import dataclasses
import functools

import pytest
import torch

from fpet_kernels import reference as ref

from tests.helpers import (
    COMPILED_SHAPES,
    GRADCHECK_SHAPES,
    REFERENCE_GRADCHECK_GRIDS,
    Shape,
    adapter_weights,
    assert_close,
    assert_matches_reference,
    backend_cases,
    grads_of,
    leaves,
    make_inputs,
    random_tensor,
)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The metric ``[B, N, Dh]`` of ``shape`` and an adapter of ``hidden`` units."""

    shape: Shape
    hidden: int

    @property
    def batch(self) -> int:
        return self.shape.batch

    def __str__(self) -> str:
        return f"B{self.shape.batch}_N{self.shape.tokens}_D{self.shape.dim}_d{self.hidden}"


def tokens(batch, count, dim):
    return Shape(batch, 1, count, 0, 1, dim)


ADAPTERS = {
    "cpp": [Adapter(COMPILED_SHAPES[3], 5)],
    "cuda": [Adapter(COMPILED_SHAPES[3], 5)],
    "triton": [Adapter(tokens(2, 11, 5), 3), Adapter(tokens(2, 11, 16), 32), Adapter(tokens(2, 11, 17), 9)],
}


# ---------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("grid,prefix", REFERENCE_GRADCHECK_GRIDS)
def test_reference_gradcheck(grid, prefix):
    _, metric, _ = make_inputs(Shape(2, *grid, prefix, 3, 4))
    metric.requires_grad_()
    w_down = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert gradcheck(lambda m, d, u: ref.refine_keys(m, d, u, 0.7, 0.0, False), (metric, w_down, w_up))


# ---------------------------------------------------------------------------------------------- every backend
def adapter_inputs(case):
    adapter = case.shape
    _, metric, _ = make_inputs(adapter.shape, case.dtype, case.device, noncontiguous=case.noncontiguous)
    return (metric, *adapter_weights(adapter.shape.dim, adapter.hidden, case.dtype, case.device))


@pytest.mark.parametrize("case", backend_cases(shapes=ADAPTERS))
def test_matches_reference(case):
    """Dropout p = 0.1 but not training: the identity, so the backends see the same function."""
    def run(impl):
        return lambda m_, d_, u_: impl.refine_keys(m_, d_, u_, 0.7, 0.1, False)

    assert_matches_reference(case, run, leaves(*adapter_inputs(case)), names=("dmetric", "dw_down", "dw_up"))


@pytest.mark.parametrize("case", backend_cases(shapes=ADAPTERS, backends=("cpp", "cuda")))
def test_dropout_is_the_reference_under_the_same_seed(case):
    """Dropout active: the compiled backend draws the reference's keep mask (same generator draws, same values)."""
    metric, w_down, w_up = adapter_inputs(case)
    torch.manual_seed(3)
    with_dropout = case.impl.refine_keys(metric, w_down, w_up, 0.7, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(with_dropout, ref.refine_keys(metric, w_down, w_up, 0.7, 0.5, True))


@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.float32,), shapes=[Adapter(tokens(2, 9, 8), 6)]))
def test_dropout_uses_the_torch_generator_keep_mask(case):
    """``reference.dropout_keep_mask`` under the same seed, scaled by 1 / (1 - p), forward and backward."""
    metric, w_down, w_up = leaves(random_tensor(2, 9, 8, dtype=case.dtype, device=case.device, seed=0),
                                  random_tensor(6, 8, dtype=case.dtype, device=case.device, seed=1),
                                  random_tensor(8, 6, dtype=case.dtype, device=case.device, seed=2))
    torch.manual_seed(3)
    got = case.impl.refine_keys(metric, w_down, w_up, 0.5, 0.4, True)
    torch.manual_seed(3)
    keep = ref.dropout_keep_mask((2, 9, 6), 0.4, metric.device).to(metric.dtype)

    def want_fn(m_, d_, u_):
        return m_ + 0.5 * (torch.relu(m_ @ d_.t()) * keep / 0.6) @ u_.t()

    assert 0 < keep.mean() < 1
    assert_close(got, want_fn(metric, w_down, w_up), case.forward, "refined")
    got_grads, _ = grads_of(lambda *_: got, [metric, w_down, w_up])
    want_grads, _ = grads_of(want_fn, [metric, w_down, w_up])
    for a, b, name in zip(got_grads, want_grads, ("dmetric", "dw_down", "dw_up")):
        assert_close(a, b, case.grad, name)


@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.float64,), shapes=GRADCHECK_SHAPES))
def test_gradcheck(case):
    shape = case.shape
    _, metric, _ = leaves(*make_inputs(shape, case.dtype, case.device, seed=5))
    w_down, w_up = leaves(*adapter_weights(shape.dim, 3, case.dtype, case.device, seed=8))
    assert torch.autograd.gradcheck(lambda m_, d_, u_: case.impl.refine_keys(m_, d_, u_, 0.5), (metric, w_down, w_up),
                                    eps=1e-6, atol=1e-6)
