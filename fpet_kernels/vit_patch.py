"""``apply_fpet`` / ``remove_fpet``: the FPET drop-in for timm VisionTransformer models (docs/design.md §2).

The patch keeps timm's own modules and forwards:

* the merge block ``L`` gets a forward of its own that differs from timm's ``Block.forward`` only by the merge
  between the attention residual and the MLP; its keys come from a forward hook on ``attn.k_norm`` (the keys after
  any k-norm, before the softmax scale), so the qkv projection runs once and may be wrapped (LoRA, peft, ...);
* every later block keeps timm's forward; a forward pre-hook passes ``attn_mask = log(size)`` (proportional attention,
  step 7), which timm hands to SDPA (fused attention stays on) or adds to the logits;
* the pooling gains the size-weighted mean for ``global_pool='avg'`` (step 8);
* a pre-hook on ``patch_embed`` resets the per-forward state at the start of every forward pass (step 9). The state
  (metric, sizes, grid) is private to each thread.

``remove_fpet`` removes all of it, leaving the model bit-identical to the unpatched one.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .backends import BACKENDS
from ._thread_state import ThreadState
from .merger import TokenMerger
from .vit import find_vision_transformer

__all__ = ["apply_fpet", "remove_fpet", "find_vision_transformer", "get_fpet_patch"]

_MERGER_NAME = "token_merger"
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_POOLS = ("token", "avg", "avgmax", "max", "")


def get_fpet_patch(model: nn.Module) -> Optional["FPETPatch"]:
    """The :class:`FPETPatch` of a patched model, or None."""
    return getattr(find_vision_transformer(model), "_fpet_patch", None)


class FPETPatch:
    """What ``apply_fpet`` adds to one VisionTransformer; owns its hooks and per-forward state."""

    def __init__(self, vit: nn.Module, layer: int, prop_attn: bool) -> None:
        self.vit = vit
        self.layer = layer
        self.prop_attn = prop_attn
        self.state = ThreadState()

    # ------------------------------------------------------------------ per-forward state (docs/design.md §2 step 9)
    def reset_state(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """patch_embed pre-hook: a new forward pass starts; record its patch grid."""
        self.state.set("size", None)
        self.state.set("metric", None)
        patch_embed = self.vit.patch_embed
        if getattr(self.vit, "dynamic_img_size", False):
            grid = patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:]))
        else:
            grid = patch_embed.grid_size
        self.state.set("grid_size", tuple(int(g) for g in grid))

    def capture_metric(self, module: nn.Module, args: Tuple[Any, ...], keys: torch.Tensor) -> None:
        """k_norm forward hook of the merge block: keys ``[B, heads, N, Dh]`` -> metric ``[B, N, Dh]``."""
        self.state.set("metric", keys.mean(dim=1))

    # ------------------------------------------------------------------ the merge block (steps 1-6)
    def merge_block_forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """timm ``Block.forward`` with the token merge between the attention residual and the MLP."""
        block = self.vit.blocks[self.layer]
        self.state.set("metric", None)
        # is_causal is passed only when set: timm < 1.0.26's Attention.forward has no such argument.
        causal = {"is_causal": True} if is_causal else {}
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, **causal)))
        metric = self.state.pop("metric")
        if metric is None:
            raise RuntimeError(
                f"FPET could not capture the keys of block {self.layer}: its attention did not call attn.k_norm"
            )
        grid_size = self.state.get("grid_size") or tuple(self.vit.patch_embed.grid_size)
        x, size = getattr(block, _MERGER_NAME)(x, metric, None, grid_size, self.vit.num_prefix_tokens)
        self.state.set("size", size)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x

    # ------------------------------------------------------------------ later blocks (step 7)
    def proportional_attention(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        """Forward pre-hook of each block after the merge block: ``attn_mask = log(size)[:, None, None, :]``."""
        size = self.state.get("size")
        if size is None:
            return None
        x = args[0] if args else kwargs["x"]
        if x.shape[:2] != size.shape:
            raise RuntimeError(
                f"FPET token sizes {tuple(size.shape)} do not match the block input {tuple(x.shape)}; "
                "the per-forward state is stale (was the merge block skipped?)"
            )
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("attn_mask / is_causal cannot be combined with FPET token merging")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        kwargs = dict(kwargs, attn_mask=size.log().to(dtype)[:, None, None, :])
        return args, kwargs

    # ------------------------------------------------------------------ pooling (step 8)
    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        return sized_pool(self.vit, x, self.state.get("size"), pool_type)

    # ------------------------------------------------------------------ install / remove
    def install(self, merger: TokenMerger) -> None:
        vit = self.vit
        merge_block = vit.blocks[self.layer]
        merge_block.add_module(_MERGER_NAME, merger)
        merge_block.forward = self.merge_block_forward
        vit.pool = self.pool
        vit.patch_embed.register_forward_pre_hook(self.reset_state)
        merge_block.attn.k_norm.register_forward_hook(self.capture_metric)
        if self.prop_attn:
            for block in list(vit.blocks)[self.layer + 1:]:
                block.register_forward_pre_hook(self.proportional_attention, with_kwargs=True)
        vit._fpet_patch = self

    def uninstall(self) -> None:
        vit = self.vit
        merge_block = vit.blocks[self.layer]
        del merge_block._modules[_MERGER_NAME]
        del merge_block.forward
        del vit.pool
        for module in vit.modules():
            _remove_hooks_of(module, self)
        del vit._fpet_patch


def sized_pool(vit: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], pool_type: Optional[str] = None
               ) -> torch.Tensor:
    """VisionTransformer.pool with the size-weighted mean over non-prefix tokens for 'avg' / 'avgmax' (token
    merging's pooling, FPET and ToMe); timm's own pool when there are no sizes or for other pool types."""
    pool_type = vit.global_pool if pool_type is None else pool_type
    if size is None or pool_type not in ("avg", "avgmax") or size.shape != x.shape[:2]:
        return type(vit).pool(vit, x, pool_type)
    start = 0 if vit.pool_include_prefix else vit.num_prefix_tokens
    tokens, weights = x[:, start:], size[:, start:].to(x.dtype).unsqueeze(-1)
    mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


def _remove_hooks_of(module: nn.Module, owner: object) -> None:
    """Remove the hooks of ``module`` that are bound methods of ``owner`` (also works on deep copies)."""
    for hooks, extra in (
        (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
        (module._forward_hooks, module._forward_hooks_with_kwargs),
    ):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is owner]:
            del hooks[key]
            extra.pop(key, None)


def _check_block(block: nn.Module, index: int) -> None:
    missing = [name for name in _BLOCK_PARTS if not hasattr(block, name)]
    if missing or not hasattr(block.attn, "k_norm"):
        raise ValueError(
            f"block {index} ({type(block).__name__}) is not a timm pre-norm Block with "
            f"{', '.join(_BLOCK_PARTS)} and attn.k_norm (missing: {', '.join(missing) or 'attn.k_norm'}); "
            "FPET supports timm's Block"
        )


def apply_fpet(
    model: nn.Module,
    layer: Optional[int] = None,
    *,
    refine_dim: int = 32,
    refine_bits: int = 1,
    refine_scale: float = 1.0,
    refine_dropout: float = 0.1,
    prop_attn: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Patch a timm VisionTransformer in place to merge tokens at block ``layer`` and return it.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, deit_* incl. distilled, register-token models), or a module
            wrapping one (e.g. a peft model).
        layer: merge block index, default ``depth // 2``; tokens go from ``P + H*W`` to ``P + floor(H*W / 2)``.
        refine_dim, refine_bits, refine_scale, refine_dropout: the key refinement adapter (see
            :class:`~fpet_kernels.merger.TokenMerger`); ``refine_dim=0`` disables it.
        prop_attn: add ``log(size)`` to the attention logits of later blocks.
        backend: kernel backend for the merge ops.
    Raises:
        ValueError: not a timm VisionTransformer, unsupported block or pooling, ``layer`` out of range, a grid with
            fewer than 2 patches, or a model that is already patched.
    """
    vit = find_vision_transformer(model)
    if getattr(vit, "_fpet_patch", None) is not None:
        raise ValueError("apply_fpet: this model is already patched with FPET; call remove_fpet(model) first")
    if getattr(vit, "_tome_patch", None) is not None:
        raise ValueError("apply_fpet: this model is patched with ToMe; FPET and ToMe cannot be combined "
                         "(call remove_tome(model) first)")
    depth = len(vit.blocks)
    layer = depth // 2 if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < depth:
        raise ValueError(f"layer must be an int in [0, {depth}) for a model with {depth} blocks, got {layer!r}")
    if vit.attn_pool is not None or vit.global_pool not in _POOLS:
        raise ValueError(
            f"global_pool={vit.global_pool!r} is not supported by FPET; use 'token', 'avg', 'avgmax' or 'max'"
        )
    if vit.patch_embed is None or not hasattr(vit.patch_embed, "grid_size"):
        raise ValueError("the model has no patch grid (patch_embed.grid_size); FPET merges on a patch grid")
    for index in range(layer, depth):
        _check_block(vit.blocks[index], index)
    if math.prod(vit.patch_embed.grid_size) < 2:
        raise ValueError(f"the patch grid {tuple(vit.patch_embed.grid_size)} has fewer than 2 patches")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    merger = TokenMerger(
        vit.blocks[layer].attn.head_dim,
        refine_dim=refine_dim,
        refine_bits=refine_bits,
        refine_scale=refine_scale,
        refine_dropout=refine_dropout,
        backend=backend,
    )
    merger.to(device=next(vit.parameters()).device).train(vit.training)
    FPETPatch(vit, layer, prop_attn).install(merger)
    return model


def remove_fpet(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fpet` (the merger and its weights are dropped); outputs equal the unpatched model's."""
    vit = find_vision_transformer(model)
    patch = getattr(vit, "_fpet_patch", None)
    if patch is None:
        raise ValueError("remove_fpet: this model is not patched with FPET")
    patch.uninstall()
    return model
