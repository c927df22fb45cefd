"""fpet_kernels: faster parameter-efficient tuning of timm Vision Transformers.

FPET token merging (a key refinement adapter, a checkerboard straight-through matching and a size-weighted merge at
one middle block) and SKIP-style FFN pruning, with kernels behind one functional API (:mod:`fpet_kernels.ops`).
"""
from .merger import TokenMerger
from .ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    checkerboard_similarity,
    merge_tokens,
    refine_keys,
    scatter_mean_merge,
    ste_match,
)
from .pet import PET_METHODS, add_pet, mark_trainable
from .timm import apply_fpet, remove_fpet
from .version import __version__

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "merge_tokens",
    "TokenMerger",
    "apply_fpet",
    "remove_fpet",
    "PET_METHODS",
    "add_pet",
    "mark_trainable",
]
