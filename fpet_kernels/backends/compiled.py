"""The compiled backends ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) of SPEC section 4.

Loads the extension ``fpet_kernels._C``, whose import registers the custom ops ``torch.ops.fpet.<op>`` (schemas and
CPU/CUDA kernels live in ``csrc/``), and adds their Python side here: autograd (``torch.library.register_autograd``,
backward through the ``fpet::<op>_backward`` ops) and fake kernels (``torch.library.register_fake``) so that
``torch.compile`` traces them. The five functions below have the signatures of :mod:`fpet_kernels.reference`.

If the extension is missing or fails to load, importing this module still succeeds: ``LOAD_ERROR`` says why,
:mod:`fpet_kernels.ops` marks ``cpp``/``cuda`` unavailable, and ``backend="auto"`` falls back to the reference with
one warning (:func:`warn_fallback_once`).

``refine_keys`` is two ATen GEMMs on either device; with dropout active (``training`` and ``dropout_p > 0``) it calls
the reference, which draws the dropout mask with PyTorch's generator.
"""
from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (the import registers torch.ops.fpet.*)
except Exception as error:  # a missing or broken build must not break `import fpet_kernels`
    LOAD_ERROR: Optional[str] = f"{type(error).__name__}: {error}"
else:
    LOAD_ERROR = None

BUILD_HINT = "build it from the source tree with `pip install --no-build-isolation -e .`"
OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "merge_tokens")
BACKWARD_OPS = tuple(f"{name}_backward" for name in OPS)

__all__ = [
    "LOAD_ERROR",
    "BUILD_HINT",
    "OPS",
    "is_loaded",
    "cuda_kernels_built",
    "unavailable_reasons",
    "warn_fallback_once",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "merge_tokens",
    "cpp",
    "cuda",
]


def is_loaded() -> bool:
    """True when fpet_kernels._C imported and registered the fpet ops."""
    return LOAD_ERROR is None


def cuda_kernels_built() -> bool:
    """True when every fpet op (and its backward) has a CUDA kernel, i.e. the extension was built with CUDA."""
    return is_loaded() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{name}", "CUDA") for name in OPS + BACKWARD_OPS
    )


def unavailable_reasons() -> Dict[str, str]:
    """``{backend: why}`` for the compiled backends that cannot run here (empty when both can)."""
    if not is_loaded():
        reason = f"the compiled extension fpet_kernels._C is not built or failed to load ({LOAD_ERROR}); {BUILD_HINT}"
        return {"cpp": reason, "cuda": reason}
    if not cuda_kernels_built():
        return {
            "cuda": "fpet_kernels._C was built without CUDA kernels (FPET_SKIP_CUDA_BUILD=1, or no CUDA toolkit or "
            f"CUDA-enabled torch at build time); {BUILD_HINT} where nvcc and a CUDA torch are installed"
        }
    if not torch.cuda.is_available():
        return {"cuda": "no CUDA device is available (torch.cuda.is_available() is False)"}
    return {}


_warned = threading.Event()


def warn_fallback_once() -> None:
    """Warn, once per process, that backend='auto' runs the pure-PyTorch reference on CPU because the extension
    is missing."""
    if is_loaded() or _warned.is_set():
        return
    _warned.set()
    warnings.warn(
        f"fpet_kernels: the compiled extension fpet_kernels._C is not available ({LOAD_ERROR}); backend='auto' "
        f"falls back to the pure-PyTorch reference on CPU, which is slower. To use the C++ kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------- fake kernels
def _acc(dtype: torch.dtype) -> torch.dtype:
    return reference.accumulation_dtype(dtype)


def _num_a(height: int, width: int) -> int:
    return (height * width + 1) // 2


def _num_b(height: int, width: int, num_prefix_tokens: int) -> int:
    return num_prefix_tokens + height * width // 2


def _register_fake_kernels() -> None:
    register = torch.library.register_fake

    @register("fpet::refine_keys")
    def _(metric, w_down, w_up, scale):
        return metric.new_empty(metric.shape)

    @register("fpet::refine_keys_backward")
    def _(grad, metric, w_down, w_up, scale):
        return metric.new_empty(metric.shape), w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape)

    @register("fpet::checkerboard_similarity")
    def _(metric, height, width, num_prefix_tokens):
        shape = (metric.shape[0], _num_a(height, width), _num_b(height, width, num_prefix_tokens))
        return metric.new_empty(shape, dtype=_acc(metric.dtype))

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
    def _(x, size, matching, height, width, num_prefix_tokens):
        num_b = _num_b(height, width, num_prefix_tokens)
        return x.new_empty((x.shape[0], num_b, x.shape[2])), x.new_empty((x.shape[0], num_b), dtype=_acc(x.dtype))

    @register("fpet::scatter_mean_merge_backward")
    def _(grad_x_merged, grad_size_merged, x, size, matching, height, width, num_prefix_tokens):
        grad_matching = matching.new_empty((0,) if matching.dtype == torch.int64 else matching.shape)
        return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=_acc(x.dtype)), grad_matching

    @register("fpet::merge_tokens")
    def _(x, metric, size, height, width, num_prefix_tokens):
        num_b = _num_b(height, width, num_prefix_tokens)
        return x.new_empty((x.shape[0], num_b, x.shape[2])), x.new_empty((x.shape[0], num_b), dtype=_acc(x.dtype))

    @register("fpet::merge_tokens_backward")
    def _(grad_x_merged, grad_size_merged, x, metric, size, height, width, num_prefix_tokens, metric_grad):
        grad_metric = metric.new_empty(metric.shape if metric_grad else (0,))
        return x.new_empty(x.shape), grad_metric, x.new_empty(x.shape[:2], dtype=_acc(x.dtype))


# ---------------------------------------------------------------------------------------------- autograd
def _or_zeros(grad: Optional[torch.Tensor], like: torch.Tensor, meta=None) -> torch.Tensor:
    """grad, or zeros of the given (shape, dtype) meta (default: like's) where autograd passed None."""
    if grad is not None:
        return grad
    shape, dtype = meta if meta is not None else (like.shape, like.dtype)
    return like.new_zeros(shape, dtype=dtype)


def _size_grad(grad_size: torch.Tensor, size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if size is None else grad_size.to(size.dtype)


def _register_autograd() -> None:
    ops = torch.ops.fpet

    def refine_keys_setup(ctx, inputs, output):
        metric, w_down, w_up, ctx.scale = inputs
        ctx.save_for_backward(metric, w_down, w_up)

    def refine_keys_backward(ctx, grad):
        grads = ops.refine_keys_backward(grad, *ctx.saved_tensors, ctx.scale)
        return (*grads, None)

    def similarity_setup(ctx, inputs, output):
        metric, *ctx.grid = inputs
        ctx.save_for_backward(metric)

    def similarity_backward(ctx, grad_scores):
        (metric,) = ctx.saved_tensors
        return ops.checkerboard_similarity_backward(grad_scores, metric, *ctx.grid), None, None, None

    def ste_match_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def ste_match_backward(ctx, grad_matching, grad_index):
        (scores,) = ctx.saved_tensors
        return ops.ste_match_backward(_or_zeros(grad_matching, scores), scores)

    def merge_setup(ctx, inputs, output):
        """scatter_mean_merge (x, size, matching, *grid) and merge_tokens (x, metric, size, *grid): the three tensors
        are saved, the grid kept, and the outputs' (shape, dtype) for gradients autograd passes as None."""
        ctx.save_for_backward(*inputs[:3])
        ctx.grid = inputs[3:]
        ctx.output_meta = [(o.shape, o.dtype) for o in output]

    def merge_backward(ctx, grad_x_merged, grad_size_merged):
        x, size, matching = ctx.saved_tensors
        meta_x, meta_size = ctx.output_meta
        grad_x, grad_size, grad_matching = ops.scatter_mean_merge_backward(
            _or_zeros(grad_x_merged, x, meta_x), _or_zeros(grad_size_merged, x, meta_size), x, size, matching,
            *ctx.grid,
        )
        grad_matching = None if matching.dtype == torch.int64 else grad_matching
        return grad_x, _size_grad(grad_size, size), grad_matching, None, None, None

    def merge_tokens_backward(ctx, grad_x_merged, grad_size_merged):
        x, metric, size = ctx.saved_tensors
        meta_x, meta_size = ctx.output_meta
        metric_grad = ctx.needs_input_grad[1]
        grad_x, grad_metric, grad_size = ops.merge_tokens_backward(
            _or_zeros(grad_x_merged, x, meta_x), _or_zeros(grad_size_merged, x, meta_size), x, metric, size,
            *ctx.grid, metric_grad,
        )
        return grad_x, grad_metric if metric_grad else None, _size_grad(grad_size, size), None, None, None

    register = torch.library.register_autograd
    register("fpet::refine_keys", refine_keys_backward, setup_context=refine_keys_setup)
    register("fpet::checkerboard_similarity", similarity_backward, setup_context=similarity_setup)
    register("fpet::ste_match", ste_match_backward, setup_context=ste_match_setup)
    register("fpet::scatter_mean_merge", merge_backward, setup_context=merge_setup)
    register("fpet::merge_tokens", merge_tokens_backward, setup_context=merge_setup)


if is_loaded():
    _register_fake_kernels()
    _register_autograd()


# ---------------------------------------------------------------------------------------------- the ops
def refine_keys(
    metric: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``metric + scale * Up(Dropout(ReLU(Down(metric))))``; see :func:`fpet_kernels.reference.refine_keys`."""
    if training and dropout_p > 0:
        return reference.refine_keys(metric, w_down, w_up, scale, dropout_p, training)
    return torch.ops.fpet.refine_keys(metric, w_down, w_up, float(scale))


def checkerboard_similarity(
    metric: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Scores ``[B, NA, NB]``; see :func:`fpet_kernels.reference.checkerboard_similarity`."""
    height, width = grid_size
    return torch.ops.fpet.checkerboard_similarity(metric, int(height), int(width), int(num_prefix_tokens))


def ste_match(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(matching [B, NA, NB], index [B, NA])``; see :func:`fpet_kernels.reference.ste_match`."""
    matching, index = torch.ops.fpet.ste_match(scores)
    return matching, index


def scatter_mean_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    matching: torch.Tensor,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_merged [B, NB, C], size_merged [B, NB])``; see :func:`fpet_kernels.reference.scatter_mean_merge`."""
    height, width = grid_size
    x_merged, size_merged = torch.ops.fpet.scatter_mean_merge(
        x, size, matching, int(height), int(width), int(num_prefix_tokens)
    )
    return x_merged, size_merged


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused similarity + STE match + merge; see :func:`fpet_kernels.reference.merge_tokens`.

    The forward never keeps a score matrix (argmax per row, then a scatter), with or without grad; the backward
    recomputes the scores and forms dL/dS from the closed forms of SPEC section 3.
    """
    height, width = grid_size
    x_merged, size_merged = torch.ops.fpet.merge_tokens(
        x, metric, size, int(height), int(width), int(num_prefix_tokens)
    )
    return x_merged, size_merged


def _on_device(backend: str, device_type: str):
    """The five ops for one backend, refusing tensors of the other device type."""

    def check(t: torch.Tensor) -> None:
        if t.device.type != device_type:
            other = "cuda" if device_type == "cpu" else "cpp"
            raise ValueError(
                f"backend {backend!r} runs on {device_type} tensors, got a tensor on {t.device}; use "
                f"backend={other!r} or 'auto'"
            )

    def checked(op, first_arg: str):
        def run(*args, **kwargs):
            check(args[0] if args else kwargs[first_arg])
            return op(*args, **kwargs)

        run.__name__, run.__doc__ = op.__name__, op.__doc__
        return run

    return SimpleNamespace(
        refine_keys=checked(refine_keys, "metric"),
        checkerboard_similarity=checked(checkerboard_similarity, "metric"),
        ste_match=checked(ste_match, "scores"),
        scatter_mean_merge=checked(scatter_mean_merge, "x"),
        merge_tokens=checked(merge_tokens, "x"),
    )


cpp = _on_device("cpp", "cpu")
cuda = _on_device("cuda", "cuda")
