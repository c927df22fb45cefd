"""ste_match (docs/design.md §2 step 5, §3 STE): the reference's straight-through gradient against a numerically
gradchecked frozen surrogate, the single-B-patch threshold rule, and every backend against the reference."""
import math

import pytest
import torch

from fpet_kernels import reference as ref

from tests.helpers import (
    REFERENCE_GRADCHECK_GRIDS,
    TRITON_SHAPES,
    WIDE,
    Shape,
    assert_close,
    assert_same_vjp,
    backend_cases,
    frozen_ste,
    grads_of,
    leaves,
    make_inputs,
)


# ---------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("grid,prefix", REFERENCE_GRADCHECK_GRIDS)
def test_reference_straight_through_gradient(grid, prefix):
    """The straight-through gradient against a numerically checked frozen surrogate."""
    _, metric, _ = make_inputs(Shape(2, *grid, prefix, 3, 4))
    scores = ref.checkerboard_similarity(metric, grid, prefix).requires_grad_()
    surrogate = frozen_ste(lambda s: s)(scores)
    assert torch.autograd.gradcheck(surrogate, (scores,), fast_mode=True)
    assert_same_vjp(lambda s: ref.ste_match(s)[0], surrogate, (scores,))


def test_single_b_patch_gets_both_threshold_halves():
    # Grid 1x3 with P = 2: B = [prefix, prefix, one patch]; its column receives the whole threshold gradient.
    scores = torch.tensor([[[-math.inf, -math.inf, 0.3], [-math.inf, -math.inf, -0.2]]], dtype=torch.float64)
    scores.requires_grad_()
    matching, _ = ref.ste_match(scores)
    (matching * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    # z = S - t = 0 on the patch column: d/dS (sigmoid(S - t)) = sigma'(0) - sigma'(0) * (1/2 + 1/2) = 0
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores))


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("case", backend_cases())
def test_matches_reference_on_similarity_scores(case):
    shape = case.shape
    _, metric, _ = make_inputs(shape, torch.float64, case.device)
    scores = ref.checkerboard_similarity(metric, shape.grid, shape.prefix).to(case.dtype)

    (got_grad,), (got_matching, got_index) = grads_of(case.impl.ste_match, leaves(scores))
    (want_grad,), (want_matching, want_index) = grads_of(ref.ste_match, leaves(scores))
    assert torch.equal(got_index, want_index)
    assert torch.equal(got_matching.detach(), want_matching.detach())
    if case.dtype != torch.bfloat16:
        # bfloat16 scores: the backends compute the threshold and sigmoid in float32, the reference in bfloat16,
        # where exact 3-way ties are common and topk's pick among them is unspecified; forward only (the distinct
        # scores below check the bfloat16 backward).
        assert_close(got_grad, want_grad, case.grad, "dscores")


def distinct_scores(shape, dtype, device, seed=0):
    """Scores ``[B, NA, NB]`` with distinct values per row, exact in bfloat16, so that the top-2 has no ties
    (torch.topk's tie order is unspecified); prefix columns -inf."""
    board = shape.checkerboard
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(board.num_b, generator=gen) for _ in range(shape.batch * board.num_a)])
    scores = (rows.view(shape.batch, board.num_a, board.num_b) / 128.0 - 0.5)
    scores = scores.masked_fill(torch.arange(board.num_b) < shape.prefix, float("-inf"))
    return scores.to(device, dtype)


@pytest.mark.parametrize("case", backend_cases(shapes={"triton": TRITON_SHAPES + [WIDE]}))
def test_matches_reference_on_distinct_scores(case):
    (scores,) = leaves(distinct_scores(case.shape, case.dtype, case.device))
    (got_grad,), (matching, index) = grads_of(case.impl.ste_match, [scores])
    (want_grad,), (want_matching, want_index) = grads_of(ref.ste_match, leaves(scores))
    assert torch.equal(index, want_index) and torch.equal(matching.detach(), want_matching.detach())
    assert_close(got_grad, want_grad, case.grad, "dscores")
