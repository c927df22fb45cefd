"""The ``triton`` backend: Triton kernels for the FPET ops (docs/design.md §4), registered as ``fpet_triton::<op>``
with the same schemas as the C++ backend's ``fpet::<op>``, and the six functions with the reference's signatures.

Importing this package imports neither triton nor the kernels, so that :mod:`.availability` (whose
:func:`~.availability.unavailable_reason` the backend registry asks first) imports anywhere; the first call of one
of the functions below imports them and registers the ops (:mod:`.library`). Under ``TRITON_INTERPRET=1`` (set
before triton is first imported) the kernels also run on CPU tensors, which is how CI tests them.

Files: ``similarity.py`` (checkerboard_similarity, the WRITE_MATCH argmax / top-2 launch, cosine backward),
``match.py`` (ste_match), ``merge.py`` (scatter_mean_merge index and dense, the fused merge_tokens forward and
backward), ``refine.py`` (refine_keys), ``library.py`` (op registration + autograd), ``_common.py`` (launch settings,
the in-kernel checkerboard maps).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ...reference import dropout_keep
from .. import get_backend

__all__ = [
    "SUPPORTED_DTYPES",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "scatter_mean_merge_dense",
    "merge_tokens",
]

SUPPORTED_DTYPES = get_backend("triton").dtypes  # the registry's entry (docs/design.md §4)


def check_dtype(name: str, t: torch.Tensor) -> None:
    """The Triton backend computes in float32 at most: float64 belongs to the reference and cpp backends."""
    get_backend("triton").check_dtype(name, t)


def _ops():
    """``torch.ops.fpet_triton``, its ops registered (triton and the kernels imported) on the first call."""
    from . import library  # noqa: F401

    return torch.ops.fpet_triton


def _grid(grid_size: Sequence[int], num_prefix_tokens: int) -> Tuple[int, int, int]:
    """The ops' ``(height, width, num_prefix_tokens)`` arguments."""
    return int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens)


def _check_merge_inputs(x: torch.Tensor, size: Optional[torch.Tensor]) -> None:
    check_dtype("x", x)
    if size is not None:
        check_dtype("size", size)


def refine_keys(metric, w_down, w_up, scale: float = 1.0, dropout_p: float = 0.0, training: bool = False):
    """``m + scale * Up(Dropout(ReLU(Down(m))))``: metric ``[B, N, Dh]``, w_down ``[d, Dh]``, w_up ``[Dh, d]``.
    Dropout (``training`` and ``dropout_p > 0``) uses the keep mask of
    :func:`fpet_kernels.reference.dropout_keep`, drawn from torch's generator."""
    for name, t in (("metric", metric), ("w_down", w_down), ("w_up", w_up)):
        check_dtype(name, t)
    keep = dropout_keep(metric, w_down, dropout_p, training)
    return _ops().refine_keys(metric, w_down, w_up, keep, float(scale), float(dropout_p))


def checkerboard_similarity(metric, grid_size, num_prefix_tokens):
    """metric ``[B, N, Dh]`` -> scores ``[B, NA, NB]`` float32, prefix columns ``-inf``."""
    check_dtype("metric", metric)
    return _ops().checkerboard_similarity(metric, *_grid(grid_size, num_prefix_tokens))


def ste_match(scores):
    """scores ``[B, NA, NB]`` -> ``(matching [B, NA, NB] one-hot in value with the STE gradient, index [B, NA])``."""
    check_dtype("scores", scores)
    return _ops().ste_match(scores)


def scatter_mean_merge(x, size, index, grid_size, num_prefix_tokens):
    """x ``[B, N, C]``, size ``[B, N]`` or None, index ``[B, NA]`` int64 (the matched B column of every A token)
    -> ``(x' [B, NB, C] in x.dtype, size' [B, NB] float32)``; no gradient to the index."""
    _check_merge_inputs(x, size)
    if index.dtype != torch.int64:
        raise TypeError(f"scatter_mean_merge takes an int64 index, got {index.dtype}; a float matching goes to "
                        f"scatter_mean_merge_dense")
    return _ops().scatter_mean_merge(x, size, index, *_grid(grid_size, num_prefix_tokens))


def scatter_mean_merge_dense(x, size, matching, grid_size, num_prefix_tokens):
    """x ``[B, N, C]``, size ``[B, N]`` or None, float matching ``[B, NA, NB]`` (gradients flow into it)
    -> ``(x' [B, NB, C] in x.dtype, size' [B, NB] float32)``."""
    _check_merge_inputs(x, size)
    check_dtype("matching", matching)
    return _ops().scatter_mean_merge_dense(x, size, matching, *_grid(grid_size, num_prefix_tokens))


def merge_tokens(x, metric, size=None, *, grid_size, num_prefix_tokens):
    """Similarity + STE match + merge as one op with a fused backward: x ``[B, N, C]``, metric ``[B, N, Dh]``, size
    ``[B, N]`` or None -> ``(x' [B, NB, C], size' [B, NB] float32)``. The forward never builds the score or
    matching matrix (argmax + scatter), so with grad off or no input requiring grad it is the fast path as is."""
    _check_merge_inputs(x, size)
    check_dtype("metric", metric)
    return _ops().merge_tokens(x, metric, size, *_grid(grid_size, num_prefix_tokens))
