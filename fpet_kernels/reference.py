"""Pure-PyTorch reference of the FPET ops: the ground truth every backend is tested against.

Plain, readable PyTorch; gradients come from autograd. Section numbers refer to docs/design.md.
Shapes: ``B`` batch, ``N = P + H*W`` tokens (``P`` prefix tokens first, then the patch grid in
row-major order), ``C`` channels, ``Dh`` metric (head) dimension, ``NA = ceil(HW/2)`` A tokens,
``NB = P + floor(HW/2)`` B tokens.

Inputs may be float64, float32, bfloat16 or float16. Scores, matchings, merge sums and merged sizes are
kept in float32 (float64 for float64 inputs); merged tokens come back in the dtype of ``x``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .geometry import Checkerboard

__all__ = [
    "accumulation_dtype",
    "checkerboard_indices",
    "dropout_keep_mask",
    "refine_keys",
    "checkerboard_similarity",
    "match_key",
    "ste_match",
    "scatter_mean_merge",
    "scatter_mean_merge_dense",
    "merge_tokens",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32 (§4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checkerboard_indices(
    grid_size: Sequence[int], num_prefix_tokens: int, device: Union[torch.device, str, None] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 token indices ``idx_a [NA]`` and ``idx_b [NB]`` of the A and B sets (§2 step 3); see
    :meth:`fpet_kernels.geometry.Checkerboard.indices`."""
    return Checkerboard(int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens)).indices(device)


def dropout_keep_mask(shape: Sequence[int], dropout_p: float, device: Union[torch.device, str, None]) -> torch.Tensor:
    """The dropout keep mask of the refinement adapter's hidden layer: bool ``shape``, True with probability
    ``1 - dropout_p``, drawn from torch's generator (``torch.rand(shape) >= p``). Every backend draws it here, so
    all of them drop the same units for the same seed."""
    return torch.rand(tuple(shape), device=device) >= dropout_p


def dropout_keep(metric: torch.Tensor, w_down: torch.Tensor, dropout_p: float, training: bool) -> Optional[torch.Tensor]:
    """The keep mask ``[*metric.shape[:-1], d]`` when dropout is active (``training`` and ``dropout_p > 0``), else
    None."""
    if not (training and dropout_p > 0):
        return None
    return dropout_keep_mask((*metric.shape[:-1], w_down.shape[0]), dropout_p, metric.device)


def refine_keys(
    metric: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Key refinement adapter (§2 step 2): ``m + scale * Up(Dropout(ReLU(Down(m))))``.

    Args:
        metric: ``[B, N, Dh]``.
        w_down: effective Down weight ``[d, Dh]`` (nn.Linear layout, already binarised if bits = 1).
        w_up: effective Up weight ``[Dh, d]``.
        scale, dropout_p, training: the adapter's scale and dropout; dropout is active only when ``training``
            (hidden units kept by :func:`dropout_keep_mask`, scaled by ``1 / (1 - p)``).
    Returns:
        refined metric ``[B, N, Dh]``, dtype of ``metric``.
    """
    hidden = F.relu(F.linear(metric, w_down))
    keep = dropout_keep(metric, w_down, dropout_p, training)
    if keep is not None:
        hidden = hidden * keep * (1.0 / (1.0 - dropout_p))
    return metric + F.linear(hidden, w_up) * scale


def checkerboard_similarity(
    metric: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Cosine similarity of every A token to every B token (§2 step 4).

    Args:
        metric: ``[B, N, Dh]`` with ``N = P + H*W``.
    Returns:
        scores ``[B, NA, NB]`` in float32 (float64 for float64 input); the ``P`` prefix columns are ``-inf``.
    """
    acc = accumulation_dtype(metric.dtype)
    idx_a, idx_b = Checkerboard(int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens)).indices(metric.device)
    m = metric.to(acc)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, idx_a] @ m[:, idx_b].transpose(1, 2)
    if num_prefix_tokens > 0:
        prefix = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        prefix[:num_prefix_tokens] = True
        scores = scores.masked_fill(prefix, float("-inf"))
    return scores


def match_key(scores: torch.Tensor) -> torch.Tensor:
    """The ranking key of the matching (§2 step 5, "NaN"): the scores with NaN counted as +inf, so that a row with NaN
    scores merges into its first NaN (or +inf) column, in every backend, and never into a -inf prefix column."""
    return scores.masked_fill(scores.isnan(), float("inf"))


def ste_match(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Straight-through one-hot matching of each A row to its best B column (§2 step 5).

    ``t = (top1 + top2) / 2`` per row, ``Soft = sigmoid(S - t)``, ``Hard`` the one-hot argmax (lowest column on
    ties), ``M = Soft + stopgrad(Hard - Soft)``. The top-2 columns follow the same tie rule as the kernels' running
    top-2 (``Top2`` of ``csrc/fpet_math.h``): top1 is the argmax, top2 the lowest column holding the largest score
    of the other columns, so on an exact tie the threshold's gradient reaches the same two columns in every backend
    (``torch.topk`` leaves the order of equal values unspecified, and picks other columns than the argmax). A NaN
    score ranks as +inf (:func:`match_key`); where ``S - t`` is NaN, ``Soft`` is taken as 1/2 with no gradient, so
    ``M`` stays exactly one-hot and such entries carry no STE gradient (§3).

    Args:
        scores: ``[B, NA, NB]`` from :func:`checkerboard_similarity` (prefix columns ``-inf``, at least one finite
            column per row).
    Returns:
        ``(matching [B, NA, NB], index [B, NA] int64)``: matching is exactly one-hot in value with the STE gradient;
        ``index`` is the matched B column ``k(i)``.
    """
    key = match_key(scores.detach())
    first = key.argmax(dim=-1, keepdim=True)  # the lowest column on ties
    top1 = scores.gather(-1, first)
    if scores.shape[-1] >= 2:
        second = key.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        top2 = scores.gather(-1, second)
        # A single B patch (the other columns are -inf prefix columns): top2 = top1, so that column
        # receives both halves of the threshold's gradient (§3).
        top2 = torch.where(torch.isinf(top2), top1, top2)
    else:
        top2 = top1
    threshold = (top1 + top2) / 2
    z = scores - threshold
    soft = torch.sigmoid(torch.where(z.isnan(), torch.zeros_like(z), z))
    index = first.squeeze(-1)
    hard = F.one_hot(index, scores.shape[-1]).to(soft.dtype)
    matching = soft + (hard - soft).detach()
    return matching, index


def _merge_operands(x: torch.Tensor, size: Optional[torch.Tensor], grid: Checkerboard):
    """x_A, x_B, s_A, s_B in the accumulation dtype (sizes all ones when ``size`` is None)."""
    acc = accumulation_dtype(x.dtype)
    idx_a, idx_b = grid.indices(x.device)
    xf = x.to(acc)
    size = torch.ones(x.shape[:2], dtype=acc, device=x.device) if size is None else size.to(acc)
    return xf[:, idx_a], xf[:, idx_b], size[:, idx_a], size[:, idx_b]


def scatter_mean_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    index: torch.Tensor,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of every A token into its matched B token ``k(i)`` (§2 step 6), as a scatter.

    ``Z_j = s_B[j] + sum_{i: k(i)=j} s_A[i]``, ``x'_j = (s_B[j] x_B[j] + sum_{i: k(i)=j} s_A[i] x_A[i]) / Z_j``.

    Args:
        x: ``[B, N, C]``.
        size: ``[B, N]`` token sizes, or ``None`` for all ones.
        index: int64 ``[B, NA]``, the matched B column of every A token (no gradient flows into it).
    Returns:
        ``(x_merged [B, NB, C] in x.dtype, size_merged [B, NB] in float32, float64 for float64 x)``, B order.
    """
    grid = Checkerboard(int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens))
    x_a, x_b, s_a, s_b = _merge_operands(x, size, grid)
    weighted_a = x_a * s_a.unsqueeze(-1)
    totals = (x_b * s_b.unsqueeze(-1)).scatter_add(1, index.unsqueeze(-1).expand_as(weighted_a), weighted_a)
    merged_size = s_b.scatter_add(1, index, s_a)
    return (totals / merged_size.unsqueeze(-1)).to(x.dtype), merged_size


def scatter_mean_merge_dense(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    matching: torch.Tensor,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The merge of :func:`scatter_mean_merge` through a float matching ``M`` (§2 step 6):
    ``Z_j = s_B[j] + sum_i M[i, j] s_A[i]``, ``x'_j = (s_B[j] x_B[j] + sum_i M[i, j] s_A[i] x_A[i]) / Z_j``.

    Args:
        matching: float ``[B, NA, NB]``, e.g. the straight-through matching of :func:`ste_match` (gradients flow
            into it); any non-negative weights.
    Returns:
        as :func:`scatter_mean_merge`.
    """
    grid = Checkerboard(int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens))
    x_a, x_b, s_a, s_b = _merge_operands(x, size, grid)
    m = matching.to(x_a.dtype)
    totals = x_b * s_b.unsqueeze(-1) + m.transpose(1, 2) @ (x_a * s_a.unsqueeze(-1))
    merged_size = s_b + (m * s_a.unsqueeze(-1)).sum(dim=1)
    return (totals / merged_size.unsqueeze(-1)).to(x.dtype), merged_size


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarity + STE matching + size-weighted merge (§2, steps 3-6).

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
        return scatter_mean_merge_dense(x, size, ste_match(scores)[0], grid_size, num_prefix_tokens)
    return scatter_mean_merge(x, size, match_key(scores).argmax(dim=-1), grid_size, num_prefix_tokens)
