"""ste_match: straight-through one-hot matching of each A row to its best B column (docs/design.md §2 step 5), and
its backward (docs/design.md §3). Each program holds whole rows of the score matrix on chip.

The forward writes only ``matching`` and ``index``; the backward recomputes the row's top-2 and threshold from the
scores row it loads anyway (:func:`row_top2`, :func:`ste_threshold`, shared with the similarity kernel), so nothing
but the scores is saved for it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import padded, wrap_triton


@triton.jit
def match_key(scores):
    """The ranking key of the matching: NaN counts as +inf (docs/design.md §2 step 5, "NaN")."""
    return tl.where(scores != scores, float("inf"), scores)


@triton.jit
def row_top2(scores, cols):
    """Per row of a float32 tile (``-inf`` where masked), ``cols`` its column offsets: ``(top1, index, second,
    top2)``, the largest value and its column, then the largest of the other columns and its column; ties go to the
    lowest column and NaN counts as +inf (docs/design.md §2 step 5). ``second`` is ``-inf`` when the row has a single
    finite column."""
    scores = match_key(scores)
    top1 = tl.max(scores, axis=1)
    index = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32)
    rest = tl.where(cols[None, :] == index[:, None], float("-inf"), scores)
    second = tl.max(rest, axis=1)
    top2 = tl.argmax(rest, axis=1, tie_break_left=True).to(tl.int32)
    return top1, index, second, top2


@triton.jit
def ste_threshold(top1, index, second, top2):
    """A row's final ``(top2 column, threshold = (top1 + top2) / 2)`` from its top-2: a single finite column (the
    rest are -inf prefix columns) makes top2 = top1 (docs/design.md §2 step 5)."""
    single = second == float("-inf")
    return tl.where(single, index, top2), (top1 + tl.where(single, top1, second)) / 2


@triton.jit
def ste_sigmoid_slope(scores, threshold):
    """``sigma'(S - t) = Soft (1 - Soft)`` in float32; 0 for -inf (prefix) scores and where ``S - t`` is NaN (a NaN
    score or threshold carries no STE gradient, docs/design.md §3)."""
    soft = 1.0 / (1.0 + tl.exp(threshold[:, None] - scores))
    slope = soft * (1.0 - soft)
    return tl.where(slope != slope, 0.0, slope)


@triton.jit
def ste_backward(grad_matching, slope, cols, index, top2):
    """``dL/dS = sigma' dL/dM - [j in top2] / 2 * sum_l sigma'_l dL/dM_l`` per row; a column that is both top1 and
    top2 gets both halves."""
    weighted = slope * grad_matching
    row_sum = tl.sum(weighted, axis=1)
    in_top2 = (cols[None, :] == index[:, None]).to(tl.float32) + (cols[None, :] == top2[:, None]).to(tl.float32)
    return weighted - 0.5 * row_sum[:, None] * in_top2


@triton.jit
def _ste_match_kernel(
    scores_ptr, matching_ptr, index_ptr,
    rows, NB, stride_sr, stride_sn,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """BLOCK_R rows of ``scores [rows, NB]`` -> one-hot ``matching`` (scores' dtype) and argmax ``index`` (int64,
    lowest column on ties)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rows
    cols = tl.arange(0, BLOCK_NB)
    mask = r_mask[:, None] & (cols < NB)[None, :]
    scores = tl.load(scores_ptr + offs_r[:, None].to(tl.int64) * stride_sr + cols[None, :] * stride_sn,
                     mask=mask, other=float("-inf")).to(tl.float32)
    index = tl.argmax(match_key(scores), axis=1, tie_break_left=True).to(tl.int32)
    # M = Soft + stopgrad(Hard - Soft) is exactly Hard in value (Soft >= 1/2 at the argmax, so 1 - Soft is exact).
    hard = tl.where(cols[None, :] == index[:, None], 1.0, 0.0).to(matching_ptr.dtype.element_ty)
    tl.store(matching_ptr + offs_r[:, None].to(tl.int64) * NB + cols[None, :], hard, mask=mask)
    tl.store(index_ptr + offs_r, index.to(tl.int64), mask=r_mask)


@triton.jit
def _ste_match_bwd_kernel(
    grad_matching_ptr, scores_ptr, grad_scores_ptr,
    rows, NB, stride_gr, stride_gn, stride_sr, stride_sn,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """BLOCK_R rows of ``dL/dM`` -> ``dL/dS`` (scores' dtype); the argmax, top2 and threshold are recomputed from the
    scores rows."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rows
    cols = tl.arange(0, BLOCK_NB)
    mask = r_mask[:, None] & (cols < NB)[None, :]
    rows64 = offs_r[:, None].to(tl.int64)
    scores = tl.load(scores_ptr + rows64 * stride_sr + cols[None, :] * stride_sn, mask=mask,
                     other=float("-inf")).to(tl.float32)
    top1, index, second, top2 = row_top2(scores, cols)
    top2, threshold = ste_threshold(top1, index, second, top2)
    threshold = tl.where(r_mask, threshold, 0.0)  # rows past the end: -inf, and -inf - -inf would be NaN
    slope = ste_sigmoid_slope(scores, threshold)
    grad_matching = tl.load(grad_matching_ptr + rows64 * stride_gr + cols[None, :] * stride_gn, mask=mask, other=0.0)
    grad = ste_backward(grad_matching.to(tl.float32), slope, cols, index, top2)
    tl.store(grad_scores_ptr + rows64 * NB + cols[None, :], grad.to(grad_scores_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(num_b: int) -> int:
    # Two [rows, NB] float32 tiles of at most 16 per thread (4 warps): spill-free on sm_80 / sm_90.
    return max(1, 2048 // padded(num_b))


def launch_ste_match(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores [B, NA, NB]`` -> ``(matching [B, NA, NB] in scores' dtype, index [B, NA] int64)``."""
    batch, num_a, num_b = scores.shape
    rows = scores.reshape(batch * num_a, num_b)
    matching = torch.empty(batch, num_a, num_b, dtype=scores.dtype, device=scores.device)
    index = torch.empty(batch, num_a, dtype=torch.int64, device=scores.device)
    block_r = _rows_per_program(num_b)
    wrap_triton(_ste_match_kernel)[(triton.cdiv(batch * num_a, block_r),)](
        rows, matching, index,
        batch * num_a, num_b, rows.stride(0), rows.stride(1),
        BLOCK_R=block_r, BLOCK_NB=padded(num_b), num_warps=4,
    )
    return matching, index


def launch_ste_match_backward(grad_matching: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(dL/dM, scores)``, both ``[B, NA, NB]`` -> ``dL/dS`` in scores' dtype."""
    batch, num_a, num_b = scores.shape
    rows = scores.reshape(batch * num_a, num_b)
    grad_rows = grad_matching.reshape(batch * num_a, num_b)
    grad_scores = torch.empty(batch, num_a, num_b, dtype=scores.dtype, device=scores.device)
    block_r = _rows_per_program(num_b)
    wrap_triton(_ste_match_bwd_kernel)[(triton.cdiv(batch * num_a, block_r),)](
        grad_rows, rows, grad_scores,
        batch * num_a, num_b, grad_rows.stride(0), grad_rows.stride(1), rows.stride(0), rows.stride(1),
        BLOCK_R=block_r, BLOCK_NB=padded(num_b), num_warps=4,
    )
    return grad_scores
