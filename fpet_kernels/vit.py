"""Finding the timm ViT inside a user's model (itself, or wrapped, e.g. by peft)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["find_vision_transformer"]

# timm classes with one token sequence that FPET still cannot merge, and why (named in the error).
_UNSUPPORTED = {
    "Beit": "its attention adds a learned relative position bias over every pair of grid tokens, which has no value "
            "for merged tokens",
    "VisionTransformerRelPos": "its attention adds a relative position bias over every pair of grid tokens, which "
                               "has no value for merged tokens",
    "Cait": "its class-attention stage and talking-heads attention are not timm's Block",
    "Xcit": "its cross-covariance attention mixes channels, not tokens, and its local patch interaction needs the "
            "full grid",
    "VisionTransformerSAM": "its windowed attention needs the full grid",
}


def find_vision_transformer(model: nn.Module, allow_eva: bool = False) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (itself, or wrapped e.g. by peft); with ``allow_eva`` also a
    timm ``Eva`` (eva02_*, vit_*_rope_*: RoPE, SwiGLU). ValueError naming the reason if there is none."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    kinds = (VisionTransformer, Eva) if allow_eva else (VisionTransformer,)
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, kinds):
            return module
    if any(isinstance(module, Eva) for module in modules):
        raise ValueError(
            f"{type(model).__name__} is a timm Eva model (eva02_*, vit_*_rope_*): apply_fpet / remove_fpet and the "
            "feature API support it, but this function needs a timm VisionTransformer (the PET methods, checkpoints, "
            "SKIP and ToMe of fpet_kernels are for VisionTransformer; use peft for PET on Eva)"
        )
    for module in modules:
        reason = _UNSUPPORTED.get(type(module).__name__)
        if reason is not None:
            raise ValueError(f"FPET does not support timm's {type(module).__name__}: {reason}")
    raise ValueError(
        f"FPET needs a timm VisionTransformer or Eva (a patch grid plus prefix tokens, e.g. vit_*, deit_*, eva02_*); "
        f"{type(model).__name__} contains none. Hierarchical or convolutional models (Swin, ConvNeXt, ...) "
        f"have no single token grid to merge on."
    )
