"""The Triton backend's ops, registered with ``torch.library.triton_op`` (so torch.compile traces into the kernels
and fake tensors flow through the launchers) with their autograd (``register_autograd``) (docs/design.md §4).

Op namespace ``fpet_triton``; the forward schemas are exactly those of the ``fpet`` ops of the C++ backend, outputs
included: no saved state is returned. What a backward needs beyond the op's inputs and outputs it recomputes:
refine_keys the hidden activation (from metric and W_down), ste_match each row's argmax, second column and threshold
(from the scores row), merge_tokens the same three per A row (one WRITE_MATCH launch of the similarity kernel). Each
``<op>_backward`` op is private to this backend and itself a triton_op, so compiled backward graphs see it too.

No ``from __future__ import annotations`` here: torch 2.6's schema inference evaluates string annotations in its own
namespace, where ``Tuple`` is not defined.
"""
from typing import Optional, Tuple

import torch
from torch.library import register_autograd, triton_op

from ...geometry import Checkerboard
from .match import launch_ste_match, launch_ste_match_backward
from .merge import (
    launch_merge_tokens,
    launch_merge_tokens_backward,
    launch_scatter_mean_merge,
    launch_scatter_mean_merge_backward,
    launch_scatter_mean_merge_dense,
    launch_scatter_mean_merge_dense_backward,
)
from .refine import launch_refine_keys, launch_refine_keys_backward
from .similarity import launch_checkerboard_similarity, launch_checkerboard_similarity_backward

NAMESPACE = "fpet_triton"
# The forward schemas, word for word those of the C++ backend's fpet ops (the backward ops' schemas are inferred).
# torch <= 2.11's triton_op ignores the schema it is given and infers one, with SymInt for each int argument.
SCHEMAS = {
    "refine_keys": "(Tensor metric, Tensor w_down, Tensor w_up, Tensor? keep, float scale, float dropout_p) -> Tensor",
    "checkerboard_similarity": "(Tensor metric, int height, int width, int num_prefix_tokens) -> Tensor",
    "ste_match": "(Tensor scores) -> (Tensor, Tensor)",
    "scatter_mean_merge": "(Tensor x, Tensor? size, Tensor index, int height, int width, int num_prefix_tokens)"
                          " -> (Tensor, Tensor)",
    "scatter_mean_merge_dense": "(Tensor x, Tensor? size, Tensor matching, int height, int width,"
                                " int num_prefix_tokens) -> (Tensor, Tensor)",
    "merge_tokens": "(Tensor x, Tensor metric, Tensor? size, int height, int width, int num_prefix_tokens)"
                    " -> (Tensor, Tensor)",
}
OPS = tuple(SCHEMAS)


def _forward_op(name: str):
    """``triton_op`` decorator registering ``fpet_triton::<name>`` with its schema from :data:`SCHEMAS`."""
    return triton_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=SCHEMAS[name])


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for an absent gradient in an op's output (ops return tensors, never None)."""
    return like.new_empty(0)


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else _empty(like)


def _or_none(t: torch.Tensor, present: bool) -> Optional[torch.Tensor]:
    """The gradient of an input that ``present`` says exists (a size given, a metric that needs one), else None.
    Never read off ``t.numel()``: an empty batch (B = 0) has real, empty gradients."""
    return t if present else None


# ---------------------------------------------------------------------------------------------- refine_keys
@_forward_op("refine_keys")
def _refine_keys_op(
    metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, keep: Optional[torch.Tensor],
    scale: float, dropout_p: float,
) -> torch.Tensor:
    return launch_refine_keys(metric, w_down, w_up, keep, scale, dropout_p)


@triton_op(f"{NAMESPACE}::refine_keys_backward", mutates_args=())
def _refine_keys_backward_op(
    grad_out: torch.Tensor, metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
    keep: Optional[torch.Tensor], scale: float, dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_refine_keys_backward(grad_out, metric, w_down, w_up, keep, scale, dropout_p)


def _refine_keys_setup(ctx, inputs, output) -> None:
    metric, w_down, w_up, keep, scale, dropout_p = inputs
    ctx.save_for_backward(metric, w_down, w_up, keep)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _refine_keys_backward(ctx, grad_out):
    grads = torch.ops.fpet_triton.refine_keys_backward(grad_out, *ctx.saved_tensors, ctx.scale, ctx.dropout_p)
    return grads[0], grads[1], grads[2], None, None, None


register_autograd(f"{NAMESPACE}::refine_keys", _refine_keys_backward, setup_context=_refine_keys_setup)


# ---------------------------------------------------------------------------------- checkerboard_similarity
@_forward_op("checkerboard_similarity")
def _checkerboard_similarity_op(metric: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> torch.Tensor:
    return launch_checkerboard_similarity(metric, Checkerboard(height, width, num_prefix_tokens))


@triton_op(f"{NAMESPACE}::checkerboard_similarity_backward", mutates_args=())
def _checkerboard_similarity_backward_op(
    grad_scores: torch.Tensor, metric: torch.Tensor, height: int, width: int, num_prefix_tokens: int
) -> torch.Tensor:
    return launch_checkerboard_similarity_backward(grad_scores, metric, Checkerboard(height, width, num_prefix_tokens))


def _similarity_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.grid = inputs[1:]


def _similarity_backward(ctx, grad_scores):
    (metric,) = ctx.saved_tensors
    grad = torch.ops.fpet_triton.checkerboard_similarity_backward(grad_scores, metric, *ctx.grid)
    return grad, None, None, None


register_autograd(f"{NAMESPACE}::checkerboard_similarity", _similarity_backward, setup_context=_similarity_setup)


# ---------------------------------------------------------------------------------------------- ste_match
@_forward_op("ste_match")
def _ste_match_op(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_ste_match(scores)


@triton_op(f"{NAMESPACE}::ste_match_backward", mutates_args=())
def _ste_match_backward_op(grad_matching: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return launch_ste_match_backward(grad_matching, scores)


def _ste_match_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _ste_match_backward(ctx, grad_matching, _grad_index):
    (scores,) = ctx.saved_tensors
    return torch.ops.fpet_triton.ste_match_backward(grad_matching, scores)


register_autograd(f"{NAMESPACE}::ste_match", _ste_match_backward, setup_context=_ste_match_setup)


# ------------------------------------------------------------------ scatter_mean_merge(_dense) and merge_tokens
def _merge_setup(ctx, inputs, output) -> None:
    """The three merges alike: save the three tensor inputs and both outputs, keep ``(height, width, P)``."""
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.grid = inputs[3:]


@_forward_op("scatter_mean_merge")
def _scatter_mean_merge_op(
    x: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor, height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_scatter_mean_merge(x, size, index, Checkerboard(height, width, num_prefix_tokens))


@triton_op(f"{NAMESPACE}::scatter_mean_merge_backward", mutates_args=())
def _scatter_mean_merge_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, size: Optional[torch.Tensor],
    index: torch.Tensor, merged: torch.Tensor, merged_size: torch.Tensor, height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_in_size = launch_scatter_mean_merge_backward(
        x, size, index, merged, merged_size, grad_merged, grad_size, Checkerboard(height, width, num_prefix_tokens))
    return grad_x, _or_empty(grad_in_size, x)


def _scatter_mean_merge_backward(ctx, grad_merged, grad_size):
    saved = ctx.saved_tensors
    grad_x, grad_in_size = torch.ops.fpet_triton.scatter_mean_merge_backward(grad_merged, grad_size, *saved, *ctx.grid)
    return grad_x, _or_none(grad_in_size, saved[1] is not None), None, None, None, None


register_autograd(f"{NAMESPACE}::scatter_mean_merge", _scatter_mean_merge_backward, setup_context=_merge_setup)


@_forward_op("scatter_mean_merge_dense")
def _scatter_mean_merge_dense_op(
    x: torch.Tensor, size: Optional[torch.Tensor], matching: torch.Tensor, height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_scatter_mean_merge_dense(x, size, matching, Checkerboard(height, width, num_prefix_tokens))


@triton_op(f"{NAMESPACE}::scatter_mean_merge_dense_backward", mutates_args=())
def _scatter_mean_merge_dense_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, size: Optional[torch.Tensor],
    matching: torch.Tensor, merged: torch.Tensor, merged_size: torch.Tensor, height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_in_size, grad_matching = launch_scatter_mean_merge_dense_backward(
        x, size, matching, merged, merged_size, grad_merged, grad_size, Checkerboard(height, width, num_prefix_tokens))
    return grad_x, _or_empty(grad_in_size, x), grad_matching


def _scatter_mean_merge_dense_backward(ctx, grad_merged, grad_size):
    saved = ctx.saved_tensors
    grad_x, grad_in_size, grad_matching = torch.ops.fpet_triton.scatter_mean_merge_dense_backward(
        grad_merged, grad_size, *saved, *ctx.grid)
    return grad_x, _or_none(grad_in_size, saved[1] is not None), grad_matching, None, None, None


register_autograd(f"{NAMESPACE}::scatter_mean_merge_dense", _scatter_mean_merge_dense_backward,
                  setup_context=_merge_setup)


@_forward_op("merge_tokens")
def _merge_tokens_op(
    x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], height: int, width: int,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_merge_tokens(x, metric, size, Checkerboard(height, width, num_prefix_tokens))


@triton_op(f"{NAMESPACE}::merge_tokens_backward", mutates_args=())
def _merge_tokens_backward_op(
    grad_merged: torch.Tensor, grad_size: Optional[torch.Tensor], x: torch.Tensor, metric: torch.Tensor,
    size: Optional[torch.Tensor], merged: torch.Tensor, merged_size: torch.Tensor, height: int, width: int,
    num_prefix_tokens: int, metric_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_metric, grad_in_size = launch_merge_tokens_backward(
        x, metric, size, merged, merged_size, grad_merged, grad_size, Checkerboard(height, width, num_prefix_tokens),
        metric_grad)
    return grad_x, _or_empty(grad_metric, x), _or_empty(grad_in_size, x)


def _merge_tokens_backward(ctx, grad_merged, grad_size):
    saved = ctx.saved_tensors
    metric_grad = ctx.needs_input_grad[1]
    grad_x, grad_metric, grad_in_size = torch.ops.fpet_triton.merge_tokens_backward(
        grad_merged, grad_size, *saved, *ctx.grid, metric_grad)
    return grad_x, _or_none(grad_metric, metric_grad), _or_none(grad_in_size, saved[2] is not None), None, None, None


register_autograd(f"{NAMESPACE}::merge_tokens", _merge_tokens_backward, setup_context=_merge_setup)
