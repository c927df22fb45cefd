"""Finding the timm ``VisionTransformer`` inside a user's model (itself, or wrapped, e.g. by peft)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["find_vision_transformer"]


def find_vision_transformer(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (itself, or wrapped e.g. by peft); ValueError if none."""
    from timm.models.vision_transformer import VisionTransformer

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module
    raise ValueError(
        f"FPET needs a timm VisionTransformer (a patch grid plus prefix tokens, e.g. vit_* or deit_*); "
        f"{type(model).__name__} contains none. Hierarchical or convolutional models (Swin, ConvNeXt, ...) "
        f"have no single token grid to merge on."
    )
