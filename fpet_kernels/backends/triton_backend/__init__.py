"""The ``triton`` backend: Triton kernels for the FPET ops (SPEC section 4), the default for CUDA tensors.

Importing this package never imports triton: :func:`unavailable_reason` says whether the backend can run here, and
the five ops load :mod:`.library` (kernels + ``torch.library`` registration) on first use. Under
``TRITON_INTERPRET=1`` (set before the first use) the kernels also run on CPU tensors, which is how CI tests them.

Files: ``similarity.py`` (checkerboard_similarity, cosine backward), ``match.py`` (ste_match), ``merge.py``
(scatter_mean_merge, the fused merge_tokens backward), ``refine.py`` (refine_keys), ``library.py`` (ops + autograd).
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = [
    "unavailable_reason",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "merge_tokens",
]


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here; otherwise why not, and how to get them."""
    try:
        from . import library  # noqa: F401  (imports triton and registers the ops)
    except Exception as error:  # a missing or broken triton must not break fpet_kernels
        return f"triton could not be loaded ({type(error).__name__}: {error}); install it with `pip install triton`"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return ("no CUDA device is available (the Triton kernels need an NVIDIA GPU; set TRITON_INTERPRET=1 before "
                "importing them to run them slowly on CPU tensors)")
    return None


def _library():
    from . import library

    return library


def refine_keys(metric, w_down, w_up, scale=1.0, dropout_p=0.0, training=False):
    """See :func:`fpet_kernels.reference.refine_keys`."""
    return _library().refine_keys(metric, w_down, w_up, scale, dropout_p, training)


def checkerboard_similarity(metric, grid_size, num_prefix_tokens):
    """See :func:`fpet_kernels.reference.checkerboard_similarity`."""
    return _library().checkerboard_similarity(metric, grid_size, num_prefix_tokens)


def ste_match(scores):
    """See :func:`fpet_kernels.reference.ste_match`."""
    return _library().ste_match(scores)


def scatter_mean_merge(x, size, matching, grid_size, num_prefix_tokens):
    """See :func:`fpet_kernels.reference.scatter_mean_merge`."""
    return _library().scatter_mean_merge(x, size, matching, grid_size, num_prefix_tokens)


def merge_tokens(x, metric, size=None, *, grid_size, num_prefix_tokens):
    """See :func:`fpet_kernels.reference.merge_tokens`."""
    return _library().merge_tokens(x, metric, size, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
