"""scatter_mean_merge (int64 index) and scatter_mean_merge_dense (float matching), docs/design.md §2 step 6: the
reference's float64 gradchecks, and every backend against the reference, forward and backward."""
import functools

import pytest
import torch

from fpet_kernels import reference as ref

from tests.helpers import (
    COMPILED_SHAPES,
    GRADCHECK_SHAPES,
    REFERENCE_GRADCHECK_GRIDS,
    Shape,
    assert_matches_reference,
    backend_cases,
    leaves,
    make_inputs,
)

# The compiled backends on the first five shapes (the merges are cheap; the large grids run in test_merge_tokens).
CASES = backend_cases(shapes={"cpp": COMPILED_SHAPES[:5], "cuda": COMPILED_SHAPES[:5]})


def double_scores(metric, shape):
    """The float64 reference scores of ``metric``'s values (the matchings below are built from them)."""
    return ref.checkerboard_similarity(metric.detach().double(), shape.grid, shape.prefix)


# ---------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("grid,prefix", REFERENCE_GRADCHECK_GRIDS)
def test_reference_gradcheck(grid, prefix):
    """Smooth in x, size and a dense matching (float64 gradcheck); the index merge in x and size."""
    shape = Shape(2, *grid, prefix, 3, 4)
    x, metric, size = make_inputs(shape)
    x.requires_grad_(), size.requires_grad_()
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    board = shape.checkerboard
    matching = torch.rand(x.shape[0], board.num_a, board.num_b, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, s, m: ref.scatter_mean_merge_dense(a, s, m, grid, prefix), (x, size, matching))
    index = double_scores(metric, shape).argmax(-1)
    assert gradcheck(lambda a, s: ref.scatter_mean_merge(a, s, index, grid, prefix), (x, size))


def test_index_and_one_hot_dense_merge_agree():
    shape = Shape(2, 4, 5, 1, 6, 4)
    x, metric, size = make_inputs(shape)
    scores = double_scores(metric, shape)
    matching, index = ref.ste_match(scores)
    for size_arg in (size, None):
        by_index = ref.scatter_mean_merge(x, size_arg, index, shape.grid, shape.prefix)
        dense = ref.scatter_mean_merge_dense(x, size_arg, matching, shape.grid, shape.prefix)
        for a, b in zip(by_index, dense):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("with_size", [True, False], ids=["size", "no_size"])
@pytest.mark.parametrize("case", CASES)
def test_index_matches_reference(case, with_size):
    shape = case.shape
    x, metric, size = case.inputs()
    index = double_scores(metric, shape).argmax(-1)

    def run(impl):
        return lambda x_, s_: impl.scatter_mean_merge(x_, s_, index, shape.grid, shape.prefix)

    assert_matches_reference(case, run, leaves(x, size if with_size else None), names=("dx", "dsize"))


def dense_matching(kind, scores, dtype):
    """A float matching ``[B, NA, NB]`` of the scores: ``one_hot`` (ste_match's value) and ``sparse`` (a softmax
    with exact zeros) in the accumulation dtype, ``soft`` (a softmax) in the dtype of x: any float matching, not
    only the one-hot of ste_match, so the dense path is a real GEMM."""
    acc = ref.accumulation_dtype(dtype)
    if kind == "one_hot":
        return ref.ste_match(scores)[0].to(acc)
    matching = torch.softmax(scores, -1)
    if kind == "soft":
        return matching.to(dtype)
    matching = matching.to(acc)
    return matching.masked_fill(matching < matching.mean(), 0)


def with_kinds(params):
    """``(case, kind)`` params: every case with each kind of matching; under the interpreter one_hot and soft."""
    return [pytest.param(case, kind, id=f"{param.id}-{kind}", marks=param.marks)
            for param in params for case in param.values
            for kind in ("one_hot", "soft", "sparse") if not (case.interpreted and kind == "sparse")]


@pytest.mark.parametrize("case,kind", with_kinds(CASES))
def test_dense_matches_reference(case, kind):
    shape = case.shape
    x, metric, size = case.inputs()
    matching = dense_matching(kind, double_scores(metric, shape), case.dtype)

    def run(impl):
        return lambda x_, s_, m_: impl.scatter_mean_merge_dense(x_, s_, m_, shape.grid, shape.prefix)

    assert_matches_reference(case, run, leaves(x, size, matching), names=("dx", "dsize", "dmatching"))


@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.float64,), shapes=GRADCHECK_SHAPES))
def test_gradcheck(case):
    """float64 gradcheck in x, size and a dense (softmax) matching; the index merge in x and size."""
    shape = case.shape
    x, metric, size = leaves(*make_inputs(shape, case.dtype, case.device, seed=5))
    scores = ref.checkerboard_similarity(metric.detach(), shape.grid, shape.prefix)
    check = functools.partial(torch.autograd.gradcheck, eps=1e-6, atol=1e-6)
    matching = torch.softmax(scores, -1).requires_grad_()
    assert check(lambda x_, s_, m_: case.impl.scatter_mean_merge_dense(x_, s_, m_, shape.grid, shape.prefix),
                 (x, size, matching))
    index = scores.argmax(-1)
    assert check(lambda x_, s_: case.impl.scatter_mean_merge(x_, s_, index, shape.grid, shape.prefix), (x, size))
