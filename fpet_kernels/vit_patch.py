"""``apply_fpet`` / ``remove_fpet``: the FPET drop-in for timm VisionTransformer models (docs/design.md §2).

The patch keeps timm's own modules and forwards:

* the merge block ``L`` gets a forward of its own that differs from timm's ``Block.forward`` only by the merge
  between the attention residual and the MLP; its keys come from a forward hook on ``attn.k_norm`` (the keys after
  any k-norm, before the softmax scale), so the qkv projection runs once and may be wrapped (LoRA, peft, ...);
* every later block keeps timm's forward; a forward pre-hook passes ``attn_mask = log(size)`` (proportional attention,
  step 7), which timm hands to SDPA (fused attention stays on) or adds to the logits;
* the pooling gains the size-weighted mean for ``global_pool='avg'`` (step 8);
* a pre-hook on ``patch_embed`` resets the per-forward state at the start of every forward pass (step 9). The state
  (metric, sizes, grid) is private to each thread;
* timm's feature API (``forward_intermediates``, and through it ``get_intermediate_layers`` and ``features_only``
  models) returns the outputs of blocks after the merge unmerged back onto the patch grid (step 10), or, with
  ``fpet_merged=True``, the merged tokens with their :class:`MergeInfo`; ``prune_intermediate_layers`` refuses to drop
  the merge block; ``forward_head`` refuses merged features that are not the last forward's (their sizes are gone).

``remove_fpet`` removes all of it, leaving the model bit-identical to the unpatched one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import ops
from .backends import BACKENDS
from ._thread_state import ThreadState
from .geometry import Checkerboard
from .merger import TokenMerger
from .vit import find_vision_transformer

__all__ = ["apply_fpet", "remove_fpet", "find_vision_transformer", "get_fpet_patch", "record_merge", "MergeInfo"]

_MERGER_NAME = "token_merger"
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_POOLS = ("token", "avg", "avgmax", "max", "")


def get_fpet_patch(model: nn.Module) -> Optional["FPETPatch"]:
    """The :class:`FPETPatch` of a patched model, or None."""
    return getattr(find_vision_transformer(model, allow_eva=True), "_fpet_patch", None)


@dataclasses.dataclass(frozen=True)
class MergeInfo:
    """The merge of one forward pass: what a dense head needs to put merged tokens back on the patch grid.

    ``index [B, NA]`` int64 is the assignment ``k(i)`` (A cell ``i``, row-major over the A cells, went into token
    ``k(i)`` of the merged sequence); ``size [B, NB]`` the merged tokens' sizes; ``grid_size`` ``(H, W)``,
    ``num_prefix_tokens`` ``P`` and ``layer`` (the merge block) as in that forward."""

    layer: int
    grid_size: Tuple[int, int]
    num_prefix_tokens: int
    index: torch.Tensor
    size: torch.Tensor

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, NB, C]`` tokens after the merge -> ``[B, P + H*W, C]`` (:func:`fpet_kernels.ops.unmerge_tokens`)."""
        return ops.unmerge_tokens(tokens, self.index, self.grid_size, self.num_prefix_tokens)


@contextlib.contextmanager
def record_merge(model: nn.Module) -> Iterator[List[MergeInfo]]:
    """Record the merge of every forward pass of an FPET-patched ``model`` run inside the block (in this thread)::

        with record_merge(model) as merges:
            logits = model(images)
        info = merges[-1]                      # MergeInfo: index, size, grid_size, ...
        dense = info.unmerge(tokens_after_merge)

    While recording, the merge runs through the unfused ops so the assignment can be returned (the same values and
    gradients as the fused op)."""
    patch = get_fpet_patch(model)
    if patch is None:
        raise ValueError("record_merge: this model is not patched with FPET (call apply_fpet first)")
    records: List[MergeInfo] = []
    previous = patch.state.get("recorder")
    patch.state.set("recorder", records)
    try:
        yield records
    finally:
        patch.state.set("recorder", previous)


class SizedFeatures:
    """Pooling of merged tokens (step 8), shared by the FPET and ToMe patches: ``pool`` replaces the ViT's, with the
    size-weighted mean for 'avg' / 'avgmax' over the sizes of the forward that made the features
    (:func:`checked_sizes`); ``forward_features`` is timm's, remembering its output. Needs ``vit``, ``state``."""

    method = ""
    vit: nn.Module
    state: ThreadState

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.vit.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):  # the sizes do not matter
            return type(self.vit).pool(self.vit, x, pool_type)
        return sized_pool(self.vit, x, checked_sizes(self.vit, self.state, x, self.method), pool_type)

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """timm's ``forward_features``, remembering its output: the features whose sizes ``pool`` may use."""
        features = type(self.vit).forward_features(self.vit, x, *args, **kwargs)
        self.state.set("features", features)
        return features


class FPETPatch(SizedFeatures):
    """What ``apply_fpet`` adds to one VisionTransformer; owns its hooks and per-forward state."""

    method = "FPET"

    def __init__(self, vit: nn.Module, layer: int, prop_attn: bool) -> None:
        self.vit = vit
        self.layer = layer
        self.prop_attn = prop_attn
        self.eva = _is_eva(vit)
        self.state = ThreadState()

    # ------------------------------------------------------------------ per-forward state (docs/design.md §2 step 9)
    def reset_state(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """patch_embed pre-hook: a new forward pass starts; record its patch grid."""
        self.state.set("size", None)
        self.state.set("metric", None)
        self.state.set("features", None)
        self.state.set("capture", False)
        patch_embed = self.vit.patch_embed
        if getattr(self.vit, "dynamic_img_size", False):
            grid = patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:]))
        else:
            grid = patch_embed.grid_size
            expected, got = tuple(patch_embed.img_size), tuple(args[0].shape[-2:])
            if getattr(patch_embed, "strict_img_size", False) and got != expected:
                raise ValueError(
                    f"images are {got[0]}x{got[1]} but this model takes {expected[0]}x{expected[1]} (a fixed patch "
                    "grid); resize the images, call model.set_input_size(img_size=...) first, or build the model "
                    "with dynamic_img_size=True"
                )
        self.state.set("grid_size", tuple(int(g) for g in grid))

    def capture_metric(self, module: nn.Module, args: Tuple[Any, ...], keys: torch.Tensor) -> None:
        """k_norm forward hook: keys ``[B, heads, N, Dh]`` -> metric ``[B, N, Dh]`` while the merge block's attention
        runs. It is on every block's ``k_norm``, not the merge block's alone: after a graph break inside attention,
        torch.compile reuses the rest of ``Attention.forward`` compiled for another block without checking hooks."""
        if self.state.get("capture"):
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
        self.state.set("capture", True)
        x_attn = block.attn(block.norm1(x), attn_mask=attn_mask, **causal)
        self.state.set("capture", False)
        x = self.merge(x + block.drop_path1(block.ls1(x_attn)))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x

    def eva_merge_block_forward(
        self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """timm ``EvaBlock.forward`` with the token merge between the attention residual and the MLP."""
        block = self.vit.blocks[self.layer]
        self.state.set("metric", None)
        self.state.set("capture", True)
        x_attn = block.attn(block.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        self.state.set("capture", False)
        if block.gamma_1 is not None:
            x_attn = block.gamma_1 * x_attn
        x = self.merge(x + block.drop_path1(x_attn))
        x_mlp = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            x_mlp = block.gamma_2 * x_mlp
        return x + block.drop_path2(x_mlp)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 2-6 on the residual stream ``x`` after the merge block's attention, whose keys were captured."""
        metric = self.state.pop("metric")
        if metric is None:
            hint = (" (under torch.compile: torch.compile(model, fullgraph=True) names any graph break)"
                    if torch.compiler.is_compiling() else "")
            raise RuntimeError(
                f"FPET could not capture the keys of block {self.layer}: its attention did not call attn.k_norm{hint}"
            )
        block = self.vit.blocks[self.layer]
        grid_size = self.state.get("grid_size") or tuple(self.vit.patch_embed.grid_size)
        prefix = self.vit.num_prefix_tokens
        recorder = self.state.get("recorder")
        if recorder is None:
            x, size = getattr(block, _MERGER_NAME)(x, metric, None, grid_size, prefix)
        else:
            x, size, index = getattr(block, _MERGER_NAME)(x, metric, None, grid_size, prefix, return_index=True)
            recorder.append(MergeInfo(self.layer, tuple(grid_size), prefix, index, size))
        self.state.set("size", size)
        return x

    # ------------------------------------------------------------------ later blocks (step 7)
    def later_block(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        """Forward pre-hook of each block after the merge block: proportional attention, ``attn_mask =
        log(size)[:, None, None, :]`` (step 7); for Eva also the rotary embedding of the kept B cells (step 7a)."""
        size = self.state.get("size")
        if size is None:
            return None
        x = args[0] if args else kwargs["x"]
        if x.shape[:2] != size.shape:
            raise RuntimeError(
                f"FPET token sizes {tuple(size.shape)} do not match the block input {tuple(x.shape)}; "
                "the per-forward state is stale (was the merge block skipped?)"
            )
        if self.eva:
            if len(args) > 1:  # rope given by position: make it a keyword
                kwargs = dict(kwargs, rope=args[1])
                args = args[:1]
            rope = kwargs.get("rope")
            if rope is not None:
                grid = self.state.get("grid_size") or tuple(self.vit.patch_embed.grid_size)
                cells = Checkerboard.of(grid, 0).indices(rope.device)[1]  # the B cells, row-major
                kwargs = dict(kwargs, rope=rope.index_select(-2, cells))
        if not self.prop_attn:
            return args, kwargs
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("attn_mask / is_causal cannot be combined with FPET token merging")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        kwargs = dict(kwargs, attn_mask=size.log().to(dtype)[:, None, None, :])
        return args, kwargs

    # ------------------------------------------------------------------ timm's feature API (step 10)
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        fpet_merged: bool = False,
        **kwargs: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``VisionTransformer.forward_intermediates`` (same arguments, outputs and shapes), with the outputs
        of the merge block and later blocks, and the final features, unmerged onto the patch grid
        (:func:`ops.unmerge_tokens`): each patch takes the value of the token it was merged into. The final
        features then pool as the merged ones do (a token of size s appears s times).

        ``fpet_merged=True`` returns the merged tokens instead, as a dict (``output_fmt='NLC'`` only):
        ``image_intermediates`` (patch tokens; the merged ones for blocks from the merge block on),
        ``image_intermediates_prefix`` (when there are prefix tokens), ``image_features`` (unless
        ``intermediates_only``) and ``fpet_merge``, the forward's :class:`MergeInfo` (None when ``stop_early``
        stopped before the merge block)."""
        from timm.models._features import feature_take_indices

        vit = self.vit
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if fpet_merged and output_fmt != "NLC":
            raise ValueError("fpet_merged=True returns merged tokens, which lie on no grid: pass output_fmt='NLC'")
        take_indices, _ = feature_take_indices(len(vit.blocks), indices)
        prefix = vit.num_prefix_tokens
        with record_merge(vit) as merges:
            # timm's own loop; in NLC, with the prefix tokens (Eva's takes no output_dict)
            result = type(vit).forward_intermediates(
                vit, x, indices, return_prefix_tokens=prefix > 0, norm=norm, stop_early=stop_early,
                output_fmt="NLC", intermediates_only=intermediates_only, **kwargs,
            )
        info = merges[-1] if merges else None
        final, items = (None, result) if intermediates_only else result
        patches = [item[0] for item in items] if prefix > 0 else list(items)
        prefixes = [item[1] for item in items] if prefix > 0 else None
        if not fpet_merged and info is not None:
            for position, block in enumerate(sorted(take_indices)):
                if block >= self.layer:
                    tokens = patches[position] if prefixes is None else torch.cat([prefixes[position],
                                                                                   patches[position]], dim=1)
                    patches[position] = info.unmerge(tokens)[:, prefix:]
            final = None if final is None else info.unmerge(final)
        if output_fmt == "NCHW":
            height, width = info.grid_size if info is not None else self.state.get("grid_size")
            patches = [y.reshape(y.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
        if output_dict or fpet_merged:
            out: Dict[str, Any] = {"image_intermediates": patches}
            if return_prefix_tokens and prefixes is not None:
                out["image_intermediates_prefix"] = prefixes
            if final is not None:
                out["image_features"] = final
            if fpet_merged:
                out["fpet_merge"] = info
            return out
        if return_prefix_tokens and prefixes is not None:
            patches = list(zip(patches, prefixes))
        return patches if intermediates_only else (final, patches)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's ``prune_intermediate_layers``, refused when it would drop the merge block."""
        from timm.models._features import feature_take_indices

        vit = self.vit
        _, max_index = feature_take_indices(len(vit.blocks), indices)
        if max_index < self.layer:
            raise ValueError(
                f"prune_intermediate_layers(indices={indices!r}) keeps blocks 0..{max_index} and would drop FPET's "
                f"merge block {self.layer}: apply FPET at a layer <= {max_index}, or call remove_fpet(model) first"
            )
        return type(vit).prune_intermediate_layers(vit, indices, prune_norm=prune_norm, prune_head=prune_head)

    # ------------------------------------------------------------------ install / remove
    def install(self, merger: TokenMerger) -> None:
        vit = self.vit
        merge_block = vit.blocks[self.layer]
        merge_block.add_module(_MERGER_NAME, merger)
        merge_block.forward = self.eva_merge_block_forward if self.eva else self.merge_block_forward
        vit.pool = self.pool
        vit.forward_features = self.forward_features
        vit.forward_intermediates = self.forward_intermediates
        vit.prune_intermediate_layers = self.prune_intermediate_layers
        vit.patch_embed.register_forward_pre_hook(self.reset_state)
        for block in vit.blocks:
            if isinstance(getattr(getattr(block, "attn", None), "k_norm", None), nn.Module):
                block.attn.k_norm.register_forward_hook(self.capture_metric)
        if self.prop_attn or self.eva:
            for block in list(vit.blocks)[self.layer + 1:]:
                block.register_forward_pre_hook(self.later_block, with_kwargs=True)
        vit._fpet_patch = self

    def uninstall(self) -> None:
        vit = self.vit
        merge_block = vit.blocks[self.layer]
        del merge_block._modules[_MERGER_NAME]
        del merge_block.forward
        del vit.pool, vit.forward_features, vit.forward_intermediates, vit.prune_intermediate_layers
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
    start = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
    tokens, weights = x[:, start:], size[:, start:].to(x.dtype).unsqueeze(-1)
    mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


def checked_sizes(vit: nn.Module, state: ThreadState, x: torch.Tensor, method: str) -> Optional[torch.Tensor]:
    """The token sizes to pool features ``x`` with: the last forward's when ``x`` is the output of this thread's last
    ``forward_features`` (or a view of it with the same storage, e.g. ``.detach()``); None for features on the full
    grid (unmerged ones, whose plain mean is right); else ValueError: merged tokens from another forward carry no
    sizes, and the last forward's would be silently wrong."""
    features = state.get("features")
    if features is not None:
        same = features is x
        if not same and not torch.compiler.is_compiling():
            same = (x.shape == features.shape and x.stride() == features.stride()
                    and x.data_ptr() == features.data_ptr())
        if same:
            return state.get("size")
    grid = state.get("grid_size") or tuple(vit.patch_embed.grid_size)
    if x.dim() != 3 or x.shape[1] == vit.num_prefix_tokens + math.prod(grid):
        return None
    raise ValueError(
        f"forward_head got {method} features {tuple(x.shape)} with merged tokens that are not the output of this "
        "thread's last forward_features, so their token sizes are unknown. Call forward_head right after the "
        "forward_features that made them, or pool the unmerged features of model.forward_intermediates(...)"
    )


def _remove_hooks_of(module: nn.Module, owner: object) -> None:
    """Remove the hooks of ``module`` that are bound methods of ``owner`` (also works on deep copies)."""
    for hooks, extra in (
        (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
        (module._forward_hooks, module._forward_hooks_with_kwargs),
    ):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is owner]:
            del hooks[key]
            extra.pop(key, None)


def _is_eva(vit: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(vit, Eva)


_EVA_BLOCK_PARTS = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")


def _check_block(block: nn.Module, index: int) -> None:
    """ValueError unless ``block`` is timm's pre-norm ``Block`` (or ``EvaBlock``) whose attention calls
    ``attn.k_norm`` on its keys, the layout the merge block's forward is written for."""
    name = type(block).__name__
    if name == "EvaBlockPostNorm":
        raise ValueError(
            f"block {index} is an EvaBlockPostNorm (use_post_norm=True): it normalises after the attention and the "
            "MLP, and FPET's merge block forward is written for pre-norm blocks (EvaBlock, Block)"
        )
    parts = _EVA_BLOCK_PARTS if name == "EvaBlock" else _BLOCK_PARTS
    missing = [part for part in parts if not hasattr(block, part)]
    if missing or not hasattr(block.attn, "k_norm"):
        raise ValueError(
            f"block {index} ({name}) is not a timm pre-norm Block or EvaBlock with "
            f"{', '.join(parts)} and attn.k_norm (missing: {', '.join(missing) or 'attn.k_norm'}); "
            "FPET supports timm's Block and EvaBlock"
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
        model: a timm ``VisionTransformer`` (vit_*, deit_* incl. distilled, register-token models) or ``Eva``
            (eva02_*, vit_*_rope_*: RoPE, SwiGLU; pre-norm blocks), or a module wrapping one (e.g. a peft model).
        layer: merge block index, default ``depth // 2``; tokens go from ``P + H*W`` to ``P + floor(H*W / 2)``.
        refine_dim, refine_bits, refine_scale, refine_dropout: the key refinement adapter (see
            :class:`~fpet_kernels.merger.TokenMerger`); ``refine_dim=0`` disables it.
        prop_attn: add ``log(size)`` to the attention logits of later blocks.
        backend: kernel backend for the merge ops.
    Raises:
        ValueError: not a timm VisionTransformer or Eva, unsupported block or pooling, patch dropout, ``layer``
            out of range, a grid with fewer than 2 patches, or a model that is already patched.
    """
    vit = find_vision_transformer(model, allow_eva=True)
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
    if getattr(vit.patch_drop, "prob", 0.0) > 0.0:
        raise ValueError(
            f"patch_drop_rate={vit.patch_drop.prob} is not supported by FPET: patch dropout removes random patches "
            "in training, so the tokens no longer lie on the patch grid FPET's checkerboard merges on; build the "
            "model with patch_drop_rate=0"
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
    vit = find_vision_transformer(model, allow_eva=True)
    patch = getattr(vit, "_fpet_patch", None)
    if patch is None:
        raise ValueError("remove_fpet: this model is not patched with FPET")
    patch.uninstall()
    return model
