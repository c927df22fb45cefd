"""SKIP for timm ViTs: find the FFN neurons a (prompt-)tuned task uses, keep only those (docs/design.md §10).

SKIP (skill-localized prompt tuning) carried to ViTs, as functions for each step and one entry point:

1. prompt-tune the model (``add_pet(model, "vpt-shallow")`` + head, backbone frozen: :func:`fpet_kernels.train.fit`);
2. :func:`attribute_ffn`: the attribution of FFN neuron ``n`` of block ``l``, on the output ``h`` (``[B, N, F]``) of
   the block's ``mlp.act``::

       A[l, n] = mean over examples of ( mean over tokens t of | h[t, n] * d z_y / d h[t, n] | )

   ``z_y`` the gold-class logit, the model in eval mode; one forward and one backward per batch, hooks on every
   ``mlp.act`` (no per-neuron loop). On an FPET-patched model the blocks from the merge on see merged tokens: their
   token mean is weighted by the token sizes (a merged token stands for ``size`` patches), so it equals the mean over
   the patches. The same pass records each neuron's mean activation (weighted the same way), for the bias fold.
3. :func:`select_neurons`: per layer the top ``ceil(keep_ratio * F)`` neurons, or a global ranking over all layers
   with a per-layer minimum;
4. :func:`prune_ffn`: ``fc1`` keeps rows ``S`` (weight and bias), ``fc2`` keeps columns ``S``, as new smaller
   ``nn.Linear`` modules; optionally the removed neurons' mean activation is folded into ``fc2.bias``
   (``+= W2[:, removed] @ mean_act[removed]``);
5. re-tune the prompts and head on the pruned model (``fit`` again).

:func:`skip_prune` runs steps 2-4 on a tuned model and returns what changed (:class:`SkipReport`); ``fpet skip``
(:func:`fpet_kernels.skip_run.run_skip`) runs all five on a data set and reports accuracy, parameters, GFLOPs and
measured throughput.

The kept indices (into the original FFN width) are recorded on the ViT (:func:`skip_config`), so
:func:`~fpet_kernels.save_pet` stores them and :func:`~fpet_kernels.load_pet` prunes a fresh backbone the same way.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .vit import find_vision_transformer

__all__ = [
    "SELECTIONS",
    "FFNAttribution",
    "SkipReport",
    "check_keep_ratio",
    "attribute_ffn",
    "select_neurons",
    "prune_ffn",
    "skip_config",
    "ffn_parameters",
    "skip_prune",
]

SELECTIONS = ("layer", "global")
_SKIP_ATTR = "_fpet_skip"  # on the ViT: {"hidden": [F per block], "kept": {block: LongTensor}, "folded": [blocks]}


# ---------------------------------------------------------------------------------------------- checks
def check_keep_ratio(keep_ratio: Any, name: str = "keep_ratio") -> float:
    """``keep_ratio`` as a float in ``(0, 1]``; ValueError naming ``name`` otherwise (0, > 1, NaN, inf, non-numbers)."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {keep_ratio!r}")
    value = float(keep_ratio)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the share of FFN neurons kept), got {keep_ratio!r}")
    return value


def _mlps(vit: nn.Module) -> List[nn.Module]:
    """Every block's ``mlp``, checked to be timm's ``Mlp`` shape that can be pruned structurally."""
    mlps = []
    for index, block in enumerate(vit.blocks):
        mlp = getattr(block, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("fc1", "act", "fc2")]
        if mlp is None or any(part is None for part in parts):
            raise ValueError(
                f"block {index}: SKIP prunes timm's Mlp (fc1 -> act -> fc2); {type(mlp).__name__} has no fc1 / act / fc2"
            )
        if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise ValueError(
                f"block {index}: mlp.fc1 / mlp.fc2 must be plain nn.Linear to be pruned, got "
                f"{type(mlp.fc1).__name__} / {type(mlp.fc2).__name__}"
            )
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(
                f"block {index}: the Mlp normalises its hidden features ({type(mlp.norm).__name__}), which pruning "
                "would change; SKIP needs an Mlp without a hidden norm"
            )
        if mlp.fc1.out_features != mlp.fc2.in_features:
            raise ValueError(f"block {index}: fc1 has {mlp.fc1.out_features} outputs but fc2 {mlp.fc2.in_features} "
                             "inputs (a gated Mlp?); SKIP prunes fc1 -> act -> fc2")
        mlps.append(mlp)
    return mlps


# ---------------------------------------------------------------------------------------------- attribution
@dataclasses.dataclass
class FFNAttribution:
    """What :func:`attribute_ffn` measured.

    Attributes:
        scores: ``[L, F]`` float64, ``A[l, n]`` of the module docstring (``F`` the widest FFN; narrower layers are
            padded with NaN).
        mean_activation: ``[L, F]`` float64, each neuron's mean activation (mean over tokens, size-weighted on merged
            tokens, then over examples), NaN-padded like ``scores``.
        widths: each layer's FFN width.
        num_examples: the examples it was measured on.
    """

    scores: torch.Tensor
    mean_activation: torch.Tensor
    widths: List[int]
    num_examples: int


def _token_sizes(vit: nn.Module, h: torch.Tensor) -> Optional[torch.Tensor]:
    """The FPET token sizes of this forward if ``h`` is over merged tokens, else None (every token counts once)."""
    patch = getattr(vit, "_fpet_patch", None)
    if patch is None:
        return None
    size = patch.state.get("size")
    if size is None or tuple(size.shape) != tuple(h.shape[:2]):
        return None
    return size


def attribute_ffn(
    model: nn.Module,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    *,
    max_batches: Optional[int] = None,
    progress: bool = False,
) -> FFNAttribution:
    """The attribution of every FFN neuron of the model's ViT (module docstring, step 2) over ``(images, labels)``
    batches (e.g. the training DataLoader); ``max_batches`` stops early. The model is put in eval mode for the
    measurement and back in its previous mode after it; no parameter's ``.grad`` is touched.

    Raises:
        ValueError: a block whose mlp is not timm's ``Mlp``; a ToMe-patched model (its merged token sizes are not
            tracked here; apply ToMe after pruning); no batches; labels outside the model's classes.
    """
    vit = find_vision_transformer(model)
    if getattr(vit, "_tome_patch", None) is not None:
        raise ValueError("attribute_ffn: the model is patched with ToMe; attribute and prune first, then apply_tome")
    mlps = _mlps(vit)
    widths = [mlp.fc1.out_features for mlp in mlps]
    width = max(widths)
    device = next(vit.parameters()).device
    sums = torch.zeros(len(mlps), width, dtype=torch.float64, device=device)
    act_sums = torch.zeros_like(sums)
    captured: List[Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = [None] * len(mlps)

    def hook(index: int):
        def record(module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> None:
            captured[index] = (output, _token_sizes(vit, output))
        return record

    handles = [mlp.act.register_forward_hook(hook(i)) for i, mlp in enumerate(mlps)]
    was_training = model.training
    model.eval()
    examples = 0
    try:
        from tqdm import tqdm
        import sys

        iterator = tqdm(batches, desc="attribution", disable=not progress, leave=False, unit="batch", file=sys.stderr)
        for index, (images, labels) in enumerate(iterator):
            if max_batches is not None and index >= max_batches:
                break
            images = images.to(device)
            labels = labels.to(device)
            with torch.enable_grad():
                # the images require grad so every activation does, even with the whole model frozen
                logits = model(images.detach().requires_grad_(True))
                if labels.min() < 0 or labels.max() >= logits.shape[-1]:
                    raise ValueError(f"attribute_ffn: labels must be in [0, {logits.shape[-1]}), got "
                                     f"[{int(labels.min())}, {int(labels.max())}]")
                gold = logits.gather(1, labels.view(-1, 1)).sum()
                if any(item is None for item in captured):
                    raise RuntimeError("attribute_ffn: some block's mlp.act did not run in the forward")
                hs = [item[0] for item in captured]
                grads = torch.autograd.grad(gold, hs, allow_unused=True)
            for layer, ((h, size), grad) in enumerate(zip(captured, grads)):
                h = h.detach().double()
                contribution = (h * grad.double()).abs() if grad is not None else torch.zeros_like(h)
                if size is None:
                    weights = torch.full(h.shape[:2], 1.0 / h.shape[1], dtype=torch.float64, device=h.device)
                else:
                    weights = size.detach().double()
                    weights = weights / weights.sum(dim=1, keepdim=True)
                sums[layer, : widths[layer]] += torch.einsum("bt,btf->f", weights, contribution)
                act_sums[layer, : widths[layer]] += torch.einsum("bt,btf->f", weights, h)
            examples += int(labels.numel())
            captured = [None] * len(mlps)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if examples == 0:
        raise ValueError("attribute_ffn: no examples (the batches were empty)")
    scores, means = sums / examples, act_sums / examples
    for layer, w in enumerate(widths):
        scores[layer, w:] = float("nan")
        means[layer, w:] = float("nan")
    return FFNAttribution(scores.cpu(), means.cpu(), widths, examples)


# ---------------------------------------------------------------------------------------------- selection
def select_neurons(
    scores: torch.Tensor,
    keep_ratio: float,
    *,
    selection: str = "layer",
    min_keep_ratio: float = 0.1,
    widths: Optional[Sequence[int]] = None,
) -> List[torch.Tensor]:
    """The neurons to keep, per layer: sorted int64 indices.

    Args:
        scores: ``[L, F]`` attributions (:attr:`FFNAttribution.scores`); higher is kept first; ties go to the lower
            index.
        keep_ratio: in ``(0, 1]``: ``"layer"`` keeps ``ceil(keep_ratio * F_l)`` neurons in every layer; ``"global"``
            keeps ``ceil(keep_ratio * sum F_l)`` in all, the highest scores over all layers, with at least
            ``ceil(min_keep_ratio * F_l)`` (and 1) in every layer.
        selection: ``"layer"`` or ``"global"``.
        min_keep_ratio: the global ranking's per-layer minimum, in ``(0, 1]`` and at most ``keep_ratio``.
        widths: each layer's width (default: ``F`` for every layer).
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [layers, neurons], got {getattr(scores, 'shape', scores)!r}")
    widths = [scores.shape[1]] * scores.shape[0] if widths is None else [int(w) for w in widths]
    if len(widths) != scores.shape[0] or any(not 1 <= w <= scores.shape[1] for w in widths):
        raise ValueError(f"widths must give each of the {scores.shape[0]} layers a width in [1, {scores.shape[1]}], "
                         f"got {widths}")
    rows = [scores[layer, :w].double() for layer, w in enumerate(widths)]
    if any(not torch.isfinite(row).all() for row in rows):
        raise ValueError("scores must be finite within each layer's width")

    def top(row: torch.Tensor, k: int) -> torch.Tensor:
        # stable descending order: equal scores keep the lower index first
        order = torch.sort(row, descending=True, stable=True).indices
        return order[:k]

    if selection == "layer":
        return [torch.sort(top(row, max(1, math.ceil(keep_ratio * w)))).values for row, w in zip(rows, widths)]
    min_keep_ratio = check_keep_ratio(min_keep_ratio, "min_keep_ratio")
    if min_keep_ratio > keep_ratio:
        raise ValueError(f"min_keep_ratio ({min_keep_ratio}) must be at most keep_ratio ({keep_ratio})")
    total = math.ceil(keep_ratio * sum(widths))
    chosen = [set(top(row, max(1, math.ceil(min_keep_ratio * w))).tolist()) for row, w in zip(rows, widths)]
    left = total - sum(len(c) for c in chosen)
    if left > 0:
        candidates = [(float(row[n]), -layer, -n, layer, n) for layer, row in enumerate(rows)
                      for n in range(len(row)) if n not in chosen[layer]]
        candidates.sort(reverse=True)  # highest score first; ties: lower layer, then lower index
        for *_, layer, n in candidates[:left]:
            chosen[layer].add(n)
    return [torch.tensor(sorted(c), dtype=torch.int64) for c in chosen]


# ---------------------------------------------------------------------------------------------- pruning
def skip_config(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The pruning of the model's ViT, or None if it was not pruned: ``{"hidden": [original F per block], "kept":
    {block: sorted int64 indices into the original FFN}, "folded": [blocks whose removed neurons were folded into
    fc2.bias]}`` (copies)."""
    record = getattr(find_vision_transformer(model), _SKIP_ATTR, None)
    if record is None:
        return None
    return {"hidden": list(record["hidden"]), "kept": {int(k): v.clone() for k, v in record["kept"].items()},
            "folded": list(record["folded"])}


def _new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], like: nn.Linear) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(like.weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_((like.weight if like.bias is None else like.bias).requires_grad)
    return linear.train(like.training)


def prune_ffn(
    model: nn.Module,
    kept: Sequence[Optional[torch.Tensor]],
    *,
    mean_activation: Optional[torch.Tensor] = None,
    fold_bias: bool = False,
) -> nn.Module:
    """Cut every block's FFN down to the neurons ``kept[l]`` (indices into its current width; None leaves the block
    as it is) in place and return ``model`` (module docstring, step 4).

    ``fold_bias=True`` adds the removed neurons' contribution at their mean activation to ``fc2.bias``
    (``mean_activation``: ``[L, >= F]``, :attr:`FFNAttribution.mean_activation`); exact when those activations are
    constant. Pruning a pruned model composes (the record keeps indices into the original width).

    Raises:
        ValueError: not one entry per block; indices not 1-D integers, repeated, out of range or empty;
            ``fold_bias`` without ``mean_activation`` (or with NaN where a removed neuron is); an Mlp that cannot be
            pruned (see :func:`attribute_ffn`).
    """
    vit = find_vision_transformer(model)
    mlps = _mlps(vit)
    if len(kept) != len(mlps):
        raise ValueError(f"kept must have one entry per block ({len(mlps)}), got {len(kept)}")
    if not isinstance(fold_bias, bool):
        raise ValueError(f"fold_bias must be a bool, got {fold_bias!r}")
    if fold_bias and mean_activation is None:
        raise ValueError("fold_bias=True needs mean_activation (FFNAttribution.mean_activation)")
    plans = []
    for layer, (mlp, indices) in enumerate(zip(mlps, kept)):
        if indices is None:
            plans.append(None)
            continue
        width = mlp.fc1.out_features
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"kept[{layer}] must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        indices = indices.to(torch.int64).cpu()
        if indices.numel() == 0:
            raise ValueError(f"kept[{layer}] is empty: a block needs at least one FFN neuron")
        if int(indices.min()) < 0 or int(indices.max()) >= width:
            raise ValueError(f"kept[{layer}] must index the block's {width} FFN neurons, got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        indices = torch.sort(indices).values
        if indices.unique().numel() != indices.numel():
            raise ValueError(f"kept[{layer}] repeats neurons")
        if fold_bias:
            if mean_activation.dim() != 2 or mean_activation.shape[0] != len(mlps) or mean_activation.shape[1] < width:
                raise ValueError(f"mean_activation must be [{len(mlps)}, >= {width}], got "
                                 f"{tuple(mean_activation.shape)}")
            removed = torch.ones(width, dtype=torch.bool)
            removed[indices] = False
            if not torch.isfinite(mean_activation[layer, :width][removed]).all():
                raise ValueError(f"mean_activation of block {layer} is not finite for a removed neuron")
        plans.append(indices)

    record = getattr(vit, _SKIP_ATTR, None)
    if record is None:
        record = {"hidden": [mlp.fc1.out_features for mlp in mlps], "kept": {}, "folded": []}
    for layer, (mlp, indices) in enumerate(zip(mlps, plans)):
        if indices is None or indices.numel() == mlp.fc1.out_features:  # nothing removed, nothing to fold
            continue
        fc1, fc2 = mlp.fc1, mlp.fc2
        device_indices = indices.to(fc1.weight.device)
        with torch.no_grad():
            w1 = fc1.weight.index_select(0, device_indices)
            b1 = None if fc1.bias is None else fc1.bias.index_select(0, device_indices)
            w2 = fc2.weight.index_select(1, device_indices)
            b2 = None if fc2.bias is None else fc2.bias.clone()
            if fold_bias:
                removed = torch.ones(fc1.out_features, dtype=torch.bool, device=fc1.weight.device)
                removed[device_indices] = False
                mean = mean_activation[layer, : fc1.out_features].to(fc2.weight)
                shift = fc2.weight[:, removed] @ mean[removed]
                b2 = shift if b2 is None else b2 + shift
        mlp.fc1 = _new_linear(w1, b1, fc1)
        mlp.fc2 = _new_linear(w2, b2, fc2)
        previous = record["kept"].get(layer)
        record["kept"][layer] = indices if previous is None else previous[indices]
        if fold_bias and layer not in record["folded"]:
            record["folded"].append(layer)
    record["folded"].sort()
    if record["kept"]:  # nothing pruned (every neuron kept): the model stays an unpruned one
        setattr(vit, _SKIP_ATTR, record)
    return model


def _restore_ffn(model: nn.Module, saved: Dict[int, Tuple[nn.Module, nn.Module]], record: Optional[Dict]) -> None:
    """Put back the fc1 / fc2 modules ``saved`` before a pruning and the earlier record (load_pet's undo)."""
    vit = find_vision_transformer(model)
    for layer, (fc1, fc2) in saved.items():
        vit.blocks[layer].mlp.fc1 = fc1
        vit.blocks[layer].mlp.fc2 = fc2
    if record is None:
        vit.__dict__.pop(_SKIP_ATTR, None)
    else:
        setattr(vit, _SKIP_ATTR, record)


def ffn_parameters(model: nn.Module) -> int:
    """Parameters of the FFN Linears (fc1 and fc2 of every block's mlp)."""
    vit = find_vision_transformer(model)
    return sum(p.numel() for block in vit.blocks for name in ("fc1", "fc2")
               for p in getattr(block.mlp, name).parameters())


# ---------------------------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class SkipReport:
    """What :func:`skip_prune` did.

    Attributes:
        keep_ratio, selection, fold_bias: the settings.
        kept: per block, the number of FFN neurons kept; ``widths``: the widths before.
        params_before, params_after: all parameters of the model.
        ffn_params_before, ffn_params_after: those of the FFN Linears.
        attribution: the :class:`FFNAttribution` used.
    """

    keep_ratio: float
    selection: str
    fold_bias: bool
    kept: List[int]
    widths: List[int]
    params_before: int
    params_after: int
    ffn_params_before: int
    ffn_params_after: int
    attribution: FFNAttribution

    @property
    def removed_share_of_all(self) -> float:
        """Parameters removed, as a share of all the model's parameters before."""
        return (self.params_before - self.params_after) / self.params_before

    @property
    def removed_share_of_ffn(self) -> float:
        """Parameters removed, as a share of the FFN parameters before."""
        return (self.ffn_params_before - self.ffn_params_after) / self.ffn_params_before


def skip_prune(
    model: nn.Module,
    batches: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
    keep_ratio: float = 0.5,
    *,
    selection: str = "layer",
    min_keep_ratio: float = 0.1,
    fold_bias: bool = True,
    attribution: Optional[FFNAttribution] = None,
    max_batches: Optional[int] = None,
    progress: bool = False,
) -> SkipReport:
    """SKIP's steps 2-4 on a tuned model, in place: :func:`attribute_ffn` over ``batches`` (or the given
    ``attribution``, e.g. to prune one tuned model at several keep ratios), :func:`select_neurons`,
    :func:`prune_ffn`. Re-tune the prompts and head afterwards (step 5). Returns a :class:`SkipReport`."""
    keep_ratio = check_keep_ratio(keep_ratio)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if attribution is None:
        if batches is None:
            raise ValueError("skip_prune needs batches (images, labels) to attribute, or an attribution")
        attribution = attribute_ffn(model, batches, max_batches=max_batches, progress=progress)
    vit = find_vision_transformer(model)
    widths = [mlp.fc1.out_features for mlp in _mlps(vit)]
    if widths != attribution.widths:
        raise ValueError(f"the attribution is for FFN widths {attribution.widths}, the model has {widths}")
    params_before = sum(p.numel() for p in model.parameters())
    ffn_before = ffn_parameters(model)
    kept = select_neurons(attribution.scores, keep_ratio, selection=selection, min_keep_ratio=min_keep_ratio,
                          widths=widths)
    prune_ffn(model, kept, mean_activation=attribution.mean_activation, fold_bias=fold_bias)
    return SkipReport(
        keep_ratio=keep_ratio, selection=selection, fold_bias=fold_bias, kept=[int(k.numel()) for k in kept],
        widths=widths, params_before=params_before, params_after=sum(p.numel() for p in model.parameters()),
        ffn_params_before=ffn_before, ffn_params_after=ffn_parameters(model), attribution=attribution,
    )
