"""checkerboard_similarity: cosine scores of A vs B tokens with the row top-2 / argmax fused in (docs/design.md §2
steps 3-5), and the cosine backward (docs/design.md §3) shared with the fused merge_tokens backward.

Scores are computed in float32 whatever the input dtype: tl.dot with ``input_precision="tf32x3"`` (three TF32
tensor-core products, float32-level accuracy; plain float32 FMA dots spill registers at these tile sizes), so that
the argmax (which decides which tokens merge) agrees with the reference up to near-exact ties.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...geometry import Checkerboard
from ._common import a_token, autotune, b_token, padded, wrap_triton
from .match import row_top2, ste_threshold

_SIMILARITY_CONFIGS = [
    triton.Config({"BLOCK_A": 32, "BLOCK_B": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_A": 16, "BLOCK_B": 32}, num_warps=2, num_stages=2),
]


@triton.jit
def unit_rows(metric_ptr, tokens, row_mask, offs_d, head_dim, stride_n, stride_d):
    """Rows ``metric[tokens]`` divided by ``max(||row||, 1e-12)`` in float32 -> (unit rows, clamped norms)."""
    mask = row_mask[:, None] & (offs_d < head_dim)[None, :]
    rows = tl.load(metric_ptr + tokens[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    rows = rows.to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(rows * rows, axis=1)), 1e-12)
    return rows / norm[:, None], norm


@triton.jit
def _merge_top2(v1, i1, v2, i2, bv1, bi1, bv2, bi2):
    """Merge a running row top-2 (earlier, lower columns) with the top-2 of the next block; ties keep the lower
    column."""
    take_block = bv1 > v1
    new_v2 = tl.where(take_block, tl.where(bv2 > v1, bv2, v1), tl.where(bv1 > v2, bv1, v2))
    new_i2 = tl.where(take_block, tl.where(bv2 > v1, bi2, i1), tl.where(bv1 > v2, bi1, i2))
    new_v1 = tl.where(take_block, bv1, v1)
    new_i1 = tl.where(take_block, bi1, i1)
    return new_v1, new_i1, new_v2, new_i2


@autotune(_SIMILARITY_CONFIGS, key=["NA", "NB", "BLOCK_D"])
@triton.jit
def _checkerboard_similarity_kernel(
    metric_ptr, scores_ptr, index_ptr, top2_ptr, threshold_ptr,
    NA, NB, head_dim, width, num_prefix,
    stride_mb, stride_mn, stride_md,
    stride_sb, stride_sa, stride_sn,
    BLOCK_D: tl.constexpr, WRITE_SCORES: tl.constexpr, WRITE_MATCH: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: BLOCK_A rows of A against every B column, in blocks of BLOCK_B.

    WRITE_SCORES stores ``scores [B, NA, NB]`` (prefix columns -inf). WRITE_MATCH stores per A row the argmax
    ``index`` (int64, lowest column on ties), the second column ``top2`` (int32; = argmax when there is a single
    finite column) and ``threshold = (top1 + top2) / 2`` (docs/design.md §2 step 5), without keeping the score
    matrix.
    """
    pid_a = tl.program_id(0)
    batch = tl.program_id(1)
    metric_ptr += batch.to(tl.int64) * stride_mb
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = offs_a < NA
    offs_d = tl.arange(0, BLOCK_D)
    tokens_a = a_token(offs_a, width, num_prefix)
    unit_a = unit_rows(metric_ptr, tokens_a, a_mask, offs_d, head_dim, stride_mn, stride_md)[0]

    v1 = tl.full([BLOCK_A], float("-inf"), tl.float32)
    v2 = tl.full([BLOCK_A], float("-inf"), tl.float32)
    i1 = tl.zeros([BLOCK_A], tl.int32)
    i2 = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, NB, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        b_mask = offs_b < NB
        tokens_b = b_token(offs_b, width, num_prefix)
        unit_b = unit_rows(metric_ptr, tokens_b, b_mask, offs_d, head_dim, stride_mn, stride_md)[0]
        scores = tl.dot(unit_a, tl.trans(unit_b), input_precision="tf32x3")
        scores = tl.where((offs_b >= num_prefix)[None, :], scores, float("-inf"))
        if WRITE_SCORES:
            ptrs = scores_ptr + batch.to(tl.int64) * stride_sb + offs_a[:, None] * stride_sa
            tl.store(ptrs + offs_b[None, :] * stride_sn, scores, mask=a_mask[:, None] & b_mask[None, :])
        if WRITE_MATCH:
            scores = tl.where(b_mask[None, :], scores, float("-inf"))
            bv1, bi1, bv2, bi2 = row_top2(scores, tl.arange(0, BLOCK_B))
            v1, i1, v2, i2 = _merge_top2(v1, i1, v2, i2, bv1, bi1 + start, bv2, bi2 + start)
    if WRITE_MATCH:
        i2, threshold = ste_threshold(v1, i1, v2, i2)
        row = batch.to(tl.int64) * NA + offs_a
        tl.store(index_ptr + row, i1.to(tl.int64), mask=a_mask)
        tl.store(top2_ptr + row, i2, mask=a_mask)
        tl.store(threshold_ptr + row, threshold, mask=a_mask)


def _launch_similarity(
    metric: torch.Tensor, grid: Checkerboard,
    scores: Optional[torch.Tensor], match: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> None:
    """Fill ``scores [B, NA, NB]`` and/or ``match = (index int64, top2 int32, threshold float32)``, each ``[B, NA]``."""
    batch, _, head_dim = metric.shape
    index, top2, threshold = match if match is not None else (metric, metric, metric)
    dummy = scores if scores is not None else metric

    def programs(meta):
        return triton.cdiv(grid.num_a, meta["BLOCK_A"]), batch

    wrap_triton(_checkerboard_similarity_kernel)[programs](
        metric, dummy, index, top2, threshold,
        grid.num_a, grid.num_b, head_dim, grid.width, grid.prefix,
        metric.stride(0), metric.stride(1), metric.stride(2),
        dummy.stride(0), dummy.stride(1), dummy.stride(2),
        BLOCK_D=padded(head_dim), WRITE_SCORES=scores is not None, WRITE_MATCH=match is not None,
    )


def launch_checkerboard_similarity(metric: torch.Tensor, grid: Checkerboard) -> torch.Tensor:
    """``metric [B, N, Dh]`` -> ``scores [B, NA, NB]`` float32 (prefix columns -inf)."""
    scores = torch.empty(metric.shape[0], grid.num_a, grid.num_b, dtype=torch.float32, device=metric.device)
    _launch_similarity(metric, grid, scores, None)
    return scores


def launch_match(metric: torch.Tensor, grid: Checkerboard) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``metric [B, N, Dh]`` -> the row matching state ``(index int64, top2 int32, threshold float32)``, each
    ``[B, NA]``, without the score matrix (the WRITE_MATCH launch). The merge_tokens forward runs it, and its
    backward runs it again rather than saving the three tensors: same kernel, same inputs, same values."""
    batch = metric.shape[0]
    index = torch.empty(batch, grid.num_a, dtype=torch.int64, device=metric.device)
    top2 = torch.empty(batch, grid.num_a, dtype=torch.int32, device=metric.device)
    threshold = torch.empty(batch, grid.num_a, dtype=torch.float32, device=metric.device)
    _launch_similarity(metric, grid, None, (index, top2, threshold))
    return index, top2, threshold


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def store_grad_a(grad_unit_a, unit_a, norm_a, tokens_a, a_mask, offs_d, head_dim, grad_metric_ptr,
                 stride_gn, stride_gd):
    """``dL/dm_A = (dm^_A - m^_A <m^_A, dm^_A>) / max(||m_A||, 1e-12)`` for a block of A rows, given
    ``dm^_A = dS m^_B`` (``grad_metric_ptr`` already points at this batch element)."""
    radial = tl.sum(unit_a * grad_unit_a, axis=1)
    grad_a = (grad_unit_a - unit_a * radial[:, None]) / norm_a[:, None]
    tl.store(
        grad_metric_ptr + tokens_a[:, None] * stride_gn + offs_d[None, :] * stride_gd,
        grad_a.to(grad_metric_ptr.dtype.element_ty), mask=a_mask[:, None] & (offs_d < head_dim)[None, :],
    )


@triton.jit
def _checkerboard_similarity_bwd_kernel(
    grad_scores_ptr, metric_ptr, grad_metric_ptr, partial_ptr,
    NA, NB, head_dim, width, num_prefix, num_a_blocks,
    stride_sb, stride_sa, stride_sn,
    stride_mb, stride_mn, stride_md,
    stride_gb, stride_gn, stride_gd,
    BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: BLOCK_A rows of ``dL/dS``, all B columns in blocks of BLOCK_B (prefix columns ignored) -> cosine
    backward (docs/design.md §3): ``dL/dm`` of the A tokens, and this block's share of ``dL/dm^_B = dS^T m^_A`` to
    ``partial [B, num_a_blocks, NB, BLOCK_D]`` (summed in a fixed order by ``_cosine_backward_b_kernel``). The dots
    run over B column blocks so that no ``[BLOCK_A, NB]`` tile (nor a whole-NB dot operand) is held in registers."""
    pid_a = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = offs_a < NA
    offs_d = tl.arange(0, BLOCK_D)
    metric_ptr += batch * stride_mb
    tokens_a = a_token(offs_a, width, num_prefix)
    grad_unit_a = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)
    block = (batch * num_a_blocks + pid_a) * NB
    for start in range(0, NB, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        b_mask = offs_b < NB
        keep = a_mask[:, None] & b_mask[None, :] & (offs_b >= num_prefix)[None, :]
        grad_scores = tl.load(grad_scores_ptr + batch * stride_sb + offs_a[:, None] * stride_sa
                              + offs_b[None, :] * stride_sn, mask=keep, other=0.0).to(tl.float32)
        unit_b = unit_rows(metric_ptr, b_token(offs_b, width, num_prefix), b_mask, offs_d, head_dim,
                           stride_mn, stride_md)[0]
        grad_unit_a += tl.dot(grad_scores, unit_b, input_precision="tf32x3")
        unit_a = unit_rows(metric_ptr, tokens_a, a_mask, offs_d, head_dim, stride_mn, stride_md)[0]  # reloaded
        grad_unit_b = tl.dot(tl.trans(grad_scores), unit_a, input_precision="tf32x3")
        tl.store(partial_ptr + (block + offs_b[:, None]) * BLOCK_D + offs_d[None, :], grad_unit_b,
                 mask=b_mask[:, None])
    unit_a, norm_a = unit_rows(metric_ptr, tokens_a, a_mask, offs_d, head_dim, stride_mn, stride_md)
    store_grad_a(grad_unit_a, unit_a, norm_a, tokens_a, a_mask, offs_d, head_dim, grad_metric_ptr + batch * stride_gb,
                 stride_gn, stride_gd)


@triton.jit
def _cosine_backward_b_kernel(
    partial_ptr, metric_ptr, grad_metric_ptr,
    NB, head_dim, width, num_prefix, num_a_blocks,
    stride_mb, stride_mn, stride_md,
    stride_gb, stride_gn, stride_gd,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dL/dm`` of the B tokens: sum the per-A-block partials of ``dL/dm^_B`` in block order (deterministic), then
    ``dm = (dm^ - m^ <m^, dm^>) / max(||m||, 1e-12)``. Prefix tokens get 0 (their scores are constant -inf)."""
    pid_j = tl.program_id(0)
    batch = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < NB
    offs_d = tl.arange(0, BLOCK_D)
    grad_unit = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for block in range(0, num_a_blocks):
        rows = (batch.to(tl.int64) * num_a_blocks + block) * NB + offs_j
        grad_unit += tl.load(partial_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=j_mask[:, None], other=0.0)
    tokens = b_token(offs_j, width, num_prefix)
    metric_ptr += batch.to(tl.int64) * stride_mb
    unit, norm = unit_rows(metric_ptr, tokens, j_mask, offs_d, head_dim, stride_mn, stride_md)
    radial = tl.sum(unit * grad_unit, axis=1)
    grad = (grad_unit - unit * radial[:, None]) / norm[:, None]
    ptrs = grad_metric_ptr + batch.to(tl.int64) * stride_gb + tokens[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(ptrs, grad.to(grad_metric_ptr.dtype.element_ty), mask=j_mask[:, None] & (offs_d < head_dim)[None, :])


def a_block_rows(num_b: int) -> int:
    """A rows per backward program (the B columns are walked in blocks, so this does not depend on NB)."""
    return 32


# B columns per step of the backward kernels' column loop. Every config is spill-free on sm_80 and sm_90 at ViT
# shapes (see fpet_kernels.tools.gpu_report).
BACKWARD_BLOCK_B = 32


def launch_cosine_backward_b(metric: torch.Tensor, grad_metric: torch.Tensor, partial: torch.Tensor,
                             grid: Checkerboard) -> None:
    batch, _, head_dim = metric.shape
    _, num_a_blocks, num_b, block_d = partial.shape
    block_j = 32
    wrap_triton(_cosine_backward_b_kernel)[(triton.cdiv(num_b, block_j), batch)](
        partial, metric, grad_metric,
        num_b, head_dim, grid.width, grid.prefix, num_a_blocks,
        metric.stride(0), metric.stride(1), metric.stride(2),
        grad_metric.stride(0), grad_metric.stride(1), grad_metric.stride(2),
        BLOCK_J=block_j, BLOCK_D=block_d, num_warps=4,
    )


def launch_checkerboard_similarity_backward(
    grad_scores: torch.Tensor, metric: torch.Tensor, grid: Checkerboard
) -> torch.Tensor:
    """``dL/dS [B, NA, NB]`` -> ``dL/dmetric [B, N, Dh]`` in metric's dtype."""
    batch, _, head_dim = metric.shape
    num_a, num_b = grid.num_a, grid.num_b
    block_a, block_d = a_block_rows(num_b), padded(head_dim)
    num_a_blocks = triton.cdiv(num_a, block_a)
    grad_metric = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    partial = torch.empty(batch, num_a_blocks, num_b, block_d, dtype=torch.float32, device=metric.device)
    wrap_triton(_checkerboard_similarity_bwd_kernel)[(num_a_blocks, batch)](
        grad_scores, metric, grad_metric, partial,
        num_a, num_b, head_dim, grid.width, grid.prefix, num_a_blocks,
        grad_scores.stride(0), grad_scores.stride(1), grad_scores.stride(2),
        metric.stride(0), metric.stride(1), metric.stride(2),
        grad_metric.stride(0), grad_metric.stride(1), grad_metric.stride(2),
        BLOCK_A=block_a, BLOCK_D=block_d, BLOCK_B=BACKWARD_BLOCK_B, num_warps=8,
    )
    launch_cosine_backward_b(metric, grad_metric, partial, grid)
    return grad_metric
