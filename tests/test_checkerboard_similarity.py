"""checkerboard_similarity (docs/design.md §2 step 4): the reference's own checks, and every backend against the
reference, forward and backward, over backend x dtype x shape."""
import functools

import pytest
import torch

from fpet_kernels import reference as ref

from tests.helpers import (
    GRADCHECK_SHAPES,
    REFERENCE_GRADCHECK_GRIDS,
    Shape,
    assert_close,
    backend_cases,
    grads_of,
    leaves,
    make_inputs,
)


# ---------------------------------------------------------------------------------------------- the reference
def test_similarity_is_cosine_with_prefix_columns_masked():
    _, metric, _ = make_inputs(Shape(2, 3, 3, 2, 5, 4), torch.float32)
    scores = ref.checkerboard_similarity(metric, (3, 3), 2)
    assert scores.dtype == torch.float32 and scores.shape == (2, 5, 6)
    assert torch.isinf(scores[..., :2]).all() and (scores[..., :2] < 0).all()
    assert (scores[..., 2:].abs() <= 1 + 1e-6).all()
    half = ref.checkerboard_similarity(metric.half(), (3, 3), 2)
    assert half.dtype == torch.float32
    assert ref.checkerboard_similarity(metric.double(), (3, 3), 2).dtype == torch.float64


@pytest.mark.parametrize("grid,prefix", REFERENCE_GRADCHECK_GRIDS)
def test_reference_gradcheck(grid, prefix):
    """Smooth: plain float64 gradcheck. The prefix columns are a constant -inf (no finite differences there): check
    the patch columns."""
    _, metric, _ = make_inputs(Shape(2, *grid, prefix, 3, 4))
    metric.requires_grad_()
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert gradcheck(lambda m: ref.checkerboard_similarity(m, grid, prefix)[..., prefix:], (metric,))


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("case", backend_cases())
def test_matches_reference(case):
    shape = case.shape
    _, metric, _ = case.inputs()

    def run(impl):
        return lambda m_: impl.checkerboard_similarity(m_, shape.grid, shape.prefix)

    (got_grad,), (got,) = grads_of(run(case.impl), leaves(metric))
    (want_grad,), (want,) = grads_of(run(ref), leaves(metric))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got, want, case.forward_for(want), "scores")
    assert_close(got_grad, want_grad, case.grad, "dmetric")


@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.float64,), shapes=GRADCHECK_SHAPES))
def test_gradcheck(case):
    """float64 gradcheck of the patch columns (the prefix columns are a constant -inf)."""
    shape = case.shape
    (metric,) = leaves(make_inputs(shape, case.dtype, case.device, seed=5)[1])
    finite = ~torch.isinf(ref.checkerboard_similarity(metric.detach(), shape.grid, shape.prefix))
    assert torch.autograd.gradcheck(
        lambda m_: case.impl.checkerboard_similarity(m_, shape.grid, shape.prefix)[finite], (metric,),
        eps=1e-6, atol=1e-6)
