"""``apply_tome`` / ``remove_tome``: a ToMe-style baseline for timm VisionTransformer models (docs/design.md §9).

Token merging in the style of ToMe (Bolya et al., ICLR 2023), written from the paper's description: in **every**
block, between the attention residual and the MLP, ``r`` patch tokens are merged away by bipartite soft matching:

1. the metric is the block's keys (after ``attn.k_norm``) averaged over heads, as FPET's, cosine-normalised;
2. the patch tokens are split alternately in sequence order, ``A = patches[0::2]``, ``B = patches[1::2]``; prefix
   tokens (class, registers) never merge;
3. every A token's best B token by cosine similarity is found; the ``r`` A tokens with the highest best score merge
   into their B token (several may go to one), the other A tokens stay;
4. merged tokens are the size-weighted mean of their members, and sizes add up; the output is
   ``[prefix, kept A (in decreasing order of best score), B]``;
5. later blocks use proportional attention (``log(size)`` added to the logits through timm's ``attn_mask``, so SDPA
   stays on), and ``global_pool='avg'`` pools with the sizes as weights.

The matching is not differentiable (indices only); the merge is, so a ToMe model can also be trained, but ToMe is
meant as an inference-only speed-up of a model trained without it. ``r`` is clipped per block to half the patch
tokens left. The patch reuses timm's own submodules: each block's forward is timm's ``Block.forward`` with the
merge inserted, hooks capture the keys and reset the per-forward state; ``remove_tome`` removes all of it.
"""
from __future__ import annotations

import functools
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._thread_state import ThreadState
from .vit import find_vision_transformer
from .vit_patch import _POOLS, SizedFeatures, _check_block, _remove_hooks_of

__all__ = ["apply_tome", "remove_tome", "get_tome_patch", "bipartite_soft_matching", "tome_merge"]


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_prefix_tokens: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching (module docstring, steps 1-3) of ``metric [B, N, C]``.

    Returns ``(src, dst, kept)``, int64: ``src [B, r]`` the A tokens that merge (indices into ``A``), ``dst [B, r]``
    the B token each merges into (indices into ``B``), ``kept [B, len(A) - r]`` the A tokens that stay, in
    decreasing order of their best score (ties broken by index: a stable sort). ``r`` must be in
    ``[0, (N - num_prefix_tokens) // 2]``."""
    patches = metric[:, num_prefix_tokens:]
    if not 0 <= r <= patches.shape[1] // 2:
        raise ValueError(f"r must be in [0, {patches.shape[1] // 2}] for {patches.shape[1]} patch tokens, got {r}")
    with torch.no_grad():
        unit = F.normalize(patches if patches.dtype == torch.float64 else patches.float(), dim=-1)
        scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        best, best_b = scores.max(dim=-1)
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src, kept = order[:, :r], order[:, r:]
        return src, best_b.gather(1, src), kept


def tome_merge(
    x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], r: int, num_prefix_tokens: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` patch tokens of ``x [B, N, C]`` (module docstring): ``(x' [B, N - r, C], size' [B, N - r])``.

    ``size [B, N]`` are the tokens' sizes (None: all ones). The merged value is ``sum(size * x) / sum(size)`` over a
    B token and the A tokens merged into it; kept tokens and prefix tokens pass through unchanged (bitwise)."""
    batch, tokens, channels = x.shape
    if size is None:
        size = x.new_ones(batch, tokens)
    if r == 0:
        return x, size
    src, dst, kept = bipartite_soft_matching(metric, r, num_prefix_tokens)
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    prefix_size, patch_size = size[:, :num_prefix_tokens], size[:, num_prefix_tokens:]
    x_a, x_b = patches[:, 0::2], patches[:, 1::2]
    s_a, s_b = patch_size[:, 0::2].to(x.dtype), patch_size[:, 1::2].to(x.dtype)

    def rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    src_size = s_a.gather(1, src)
    total = s_b.scatter_add(1, dst, src_size)  # B sizes after the merge
    weighted = (x_b * s_b.unsqueeze(-1)).scatter_add(
        1, dst.unsqueeze(-1).expand(-1, -1, channels), rows(x_a, src) * src_size.unsqueeze(-1)
    )
    touched = torch.zeros_like(s_b, dtype=torch.bool).scatter_(1, dst, True)
    merged_b = torch.where(touched.unsqueeze(-1), weighted / total.unsqueeze(-1), x_b)  # untouched B: unchanged
    out = torch.cat([prefix, rows(x_a, kept), merged_b], dim=1)
    out_size = torch.cat([prefix_size, patch_size[:, 0::2].gather(1, kept), total.to(size.dtype)], dim=1)
    return out, out_size


def get_tome_patch(model: nn.Module) -> Optional["ToMePatch"]:
    """The :class:`ToMePatch` of a model patched by :func:`apply_tome`, or None."""
    return getattr(find_vision_transformer(model), "_tome_patch", None)


class ToMePatch(SizedFeatures):
    """What :func:`apply_tome` adds to one VisionTransformer; owns its hooks and per-forward state."""

    method = "ToMe"

    def __init__(self, vit: nn.Module, r: List[int], prop_attn: bool) -> None:
        self.vit = vit
        self.r = r
        self.prop_attn = prop_attn
        self.state = ThreadState()

    def reset_state(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """patch_embed pre-hook: a new forward pass starts with every token of size 1."""
        self.state.set("size", None)
        self.state.set("metric", None)
        self.state.set("features", None)

    def capture_metric(self, module: nn.Module, args: Tuple[Any, ...], keys: torch.Tensor) -> None:
        """k_norm forward hook: keys ``[B, heads, N, Dh]`` -> metric ``[B, N, Dh]``."""
        self.state.set("metric", keys.mean(dim=1))

    def block_forward(
        self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """timm ``Block.forward`` with proportional attention and the merge between attention and MLP."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal cannot be combined with ToMe token merging")
        block = self.vit.blocks[index]
        size = self.state.get("size")
        if size is not None and size.shape != x.shape[:2]:
            raise RuntimeError(
                f"ToMe token sizes {tuple(size.shape)} do not match the input {tuple(x.shape)} of block {index}; "
                "the per-forward state is stale (was a block skipped?)"
            )
        if self.prop_attn and size is not None:
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            attn_mask = size.log().to(dtype)[:, None, None, :]
        self.state.set("metric", None)
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask)))
        metric = self.state.pop("metric")
        if metric is None:
            raise RuntimeError(f"ToMe could not capture the keys of block {index}: its attention did not call "
                               "attn.k_norm")
        prefix = self.vit.num_prefix_tokens
        r = min(self.r[index], (x.shape[1] - prefix) // 2)
        x, size = tome_merge(x, metric, size, r, prefix)
        self.state.set("size", size)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "forward_intermediates / get_intermediate_layers / features_only are not supported on a ToMe model: "
            "ToMe merges tokens in every block, so block outputs lie on no patch grid; call remove_tome(model) "
            "for dense features (FPET models support them)"
        )

    def install(self) -> None:
        vit = self.vit
        for index, block in enumerate(vit.blocks):
            block.forward = functools.partial(self.block_forward, index)
            block.attn.k_norm.register_forward_hook(self.capture_metric)
        vit.pool = self.pool
        vit.forward_features = self.forward_features
        vit.forward_intermediates = self.forward_intermediates
        vit.patch_embed.register_forward_pre_hook(self.reset_state)
        vit._tome_patch = self

    def uninstall(self) -> None:
        vit = self.vit
        for block in vit.blocks:
            del block.forward
        del vit.pool, vit.forward_features, vit.forward_intermediates
        for module in vit.modules():
            _remove_hooks_of(module, self)
        del vit._tome_patch


def apply_tome(model: nn.Module, r: Union[int, Sequence[int]], *, prop_attn: bool = True) -> nn.Module:
    """Patch a timm VisionTransformer in place to merge ``r`` tokens in every block (module docstring); return it.

    Args:
        model: a timm ``VisionTransformer`` (or a module wrapping one) not patched by FPET or ToMe.
        r: tokens merged per block, an int for every block or one int per block; clipped per block to half the
            patch tokens left.
        prop_attn: add ``log(size)`` to the attention logits (ToMe's proportional attention).
    Raises:
        ValueError: not a timm VisionTransformer, an unsupported block or pooling, a bad ``r``, or a model already
            patched.
    """
    vit = find_vision_transformer(model)
    if getattr(vit, "_tome_patch", None) is not None:
        raise ValueError("apply_tome: this model is already patched with ToMe; call remove_tome(model) first")
    if getattr(vit, "_fpet_patch", None) is not None:
        raise ValueError("apply_tome: this model is patched with FPET; ToMe and FPET cannot be combined "
                         "(call remove_fpet(model) first)")
    depth = len(vit.blocks)

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if count(r):
        schedule = [r] * depth
    elif isinstance(r, (list, tuple)) and len(r) == depth and all(count(v) for v in r):
        schedule = list(r)
    else:
        raise ValueError(f"r must be an int >= 0 or a list of {depth} ints >= 0 (one per block), got {r!r}")
    if vit.attn_pool is not None or vit.global_pool not in _POOLS:
        raise ValueError(f"global_pool={vit.global_pool!r} is not supported by ToMe; use 'token', 'avg', 'avgmax' "
                         "or 'max'")
    for index in range(depth):
        _check_block(vit.blocks[index], index)
    ToMePatch(vit, schedule, prop_attn).install()
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`; outputs equal the unpatched model's, bitwise."""
    vit = find_vision_transformer(model)
    patch = getattr(vit, "_tome_patch", None)
    if patch is None:
        raise ValueError("remove_tome: this model is not patched with ToMe")
    patch.uninstall()
    return model
