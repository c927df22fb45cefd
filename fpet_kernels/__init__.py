"""fpet_kernels: faster parameter-efficient tuning of timm Vision Transformers.

FPET token merging (a key refinement adapter, a checkerboard straight-through matching and a size-weighted merge at
one middle block) for timm ViTs, with PET methods (LoRA, AdaptFormer, VPT, ...) and the merge ops behind one
functional API (:mod:`fpet_kernels.ops`) with several kernel backends (:mod:`fpet_kernels.backends`). Importing
the package loads neither triton nor the compiled extension: a backend is loaded when an op first needs it.
The design: docs/design.md.
"""
from .backends import BACKENDS, BackendUnavailableError, available_backends
from .merger import TokenMerger
from .ops import (
    checkerboard_similarity,
    merge_tokens,
    refine_keys,
    scatter_mean_merge,
    scatter_mean_merge_dense,
    ste_match,
)
from .pet import PET_METHODS, add_pet, mark_trainable
from .version import __version__
from .vit_patch import apply_fpet, remove_fpet
from .tome import apply_tome, remove_tome
from .checkpoint import fold_pet, load_pet, read_pet_checkpoint, remove_pet, save_pet

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "scatter_mean_merge_dense",
    "merge_tokens",
    "TokenMerger",
    "apply_fpet",
    "remove_fpet",
    "apply_tome",
    "remove_tome",
    "PET_METHODS",
    "add_pet",
    "mark_trainable",
    "save_pet",
    "load_pet",
    "read_pet_checkpoint",
    "fold_pet",
    "remove_pet",
]
