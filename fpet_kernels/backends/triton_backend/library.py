"""The Triton backend's ops, registered with ``torch.library.triton_op`` (so torch.compile traces into the kernels
and fake tensors flow through the launchers) with their autograd (``register_autograd``), and the five public
functions with the reference's signatures (SPEC section 4).

Op namespace ``fpet_triton``; each ``*_backward`` op is itself a triton_op, so compiled backward graphs see it too.
Saved state: merge_tokens keeps per A row only the argmax, the second column and the threshold (no score matrix);
its backward recomputes the scores block by block.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.library import register_autograd, triton_op

from ._common import check_dtype
from .match import launch_ste_match, launch_ste_match_backward
from .merge import (
    launch_inverse_index,
    launch_merge_tokens_backward,
    launch_scatter_mean_merge,
    launch_scatter_mean_merge_backward,
    launch_scatter_mean_merge_dense,
    launch_scatter_mean_merge_dense_backward,
)
from .refine import keep_mask, launch_refine_keys, launch_refine_keys_backward
from .similarity import launch_checkerboard_similarity, launch_checkerboard_similarity_backward, num_ab

_NS = "fpet_triton"


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for an absent gradient in an op's output (ops return tensors, never None)."""
    return like.new_empty(0)


def _or_none(t: torch.Tensor) -> Optional[torch.Tensor]:
    return t if t.numel() else None


# ---------------------------------------------------------------------------------------------- refine_keys
@triton_op(f"{_NS}::refine_keys", mutates_args={})
def _refine_keys_op(
    metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, keep: Optional[torch.Tensor],
    scale: float, dropout_p: float, store_hidden: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_refine_keys(metric, w_down, w_up, scale, dropout_p, keep, store_hidden)


@triton_op(f"{_NS}::refine_keys_backward", mutates_args={})
def _refine_keys_backward_op(
    grad_out: torch.Tensor, metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, hidden: torch.Tensor,
    keep: Optional[torch.Tensor], scale: float, dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_refine_keys_backward(grad_out, metric, w_down, w_up, hidden, scale, dropout_p, keep)


def _refine_keys_setup(ctx, inputs, output) -> None:
    metric, w_down, w_up, keep, scale, dropout_p, _ = inputs
    ctx.save_for_backward(metric, w_down, w_up, keep, output[1])
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _refine_keys_backward(ctx, grad_out, _grad_hidden):
    metric, w_down, w_up, keep, hidden = ctx.saved_tensors
    grads = torch.ops.fpet_triton.refine_keys_backward(grad_out, metric, w_down, w_up, hidden, keep,
                                                      ctx.scale, ctx.dropout_p)
    return grads[0], grads[1], grads[2], None, None, None, None


register_autograd(f"{_NS}::refine_keys", _refine_keys_backward, setup_context=_refine_keys_setup)


# ---------------------------------------------------------------------------------- checkerboard_similarity
@triton_op(f"{_NS}::checkerboard_similarity", mutates_args={})
def _checkerboard_similarity_op(metric: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> torch.Tensor:
    num_a, num_b = num_ab((height, width), num_prefix_tokens)
    scores = torch.empty(metric.shape[0], num_a, num_b, dtype=torch.float32, device=metric.device)
    launch_checkerboard_similarity(metric, width, num_a, num_b, num_prefix_tokens, scores, None)
    return scores


@triton_op(f"{_NS}::checkerboard_similarity_backward", mutates_args={})
def _checkerboard_similarity_backward_op(
    grad_scores: torch.Tensor, metric: torch.Tensor, width: int, num_prefix_tokens: int
) -> torch.Tensor:
    return launch_checkerboard_similarity_backward(grad_scores, metric, width, num_prefix_tokens)


def _similarity_setup(ctx, inputs, output) -> None:
    metric, _, width, num_prefix_tokens = inputs
    ctx.save_for_backward(metric)
    ctx.width, ctx.num_prefix_tokens = width, num_prefix_tokens


def _similarity_backward(ctx, grad_scores):
    (metric,) = ctx.saved_tensors
    grad = torch.ops.fpet_triton.checkerboard_similarity_backward(grad_scores, metric, ctx.width, ctx.num_prefix_tokens)
    return grad, None, None, None


register_autograd(f"{_NS}::checkerboard_similarity", _similarity_backward, setup_context=_similarity_setup)


# ---------------------------------------------------------------------------------------------- ste_match
@triton_op(f"{_NS}::ste_match", mutates_args={})
def _ste_match_op(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_ste_match(scores)


@triton_op(f"{_NS}::ste_match_backward", mutates_args={})
def _ste_match_backward_op(
    grad_matching: torch.Tensor, scores: torch.Tensor, index: torch.Tensor, top2: torch.Tensor,
    threshold: torch.Tensor,
) -> torch.Tensor:
    return launch_ste_match_backward(grad_matching, scores, index, top2, threshold)


def _ste_match_setup(ctx, inputs, output) -> None:
    _, index, top2, threshold = output
    ctx.save_for_backward(inputs[0], index, top2, threshold)


def _ste_match_backward(ctx, grad_matching, *_unused):
    return torch.ops.fpet_triton.ste_match_backward(grad_matching, *ctx.saved_tensors)


register_autograd(f"{_NS}::ste_match", _ste_match_backward, setup_context=_ste_match_setup)


# --------------------------------------------------------------------------------------- scatter_mean_merge
@triton_op(f"{_NS}::scatter_mean_merge_index", mutates_args={})
def _scatter_mean_merge_index_op(
    x: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor, width: int, num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    num_b = num_prefix_tokens + (x.shape[1] - num_prefix_tokens) // 2
    order, offsets = launch_inverse_index(index, num_b)
    return launch_scatter_mean_merge(x, size, order, offsets, width, num_prefix_tokens)


@triton_op(f"{_NS}::scatter_mean_merge_index_backward", mutates_args={})
def _scatter_mean_merge_index_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, size: Optional[torch.Tensor],
    index: torch.Tensor, merged: torch.Tensor, merged_size: torch.Tensor, width: int, num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_in_size = launch_scatter_mean_merge_backward(
        x, size, index, merged, merged_size, grad_merged, grad_size, width, num_prefix_tokens)
    return grad_x, grad_in_size if grad_in_size is not None else _empty(x)


def _merge_index_setup(ctx, inputs, output) -> None:
    x, size, index, width, num_prefix_tokens = inputs
    ctx.save_for_backward(x, size, index, *output)
    ctx.width, ctx.num_prefix_tokens = width, num_prefix_tokens


def _merge_index_backward(ctx, grad_merged, grad_size):
    grad_x, grad_in_size = torch.ops.fpet_triton.scatter_mean_merge_index_backward(
        grad_merged, grad_size, *ctx.saved_tensors, ctx.width, ctx.num_prefix_tokens)
    return grad_x, _or_none(grad_in_size), None, None, None


register_autograd(f"{_NS}::scatter_mean_merge_index", _merge_index_backward, setup_context=_merge_index_setup)


@triton_op(f"{_NS}::scatter_mean_merge_dense", mutates_args={})
def _scatter_mean_merge_dense_op(
    x: torch.Tensor, size: Optional[torch.Tensor], matching: torch.Tensor, width: int, num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_scatter_mean_merge_dense(x, size, matching, width, num_prefix_tokens)


@triton_op(f"{_NS}::scatter_mean_merge_dense_backward", mutates_args={})
def _scatter_mean_merge_dense_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, size: Optional[torch.Tensor],
    matching: torch.Tensor, merged: torch.Tensor, merged_size: torch.Tensor, width: int, num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_in_size, grad_matching = launch_scatter_mean_merge_dense_backward(
        x, size, matching, merged, merged_size, grad_merged, grad_size, width, num_prefix_tokens)
    return grad_x, grad_in_size if grad_in_size is not None else _empty(x), grad_matching


def _merge_dense_backward(ctx, grad_merged, grad_size):
    grad_x, grad_in_size, grad_matching = torch.ops.fpet_triton.scatter_mean_merge_dense_backward(
        grad_merged, grad_size, *ctx.saved_tensors, ctx.width, ctx.num_prefix_tokens)
    return grad_x, _or_none(grad_in_size), grad_matching, None, None


register_autograd(f"{_NS}::scatter_mean_merge_dense", _merge_dense_backward, setup_context=_merge_index_setup)


# ---------------------------------------------------------------------------------------------- merge_tokens
@triton_op(f"{_NS}::merge_tokens", mutates_args={})
def _merge_tokens_op(
    x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(merged, merged_size, index, top2, threshold)``; the last three are the backward's saved state."""
    batch = x.shape[0]
    num_a, num_b = num_ab((height, width), num_prefix_tokens)
    index = torch.empty(batch, num_a, dtype=torch.int64, device=x.device)
    top2 = torch.empty(batch, num_a, dtype=torch.int32, device=x.device)
    threshold = torch.empty(batch, num_a, dtype=torch.float32, device=x.device)
    launch_checkerboard_similarity(metric, width, num_a, num_b, num_prefix_tokens, None, (index, top2, threshold))
    order, offsets = launch_inverse_index(index, num_b)
    merged, merged_size = launch_scatter_mean_merge(x, size, order, offsets, width, num_prefix_tokens)
    return merged, merged_size, index, top2, threshold


@triton_op(f"{_NS}::merge_tokens_backward", mutates_args={})
def _merge_tokens_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, metric: torch.Tensor,
    size: Optional[torch.Tensor], merged: torch.Tensor, merged_size: torch.Tensor, index: torch.Tensor,
    top2: torch.Tensor, threshold: torch.Tensor, width: int, num_prefix_tokens: int, metric_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_metric, grad_in_size = launch_merge_tokens_backward(
        x, metric, size, merged, merged_size, index, top2, threshold, grad_merged, grad_size,
        width, num_prefix_tokens, metric_grad)
    return (grad_x, grad_metric if grad_metric is not None else _empty(x),
            grad_in_size if grad_in_size is not None else _empty(x))


def _merge_tokens_setup(ctx, inputs, output) -> None:
    x, metric, size, _, width, num_prefix_tokens = inputs
    ctx.save_for_backward(x, metric, size, *output)
    ctx.width, ctx.num_prefix_tokens = width, num_prefix_tokens


def _merge_tokens_backward(ctx, grad_merged, grad_size, *_unused):
    grad_x, grad_metric, grad_in_size = torch.ops.fpet_triton.merge_tokens_backward(
        grad_merged, grad_size, *ctx.saved_tensors, ctx.width, ctx.num_prefix_tokens, ctx.needs_input_grad[1])
    return grad_x, _or_none(grad_metric), _or_none(grad_in_size), None, None, None


register_autograd(f"{_NS}::merge_tokens", _merge_tokens_backward, setup_context=_merge_tokens_setup)


# ---------------------------------------------------------------------------------------------- public API
def _grid(grid_size: Sequence[int]) -> Tuple[int, int]:
    return int(grid_size[0]), int(grid_size[1])


def refine_keys(metric, w_down, w_up, scale: float = 1.0, dropout_p: float = 0.0, training: bool = False):
    """``m + scale * Up(Dropout(ReLU(Down(m))))``: metric ``[B, N, Dh]``, w_down ``[d, Dh]``, w_up ``[Dh, d]``.
    Dropout (``training`` and ``dropout_p > 0``) uses a keep mask drawn from torch's generator."""
    for name, t in (("metric", metric), ("w_down", w_down), ("w_up", w_up)):
        check_dtype(name, t)
    dropout = training and dropout_p > 0
    keep = keep_mask(metric.numel() // metric.shape[-1], w_down.shape[0], dropout_p, metric.device) if dropout else None
    store_hidden = torch.is_grad_enabled() and any(t.requires_grad for t in (metric, w_down, w_up))
    refined, _ = torch.ops.fpet_triton.refine_keys(metric, w_down, w_up, keep, float(scale),
                                                   float(dropout_p) if dropout else 0.0, store_hidden)
    return refined


def checkerboard_similarity(metric, grid_size, num_prefix_tokens):
    """metric ``[B, N, Dh]`` -> scores ``[B, NA, NB]`` float32, prefix columns ``-inf``."""
    check_dtype("metric", metric)
    height, width = _grid(grid_size)
    return torch.ops.fpet_triton.checkerboard_similarity(metric, height, width, int(num_prefix_tokens))


def ste_match(scores):
    """scores ``[B, NA, NB]`` -> ``(matching [B, NA, NB] one-hot in value with the STE gradient, index [B, NA])``."""
    check_dtype("scores", scores)
    matching, index, _, _ = torch.ops.fpet_triton.ste_match(scores)
    return matching, index


def scatter_mean_merge(x, size, matching, grid_size, num_prefix_tokens):
    """x ``[B, N, C]``, size ``[B, N]`` or None, matching ``[B, NA, NB]`` float or index ``[B, NA]`` int64
    -> ``(x' [B, NB, C] in x.dtype, size' [B, NB] float32)``."""
    check_dtype("x", x)
    if size is not None:
        check_dtype("size", size)
    _, width = _grid(grid_size)
    if matching.dtype == torch.int64:
        return torch.ops.fpet_triton.scatter_mean_merge_index(x, size, matching, width, int(num_prefix_tokens))
    check_dtype("matching", matching)
    return torch.ops.fpet_triton.scatter_mean_merge_dense(x, size, matching, width, int(num_prefix_tokens))


def merge_tokens(x, metric, size=None, *, grid_size, num_prefix_tokens):
    """Similarity + STE match + merge as one op with a fused backward: x ``[B, N, C]``, metric ``[B, N, Dh]``, size
    ``[B, N]`` or None -> ``(x' [B, NB, C], size' [B, NB] float32)``. The forward never builds the score or
    matching matrix (argmax + scatter), so with grad off or no input requiring grad it is the fast path as is."""
    check_dtype("x", x)
    check_dtype("metric", metric)
    if size is not None:
        check_dtype("size", size)
    height, width = _grid(grid_size)
    merged, merged_size, _, _, _ = torch.ops.fpet_triton.merge_tokens(x, metric, size, height, width,
                                                                     int(num_prefix_tokens))
    return merged, merged_size
