"""Parameter-efficient tuning methods for timm VisionTransformer models (docs/design.md §5).

``add_pet(model, method, **hparams)`` adds one method in place; ``mark_trainable(model)`` freezes everything but
the PET parameters, the FPET refinement adapter and the classifier head. Methods wrap or hook timm's own modules,
so they compose with :func:`fpet_kernels.apply_fpet` in either order. Each call is recorded on the ViT
(:func:`pet_config`), so :mod:`fpet_kernels.checkpoint` can rebuild the same model from a fresh backbone.

| method | what is added | defaults |
|---|---|---|
| ``lora`` | LoRA on q and v of each block's fused qkv | ``rank=8, scale=1.0`` |
| ``bi-lora`` | the same with 1-bit weights | ``rank=32, scale=1.0`` |
| ``adaptformer`` | parallel bottleneck beside each block's MLP | ``bottleneck=8, scale=0.1, dropout=0.1`` |
| ``bi-adaptformer`` | the same with 1-bit weights | ``bottleneck=32, scale=0.1, dropout=0.1`` |
| ``vpt-shallow`` | prompt tokens after the class token | ``num_tokens=10, dropout=0.0`` |
| ``vpt-deep`` | prompt tokens replaced at every block | ``num_tokens=10, dropout=0.0`` |
| ``linear`` | nothing: only the head trains | |
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List

import torch.nn as nn

from ..binary import QuantLinear, binarize
from ..vit import find_vision_transformer
from .adaptformer import AdaptFormerAdapter
from .lora import LoRAQKV
from .vpt import VisualPrompts

__all__ = [
    "PET_METHODS",
    "add_pet",
    "mark_trainable",
    "pet_config",
    "pet_parameters",
    "binarize",
    "QuantLinear",
    "LoRAQKV",
    "AdaptFormerAdapter",
    "VisualPrompts",
]

PET_METHODS: Dict[str, Dict[str, Any]] = {
    "lora": {"rank": 8, "scale": 1.0},
    "bi-lora": {"rank": 32, "scale": 1.0},
    "adaptformer": {"bottleneck": 8, "scale": 0.1, "dropout": 0.1},
    "bi-adaptformer": {"bottleneck": 32, "scale": 0.1, "dropout": 0.1},
    "vpt-shallow": {"num_tokens": 10, "dropout": 0.0},
    "vpt-deep": {"num_tokens": 10, "dropout": 0.0},
    "linear": {},
}
_ADAPTER_NAME = "adaptformer"
_PROMPTS_NAME = "vpt"
_CONFIG_ATTR = "_fpet_pet_config"  # on the ViT: one {"method", "hparams"} per add_pet call, in call order


def add_pet(model: nn.Module, method: str, **hparams: Any) -> nn.Module:
    """Add a PET method (see the module table) to a timm VisionTransformer in place and return ``model``."""
    if method not in PET_METHODS:
        raise ValueError(f"method must be one of {sorted(PET_METHODS)}, got {method!r}")
    unknown = set(hparams) - set(PET_METHODS[method])
    if unknown:
        raise TypeError(f"{method} takes hparams {sorted(PET_METHODS[method])}, got unknown {sorted(unknown)}")
    config = {**PET_METHODS[method], **hparams}
    vit = find_vision_transformer(model)
    bits = 1 if method.startswith("bi-") else 32
    device = next(vit.parameters()).device
    if method.endswith("lora"):
        for index, block in enumerate(vit.blocks):
            if isinstance(block.attn.qkv, LoRAQKV):
                raise ValueError(f"block {index} already has LoRA on its qkv")
            block.attn.qkv = LoRAQKV(block.attn.qkv, config["rank"], config["scale"], bits=bits).train(vit.training)
    elif method.endswith("adaptformer"):
        for index, block in enumerate(vit.blocks):
            if hasattr(block, _ADAPTER_NAME):
                raise ValueError(f"block {index} already has an AdaptFormer adapter")
            adapter = AdaptFormerAdapter(
                vit.embed_dim, config["bottleneck"], config["scale"], config["dropout"], bits=bits
            ).to(device=device).train(vit.training)
            block.add_module(_ADAPTER_NAME, adapter)
            block.norm2.register_forward_pre_hook(adapter.read_input)
            block.drop_path2.register_forward_hook(adapter.add_branch)
    elif method.startswith("vpt"):
        _add_prompts(vit, config, deep=method == "vpt-deep")
    vit.__dict__.setdefault(_CONFIG_ATTR, []).append({"method": method, "hparams": dict(config)})
    return model


def pet_config(model: nn.Module) -> List[Dict[str, Any]]:
    """The PET methods added to the model's ViT by :func:`add_pet`, in call order: a list of
    ``{"method": name, "hparams": {...}}`` with every hyper-parameter (defaults filled in); ``[]`` if none."""
    vit = find_vision_transformer(model)
    return [{"method": r["method"], "hparams": dict(r["hparams"])} for r in getattr(vit, _CONFIG_ATTR, [])]


def _add_prompts(vit: nn.Module, config: Dict[str, Any], deep: bool) -> None:
    if hasattr(vit, _PROMPTS_NAME):
        raise ValueError("the model already has visual prompts")
    if getattr(vit, "dynamic_img_size", False) and not getattr(vit, "no_embed_class", False):
        raise ValueError("VPT cannot be added to a dynamic_img_size model whose pos_embed covers the prefix tokens")
    depth = len(vit.blocks) if deep else 1
    prompts = VisualPrompts(
        config["num_tokens"], vit.embed_dim, depth, math.prod(vit.patch_embed.patch_size), config["dropout"]
    ).to(device=next(vit.parameters()).device).train(vit.training)
    prompts.position = 1 if vit.cls_token is not None else 0
    vit.add_module(_PROMPTS_NAME, prompts)
    vit.patch_drop.register_forward_hook(prompts.insert)
    for layer in range(1, depth):
        vit.blocks[layer].register_forward_pre_hook(functools.partial(prompts.replace, layer))
    vit.num_prefix_tokens += prompts.num_tokens


def mark_trainable(model: nn.Module) -> int:
    """Freeze all parameters except PET ones (LoRA incl. peft's ``lora_*``, AdaptFormer, prompts), the FPET
    refinement adapter and the classifier head(s); return the number of trainable parameters.

    Trainable parts are found by their marker: a module class with ``fpet_trainable = True`` (AdaptFormer, visual
    prompts, the TokenMerger) trains whole; LoRA weights by their ``lora_`` names (ours and peft's). In a peft model,
    peft's frozen copies stay frozen: of a module in ``modules_to_save`` (e.g. ``head``, ``token_merger``) only the
    active adapter's copy trains. The set is :func:`pet_parameters`."""
    model.requires_grad_(False)
    for param in pet_parameters(model).values():
        param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pet_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters :func:`mark_trainable` trains, by their names in ``model.named_parameters()``: those of
    modules marked ``fpet_trainable = True``, those named ``lora_*`` and those of the ViT's ``head`` /
    ``head_dist``, less peft's frozen copies (:func:`fpet_kernels.peft_support.peft_frozen_modules`: the
    ``original_module`` of a ``modules_to_save`` wrapper, the copies of inactive adapters). Only the model's
    structure decides; ``requires_grad`` flags are not read."""
    from ..peft_support import peft_frozen_modules  # lazy: keeps the import graph of fpet_kernels.pet as it was

    vit = find_vision_transformer(model, allow_eva=True)  # an Eva has a head and the merger, no PET of ours
    chosen = set()
    for module in model.modules():
        if getattr(module, "fpet_trainable", False):
            chosen.update(id(p) for p in module.parameters())
    for head_name in ("head", "head_dist"):
        head = getattr(vit, head_name, None)
        if isinstance(head, nn.Module):
            chosen.update(id(p) for p in head.parameters())
    frozen = {id(p) for module in peft_frozen_modules(model) for p in module.parameters()}
    return {
        name: param
        for name, param in model.named_parameters()
        # "lora_": ours (lora_a_q, ...) and peft's (lora_A, lora_B, ...)
        if (id(param) in chosen or "lora_" in name) and id(param) not in frozen
    }
