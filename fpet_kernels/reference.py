"""Pure-PyTorch reference of the FPET ops: the ground truth every backend is tested against.

Plain, readable PyTorch; gradients come from autograd. Section numbers refer to SPEC.md.
Shapes: ``B`` batch, ``N = P + H*W`` tokens (``P`` prefix tokens first, then the patch grid in
row-major order), ``C`` channels, ``Dh`` metric (head) dimension, ``NA = ceil(HW/2)`` A tokens,
``NB = P + floor(HW/2)`` B tokens.

Inputs may be float64, float32, bfloat16 or float16. Scores, matchings, merge sums and merged sizes are
kept in float32 (float64 for float64 inputs); merged tokens come back in the dtype of ``x``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "accumulation_dtype",
    "checkerboard_indices",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "merge_tokens",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32 (SPEC section 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=128)
def _checkerboard_indices_cpu(height: int, width: int, num_prefix_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached: must stay usable by autograd whatever mode the first call ran in
        return _build_checkerboard_indices(height, width, num_prefix_tokens)


def _build_checkerboard_indices(height: int, width: int, num_prefix_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    is_a = ((rows + cols) % 2 == 0).flatten()
    cells = torch.arange(height * width) + num_prefix_tokens
    idx_a = cells[is_a]
    idx_b = torch.cat([torch.arange(num_prefix_tokens), cells[~is_a]])
    return idx_a, idx_b


def checkerboard_indices(
    grid_size: Tuple[int, int], num_prefix_tokens: int, device: Union[torch.device, str, None] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the A set and the B set (SPEC section 2, step 3).

    Cell ``(r, c)`` of the ``H x W`` grid is an A cell when ``r + c`` is even. Returns int64 tensors
    ``idx_a [NA]`` (A cells, row-major) and ``idx_b [NB]`` (the ``P`` prefix tokens, then the B cells, row-major),
    both indexing the token axis of ``x [B, N, C]``.
    """
    height, width = grid_size
    idx_a, idx_b = _checkerboard_indices_cpu(int(height), int(width), int(num_prefix_tokens))
    return idx_a.to(device), idx_b.to(device)


def refine_keys(
    metric: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Key refinement adapter (SPEC section 2, step 2): ``m + scale * Up(Dropout(ReLU(Down(m))))``.

    Args:
        metric: ``[B, N, Dh]``.
        w_down: effective Down weight ``[d, Dh]`` (nn.Linear layout, already binarised if bits = 1).
        w_up: effective Up weight ``[Dh, d]``.
        scale, dropout_p, training: the adapter's scale and dropout; dropout is active only when ``training``.
    Returns:
        refined metric ``[B, N, Dh]``, dtype of ``metric``.
    """
    hidden = F.relu(F.linear(metric, w_down))
    hidden = F.dropout(hidden, p=dropout_p, training=training)
    return metric + scale * F.linear(hidden, w_up)


def checkerboard_similarity(
    metric: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Cosine similarity of every A token to every B token (SPEC section 2, step 4).

    Args:
        metric: ``[B, N, Dh]`` with ``N = P + H*W``.
    Returns:
        scores ``[B, NA, NB]`` in float32 (float64 for float64 input); the ``P`` prefix columns are ``-inf``.
    """
    acc = accumulation_dtype(metric.dtype)
    idx_a, idx_b = checkerboard_indices(grid_size, num_prefix_tokens, metric.device)
    m = metric.to(acc)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, idx_a] @ m[:, idx_b].transpose(1, 2)
    if num_prefix_tokens > 0:
        prefix = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        prefix[:num_prefix_tokens] = True
        scores = scores.masked_fill(prefix, float("-inf"))
    return scores


def ste_match(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Straight-through one-hot matching of each A row to its best B column (SPEC section 2, step 5).

    ``t = (top1 + top2) / 2`` per row, ``Soft = sigmoid(S - t)``, ``Hard`` the one-hot argmax (lowest column on
    ties), ``M = Soft + stopgrad(Hard - Soft)``.

    Args:
        scores: ``[B, NA, NB]`` from :func:`checkerboard_similarity` (prefix columns ``-inf``, at least one finite
            column per row).
    Returns:
        ``(matching [B, NA, NB], index [B, NA] int64)``: matching is exactly one-hot in value with the STE gradient;
        ``index`` is the matched B column ``k(i)``.
    """
    if scores.shape[-1] >= 2:
        top = scores.topk(2, dim=-1).values
        top1, top2 = top[..., :1], top[..., 1:]
        # A single B patch (the other columns are -inf prefix columns): top2 = top1, so that column
        # receives both halves of the threshold's gradient (SPEC section 3).
        top2 = torch.where(torch.isinf(top2), top1, top2)
    else:
        top1 = top2 = scores
    threshold = (top1 + top2) / 2
    soft = torch.sigmoid(scores - threshold)
    index = scores.argmax(dim=-1)
    hard = F.one_hot(index, scores.shape[-1]).to(soft.dtype)
    matching = soft + (hard - soft).detach()
    return matching, index


def scatter_mean_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    matching: torch.Tensor,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of every A token into its matched B token (SPEC section 2, step 6).

    ``Z_j = s_B[j] + sum_i M[i, j] s_A[i]``, ``x'_j = (s_B[j] x_B[j] + sum_i M[i, j] s_A[i] x_A[i]) / Z_j``.

    Args:
        x: ``[B, N, C]``.
        size: ``[B, N]`` token sizes, or ``None`` for all ones.
        matching: either the float matching ``[B, NA, NB]`` of :func:`ste_match` (gradients flow into it), or the
            int64 index ``[B, NA]`` of matched B columns (a scatter; no gradient to the matching).
    Returns:
        ``(x_merged [B, NB, C] in x.dtype, size_merged [B, NB] in float32, float64 for float64 x)``, B order.
    """
    acc = accumulation_dtype(x.dtype)
    idx_a, idx_b = checkerboard_indices(grid_size, num_prefix_tokens, x.device)
    xf = x.to(acc)
    if size is None:
        size = torch.ones(x.shape[:2], dtype=acc, device=x.device)
    size = size.to(acc)
    x_a, x_b = xf[:, idx_a], xf[:, idx_b]
    s_a, s_b = size[:, idx_a], size[:, idx_b]
    weighted_a = x_a * s_a.unsqueeze(-1)
    if matching.dtype == torch.int64:
        index = matching
        totals = (x_b * s_b.unsqueeze(-1)).scatter_add(1, index.unsqueeze(-1).expand_as(weighted_a), weighted_a)
        merged_size = s_b.scatter_add(1, index, s_a)
    else:
        m = matching.to(acc)
        totals = x_b * s_b.unsqueeze(-1) + m.transpose(1, 2) @ weighted_a
        merged_size = s_b + (m * s_a.unsqueeze(-1)).sum(dim=1)
    x_merged = totals / merged_size.unsqueeze(-1)
    return x_merged.to(x.dtype), merged_size


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarity + STE matching + size-weighted merge (SPEC section 2, steps 3-6).

    When no gradient is needed (grad mode off, or no input requires grad), takes the fast path: argmax of the
    scores and a scatter, with no matching matrix built. Both paths give the same forward values.

    Args:
        x: ``[B, N, C]`` tokens; metric: ``[B, N, Dh]`` refined keys; size: ``[B, N]`` or ``None``.
    Returns:
        ``(x_merged [B, NB, C], size_merged [B, NB])`` as in :func:`scatter_mean_merge`.
    """
    scores = checkerboard_similarity(metric, grid_size, num_prefix_tokens)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, metric, size)
    )
    if needs_grad:
        matching, _ = ste_match(scores)
    else:
        matching = scores.argmax(dim=-1)
    return scatter_mean_merge(x, size, matching, grid_size, num_prefix_tokens)
