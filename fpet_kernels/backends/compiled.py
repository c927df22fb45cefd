"""The compiled backends ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) of docs/design.md §4.

Both are the extension ``fpet_kernels._C``: its import registers the custom ops ``torch.ops.fpet.<op>`` (schemas
and CPU/CUDA kernels in ``csrc/``; the dispatcher picks the kernel by the tensors' device), and :func:`load` adds
their Python side: autograd (``torch.library.register_autograd``, backward through the private
``fpet::<op>_backward`` ops) and fake kernels (``torch.library.register_fake``) so that ``torch.compile`` traces
them. The six functions below have the signatures of :mod:`fpet_kernels.reference`.

The extension is loaded on first use, not when ``fpet_kernels`` is imported. If it is missing or fails to load,
:func:`unavailable_reason` says why, the registry marks ``cpp``/``cuda`` unavailable, and ``backend="auto"``
falls back to the reference with one warning (:func:`warn_fallback_once`).
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional, Tuple

import torch

from .. import reference
from ..geometry import Checkerboard

BUILD_HINT = "build it from the source tree with `pip install --no-build-isolation -e .`"

__all__ = [
    "BUILD_HINT",
    "load_error",
    "is_loaded",
    "registered_ops",
    "cuda_kernels_built",
    "unavailable_reason",
    "warn_fallback_once",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "scatter_mean_merge_dense",
    "merge_tokens",
]


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """Load the extension (once) and register its autograd and fake kernels; None on success, else why not."""
    try:
        from .. import _C  # noqa: F401  (the import registers torch.ops.fpet.*)
    except Exception as error:  # a missing or broken build must not break fpet_kernels
        return f"{type(error).__name__}: {error}"
    try:
        _register_fake_kernels()
        _register_autograd()
    except Exception as error:  # a stale build (older sources): its ops differ from these
        return f"{type(error).__name__}: {error} (fpet_kernels._C was built from other sources; rebuild it)"
    return None


def is_loaded() -> bool:
    """True when fpet_kernels._C imported and registered the fpet ops."""
    return load_error() is None


def registered_ops() -> Tuple[str, ...]:
    """Names of the ``fpet::`` ops the extension registers (forward and backward)."""
    if not is_loaded():
        return ()
    return tuple(sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                        if name.startswith("fpet::")))


def cuda_kernels_built() -> bool:
    """True when every fpet op (and its backward) has a CUDA kernel, i.e. the extension was built with CUDA."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return is_loaded() and all(has_kernel(f"fpet::{name}", "CUDA") for name in registered_ops())


def unavailable_reason(device: str) -> Optional[str]:
    """Why the compiled backend for ``device`` ("cpu": cpp, "cuda": cuda) cannot run here; None when it can."""
    if not is_loaded():
        return f"the compiled extension fpet_kernels._C is not built or failed to load ({load_error()}); {BUILD_HINT}"
    if device == "cuda":
        if not cuda_kernels_built():
            return ("fpet_kernels._C was built without CUDA kernels (FPET_SKIP_CUDA_BUILD=1, or no CUDA toolkit or "
                    f"CUDA-enabled torch at build time); {BUILD_HINT} where nvcc and a CUDA torch are installed")
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


_warned = threading.Event()


def warn_fallback_once() -> None:
    """Warn, once per process, that backend='auto' runs the pure-PyTorch reference on CPU because the extension
    is missing."""
    if is_loaded() or _warned.is_set():
        return
    _warned.set()
    warnings.warn(
        f"fpet_kernels: the compiled extension fpet_kernels._C is not available ({load_error()}); backend='auto' "
        f"falls back to the pure-PyTorch reference on CPU, which is slower. To use the C++ kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=4,
    )


# ---------------------------------------------------------------------------------------------- fake kernels
def _acc(dtype: torch.dtype) -> torch.dtype:
    return reference.accumulation_dtype(dtype)


def _merged_like(x: torch.Tensor, height: int, width: int, num_prefix_tokens: int):
    """Empty ``(x' [B, NB, C], size' [B, NB])`` for the fake kernels of the merges."""
    num_b = Checkerboard(height, width, num_prefix_tokens).num_b
    return x.new_empty((x.shape[0], num_b, x.shape[2])), x.new_empty((x.shape[0], num_b), dtype=_acc(x.dtype))


def _register_fake_kernels() -> None:
    register = torch.library.register_fake

    @register("fpet::refine_keys")
    def _(metric, w_down, w_up, keep, scale, dropout_p):
        return metric.new_empty(metric.shape)

    @register("fpet::refine_keys_backward")
    def _(grad, metric, w_down, w_up, keep, scale, dropout_p):
        return metric.new_empty(metric.shape), w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape)

    @register("fpet::checkerboard_similarity")
    def _(metric, height, width, num_prefix_tokens):
        grid = Checkerboard(height, width, num_prefix_tokens)
        return metric.new_empty((metric.shape[0], grid.num_a, grid.num_b), dtype=_acc(metric.dtype))

    @register("fpet::checkerboard_similarity_backward")
    def _(grad_scores, metric, height, width, num_prefix_tokens):
        return metric.new_empty(metric.shape)

    @register("fpet::ste_match")
    def _(scores):
        return scores.new_empty(scores.shape), scores.new_empty(scores.shape[:2], dtype=torch.int64)

    @register("fpet::ste_match_backward")
    def _(grad_matching, scores):
        return scores.new_empty(scores.shape)

    @register("fpet::scatter_mean_merge")
    def _(x, size, index, height, width, num_prefix_tokens):
        return _merged_like(x, height, width, num_prefix_tokens)

    @register("fpet::scatter_mean_merge_backward")
    def _(grad_x_merged, grad_size_merged, x, size, index, height, width, num_prefix_tokens):
        return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=_acc(x.dtype))

    @register("fpet::scatter_mean_merge_dense")
    def _(x, size, matching, height, width, num_prefix_tokens):
        return _merged_like(x, height, width, num_prefix_tokens)

    @register("fpet::scatter_mean_merge_dense_backward")
    def _(grad_x_merged, grad_size_merged, x, size, matching, height, width, num_prefix_tokens):
        return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=_acc(x.dtype)), matching.new_empty(matching.shape)

    @register("fpet::merge_tokens")
    def _(x, metric, size, height, width, num_prefix_tokens):
        return _merged_like(x, height, width, num_prefix_tokens)

    @register("fpet::merge_tokens_backward")
    def _(grad_x_merged, grad_size_merged, x, metric, size, height, width, num_prefix_tokens, metric_grad):
        grad_metric = metric.new_empty(metric.shape if metric_grad else (0,))
        return x.new_empty(x.shape), grad_metric, x.new_empty(x.shape[:2], dtype=_acc(x.dtype))


# ---------------------------------------------------------------------------------------------- autograd
def _or_zeros(grad: Optional[torch.Tensor], meta) -> torch.Tensor:
    """grad, or zeros of the output's (shape, dtype, device) where autograd passed None."""
    if grad is not None:
        return grad
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device)


def _size_grad(grad_size: torch.Tensor, size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if size is None else grad_size.to(size.dtype)


def _register_autograd() -> None:
    ops = torch.ops.fpet

    def refine_keys_setup(ctx, inputs, output):
        *tensors, ctx.scale, ctx.dropout_p = inputs
        ctx.save_for_backward(*tensors)

    def refine_keys_backward(ctx, grad):
        metric, w_down, w_up, keep = ctx.saved_tensors
        grads = ops.refine_keys_backward(grad, metric, w_down, w_up, keep, ctx.scale, ctx.dropout_p)
        return (*grads, None, None, None)

    def similarity_setup(ctx, inputs, output):
        metric, *ctx.grid = inputs
        ctx.save_for_backward(metric)

    def similarity_backward(ctx, grad_scores):
        (metric,) = ctx.saved_tensors
        return ops.checkerboard_similarity_backward(grad_scores, metric, *ctx.grid), None, None, None

    def ste_match_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.output_meta = (output[0].shape, output[0].dtype, output[0].device)

    def ste_match_backward(ctx, grad_matching, grad_index):
        (scores,) = ctx.saved_tensors
        return ops.ste_match_backward(_or_zeros(grad_matching, ctx.output_meta), scores)

    def merge_setup(ctx, inputs, output):
        """The merges (x, size, index | matching, *grid) and merge_tokens (x, metric, size, *grid): the three
        tensors are saved, the grid kept, and the outputs' (shape, dtype, device) for gradients autograd passes as
        None."""
        ctx.save_for_backward(*inputs[:3])
        ctx.grid = inputs[3:]
        ctx.output_meta = [(o.shape, o.dtype, o.device) for o in output]

    def output_grads(ctx, grad_x_merged, grad_size_merged):
        meta_x, meta_size = ctx.output_meta
        return _or_zeros(grad_x_merged, meta_x), _or_zeros(grad_size_merged, meta_size)

    def scatter_mean_merge_backward(ctx, grad_x_merged, grad_size_merged):
        x, size, index = ctx.saved_tensors
        grad_x, grad_size = ops.scatter_mean_merge_backward(
            *output_grads(ctx, grad_x_merged, grad_size_merged), x, size, index, *ctx.grid)
        return grad_x, _size_grad(grad_size, size), None, None, None, None

    def dense_merge_backward(ctx, grad_x_merged, grad_size_merged):
        x, size, matching = ctx.saved_tensors
        grad_x, grad_size, grad_matching = ops.scatter_mean_merge_dense_backward(
            *output_grads(ctx, grad_x_merged, grad_size_merged), x, size, matching, *ctx.grid)
        return grad_x, _size_grad(grad_size, size), grad_matching, None, None, None

    def merge_tokens_backward(ctx, grad_x_merged, grad_size_merged):
        x, metric, size = ctx.saved_tensors
        metric_grad = ctx.needs_input_grad[1]
        grad_x, grad_metric, grad_size = ops.merge_tokens_backward(
            *output_grads(ctx, grad_x_merged, grad_size_merged), x, metric, size, *ctx.grid, metric_grad)
        return grad_x, grad_metric if metric_grad else None, _size_grad(grad_size, size), None, None, None

    register = torch.library.register_autograd
    register("fpet::refine_keys", refine_keys_backward, setup_context=refine_keys_setup)
    register("fpet::checkerboard_similarity", similarity_backward, setup_context=similarity_setup)
    register("fpet::ste_match", ste_match_backward, setup_context=ste_match_setup)
    register("fpet::scatter_mean_merge", scatter_mean_merge_backward, setup_context=merge_setup)
    register("fpet::scatter_mean_merge_dense", dense_merge_backward, setup_context=merge_setup)
    register("fpet::merge_tokens", merge_tokens_backward, setup_context=merge_setup)


# ---------------------------------------------------------------------------------------------- the ops
def _grid(grid_size, num_prefix_tokens) -> Tuple[int, int, int]:
    """The ops' ``(height, width, num_prefix_tokens)`` arguments."""
    return int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens)


def refine_keys(
    metric: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``metric + scale * Up(Dropout(ReLU(Down(metric))))``; see :func:`fpet_kernels.reference.refine_keys` (the
    same keep mask, :func:`fpet_kernels.reference.dropout_keep`)."""
    keep = reference.dropout_keep(metric, w_down, dropout_p, training)
    return torch.ops.fpet.refine_keys(metric, w_down, w_up, keep, float(scale), float(dropout_p))


def checkerboard_similarity(metric: torch.Tensor, grid_size, num_prefix_tokens: int) -> torch.Tensor:
    """Scores ``[B, NA, NB]``; see :func:`fpet_kernels.reference.checkerboard_similarity`."""
    return torch.ops.fpet.checkerboard_similarity(metric, *_grid(grid_size, num_prefix_tokens))


def ste_match(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(matching [B, NA, NB], index [B, NA])``; see :func:`fpet_kernels.reference.ste_match`."""
    matching, index = torch.ops.fpet.ste_match(scores)
    return matching, index


def scatter_mean_merge(
    x: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor, grid_size, num_prefix_tokens: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_merged [B, NB, C], size_merged [B, NB])``; see :func:`fpet_kernels.reference.scatter_mean_merge`."""
    x_merged, size_merged = torch.ops.fpet.scatter_mean_merge(x, size, index, *_grid(grid_size, num_prefix_tokens))
    return x_merged, size_merged


def scatter_mean_merge_dense(
    x: torch.Tensor, size: Optional[torch.Tensor], matching: torch.Tensor, grid_size, num_prefix_tokens: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_merged, size_merged)`` of a float matching; see :func:`fpet_kernels.reference.scatter_mean_merge_dense`."""
    x_merged, size_merged = torch.ops.fpet.scatter_mean_merge_dense(
        x, size, matching, *_grid(grid_size, num_prefix_tokens))
    return x_merged, size_merged


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size,
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused similarity + STE match + merge; see :func:`fpet_kernels.reference.merge_tokens`.

    The forward never keeps a score matrix (argmax per row, then a scatter), with or without grad; the backward
    recomputes the scores and forms dL/dS from the closed forms of docs/design.md §3.
    """
    x_merged, size_merged = torch.ops.fpet.merge_tokens(x, metric, size, *_grid(grid_size, num_prefix_tokens))
    return x_merged, size_merged
