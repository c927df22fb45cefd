"""Backbones for ``fpet train`` / ``fpet eval``: the shipped pocket ViT, and timm ViTs with optional local weights.

Not imported by ``import fpet_kernels``; use ``from fpet_kernels import models``. Nothing here downloads anything:
timm models are always built with ``pretrained=False`` and weights come only from local files.

* :data:`POCKET_VIT` and :func:`pocket_vit`: a small timm ``VisionTransformer`` for 64x64 inputs (pocket-VTAB,
  :mod:`fpet_kernels.data`) whose pretrained weights ship with the package, ``fpet_kernels/weights/
  pocket_vit.safetensors`` (:func:`pocket_vit_path`), written by ``python python/pretrain_backbone.py``. It was
  pretrained from scratch on a formula-driven task (fractal attractors of random iterated function systems,
  FractalDB-style) that shares no image source or label with pocket-VTAB; ``pocket_vit_linear_probe.json`` next
  to the weights holds its linear-probe accuracy on pocket-VTAB against the same architecture with random weights.
* :func:`create_model`: ``"pocket-vit"``, or any timm VisionTransformer name (:data:`MODEL_NAMES` lists examples)
  with an optional local checkpoint.

Weights file format (``pocket_vit.safetensors``)
    Tensors: the backbone's ``state_dict()`` without the classifier head (``patch_embed.proj.weight``, ``cls_token``,
    ``pos_embed``, ``blocks.*``, ``norm.*``), all float32, plus the pretraining head as ``upstream_head.weight``
    ``[U, D]`` and ``upstream_head.bias`` ``[U]`` (``U`` upstream classes), which :func:`pocket_vit` never loads into
    a model; :func:`pocket_vit_upstream` does. Metadata: one key, ``"fpet_pocket_vit"``, a JSON object (sorted keys)
    with ``format`` ("fpet_kernels.pocket_vit"), ``format_version``, ``config`` (equal to :data:`POCKET_VIT`),
    ``upstream`` (the pretraining task: description and parameters), ``training`` (seed, steps, schedule, wall
    time), ``upstream_val_accuracy`` (on the held-out upstream validation images) and ``fixed_sample`` (the seed and
    size of a small deterministic upstream sample and the accuracy and predictions of the model with its upstream
    head on it; ``tests/test_models.py`` checks that the loaded weights reproduce them).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    "POCKET_VIT",
    "POCKET_VIT_NAME",
    "MODEL_NAMES",
    "WEIGHTS_FORMAT",
    "WEIGHTS_METADATA_KEY",
    "UPSTREAM_HEAD_PREFIX",
    "build_pocket_vit",
    "pocket_vit_path",
    "read_pocket_vit_weights",
    "pocket_vit",
    "pocket_vit_upstream",
    "create_model",
]

POCKET_VIT_NAME = "pocket-vit"
"""The :func:`create_model` name of the shipped pocket ViT."""

POCKET_VIT: Dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 8,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "class_token": True,
    "global_pool": "token",
}
"""Keyword arguments of timm's ``VisionTransformer`` for the pocket ViT: 64x64 RGB input, 8x8 patches (an 8x8 grid of
64 patch tokens plus the class token), width 128, 8 blocks of 4 heads (head dim 32), MLP ratio 4 (1.6M parameters
without a head; a float32 file of about 6.6 MB). Classification reads the class token after the final norm."""

MODEL_NAMES: Tuple[str, ...] = (
    POCKET_VIT_NAME,
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "deit_small_patch16_224",
    "deit_base_distilled_patch16_224",
)
"""Model names for the CLI help: ``"pocket-vit"`` (shipped pretrained weights, 64x64 input) and examples of timm
VisionTransformer names (random weights unless a local ``checkpoint`` is given; any timm VisionTransformer name
works, see ``timm.list_models("vit_*")``)."""

MODEL_HELP = (
    f"'{POCKET_VIT_NAME}' (the shipped pretrained 64x64 ViT, {POCKET_VIT['embed_dim']} wide, "
    f"{POCKET_VIT['depth']} blocks) or a timm VisionTransformer name such as vit_small_patch16_224 (built with "
    f"random weights; pass --checkpoint for local weights; nothing is downloaded)"
)
"""One-line description of the accepted model names, for ``--model`` help texts."""

WEIGHTS_FORMAT = "fpet_kernels.pocket_vit"
WEIGHTS_FORMAT_VERSION = 1
WEIGHTS_METADATA_KEY = "fpet_pocket_vit"
UPSTREAM_HEAD_PREFIX = "upstream_head."
_WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "pocket_vit.safetensors")
_PRETRAIN_COMMAND = "python python/pretrain_backbone.py"

PathLike = Union[str, "os.PathLike[str]"]


def _check_num_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no head, the model returns features), got {num_classes!r}")
    return num_classes


def build_pocket_vit(num_classes: int = 0) -> nn.Module:
    """A timm ``VisionTransformer`` of the :data:`POCKET_VIT` configuration with timm's random initialisation (from
    torch's global RNG) and a head of ``num_classes`` outputs (0: no head, ``forward`` returns the pooled features)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=_check_num_classes(num_classes), **POCKET_VIT)


def pocket_vit_path() -> str:
    """The path of the shipped pocket ViT weights, ``fpet_kernels/weights/pocket_vit.safetensors`` (which may not
    exist yet in a source checkout: ``python python/pretrain_backbone.py`` writes it)."""
    return _WEIGHTS_FILE


def _missing_weights_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"pocket-vit weights not found at {path!r}; they are written by the pretraining script: run "
        f"`{_PRETRAIN_COMMAND}` from the repository root (about 40 minutes on 2 CPU cores)"
    )


def read_pocket_vit_weights(path: Optional[PathLike] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(tensors, metadata)`` of a pocket ViT weights file (module docstring; default :func:`pocket_vit_path`).

    A missing file is a FileNotFoundError saying how to make it; a file that is not in this format, or whose
    ``config`` differs from :data:`POCKET_VIT`, is a ValueError naming the file and what was expected.
    """
    from safetensors import safe_open

    path = os.fspath(path) if path is not None else pocket_vit_path()
    if not os.path.isfile(path):
        raise _missing_weights_error(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(WEIGHTS_METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a corrupt or foreign file
        raise ValueError(f"pocket-vit weights {path!r}: not a readable safetensors file ({error})") from None
    if raw is None:
        raise ValueError(
            f"pocket-vit weights {path!r}: no {WEIGHTS_METADATA_KEY!r} metadata; expected a file written by "
            f"{_PRETRAIN_COMMAND}"
        )
    metadata = json.loads(raw)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"pocket-vit weights {path!r}: format {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    if metadata.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise ValueError(
            f"pocket-vit weights {path!r}: format version {metadata.get('format_version')!r}, expected "
            f"{WEIGHTS_FORMAT_VERSION}"
        )
    if metadata.get("config") != POCKET_VIT:
        raise ValueError(
            f"pocket-vit weights {path!r} were trained for config {metadata.get('config')!r}, but this version of "
            f"fpet_kernels builds {POCKET_VIT!r}; rerun `{_PRETRAIN_COMMAND}`"
        )
    return tensors, metadata


def _load_backbone(model: nn.Module, tensors: Dict[str, torch.Tensor], path: str) -> None:
    """Loads the backbone tensors (everything but the upstream head) into ``model``, whose own head stays as is."""
    backbone = {k: v for k, v in tensors.items() if not k.startswith(UPSTREAM_HEAD_PREFIX)}
    result = model.load_state_dict(backbone, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pocket-vit weights {path!r} do not fit the POCKET_VIT architecture: missing {missing[:8]}, "
            f"unexpected {list(result.unexpected_keys)[:8]}"
        )


def pocket_vit(num_classes: int = 0, pretrained: bool = True, *, weights: Optional[PathLike] = None) -> nn.Module:
    """The pocket ViT (:data:`POCKET_VIT`) in eval mode, with a fresh head of ``num_classes`` outputs.

    ``num_classes=0``: no head (``forward`` returns the 128-d class-token features after the final norm). With
    ``pretrained`` (the default) the backbone gets the shipped weights (``weights``, default
    :func:`pocket_vit_path`; the upstream head there is not loaded); the head keeps timm's random initialisation, so
    seed torch first for a reproducible head. ``pretrained=False``: random weights throughout. A missing weights file
    is a FileNotFoundError saying to run ``python python/pretrain_backbone.py``.
    """
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be a bool, got {pretrained!r}")
    model = build_pocket_vit(num_classes)
    if pretrained:
        path = os.fspath(weights) if weights is not None else pocket_vit_path()
        tensors, _ = read_pocket_vit_weights(path)
        _load_backbone(model, tensors, path)
    return model.eval()


def pocket_vit_upstream(weights: Optional[PathLike] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, metadata)``: the pretrained pocket ViT with its pretraining (upstream) head loaded, in eval mode, and
    the weights file's metadata (module docstring). For checking the shipped weights on the upstream task."""
    path = os.fspath(weights) if weights is not None else pocket_vit_path()
    tensors, metadata = read_pocket_vit_weights(path)
    head_weight = tensors.get(UPSTREAM_HEAD_PREFIX + "weight")
    head_bias = tensors.get(UPSTREAM_HEAD_PREFIX + "bias")
    if head_weight is None or head_bias is None:
        raise ValueError(f"pocket-vit weights {path!r} hold no {UPSTREAM_HEAD_PREFIX}weight / bias tensors")
    model = build_pocket_vit(int(head_weight.shape[0]))
    _load_backbone(model, tensors, path)
    model.head.load_state_dict({"weight": head_weight, "bias": head_bias})
    return model.eval(), metadata


def _normalise_img_size(img_size) -> Optional[Tuple[int, int]]:
    if img_size is None:
        return None
    if isinstance(img_size, int) and not isinstance(img_size, bool) and img_size > 0:
        return (img_size, img_size)
    if (
        isinstance(img_size, (tuple, list))
        and len(img_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in img_size)
    ):
        return (int(img_size[0]), int(img_size[1]))
    raise ValueError(f"img_size must be None, a positive int or a (height, width) pair of them, got {img_size!r}")


def _load_timm_checkpoint(model: nn.Module, name: str, checkpoint: str) -> None:
    """Loads a local checkpoint into a timm ViT: the backbone must match; a head of another shape is dropped."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist; expected a local timm weights file "
                                f"(.safetensors, .pth or .bin) for {name}")
    try:
        state = load_state_dict(checkpoint, use_ema=True, device="cpu")
    except Exception as error:
        raise ValueError(f"checkpoint {checkpoint!r} could not be read as a timm state dict: {error}") from None
    # timm's own converter: other layouts of ViT weights, position embeddings resampled to this img_size
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    head_names = {n for n in own if n.startswith(("head.", "head_dist."))}
    dropped = []
    for key in list(state):
        if key.startswith(("head.", "head_dist.")) and (key not in own or own[key].shape != state[key].shape):
            dropped.append(key)
            del state[key]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"checkpoint {checkpoint!r} does not match {name} (shapes differ outside the head): {mismatched[:8]}"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_names]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint!r} does not match {name}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {list(result.unexpected_keys)[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''}; only the classifier head may differ"
        )


def create_model(
    name: str,
    num_classes: int,
    checkpoint: Optional[PathLike] = None,
    img_size: Union[None, int, Sequence[int]] = None,
) -> nn.Module:
    """The backbone ``name`` with a head of ``num_classes`` outputs (0: no head), in eval mode. Nothing is downloaded.

    * ``"pocket-vit"``: :func:`pocket_vit` (shipped pretrained weights, 64x64 input). ``checkpoint`` must be None
      and ``img_size`` None or 64.
    * any other name: ``timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)``
      (``img_size`` only passed when given), then, with a ``checkpoint``, its local weights: every backbone tensor
      must match (position embeddings are resampled to ``img_size`` by timm's ViT converter); the head's tensors
      are dropped when their shape differs (another class count) and keep their random initialisation. A model that
      is not a timm ``VisionTransformer`` is a ValueError: FPET merges tokens on a ViT's patch grid.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a model name ({MODEL_HELP}), got {name!r}")
    num_classes = _check_num_classes(num_classes)
    size = _normalise_img_size(img_size)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
    if name == POCKET_VIT_NAME:
        if checkpoint is not None:
            raise ValueError(
                f"checkpoint is not accepted for {POCKET_VIT_NAME!r}, which loads its shipped weights "
                f"({pocket_vit_path()}); got checkpoint={checkpoint!r}"
            )
        native = POCKET_VIT["img_size"]
        if size is not None and size != (native, native):
            raise ValueError(f"{POCKET_VIT_NAME!r} takes {native}x{native} images; got img_size={img_size!r}")
        return pocket_vit(num_classes)

    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: expected {MODEL_HELP}; list timm names with timm.list_models('vit_*')"
        )
    kwargs: Dict[str, Any] = {"pretrained": False, "num_classes": num_classes}
    if size is not None:
        kwargs["img_size"] = size
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError:
        if size is None:
            raise
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)  # e.g. a CNN without img_size
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"model {name!r} is a timm {type(model).__name__}, but FPET needs a timm VisionTransformer (vit_*, "
            f"deit_*: a patch grid plus prefix tokens); hierarchical or convolutional models have no single token "
            f"grid to merge on"
        )
    side, patch = tuple(int(s) for s in model.patch_embed.img_size), tuple(int(p) for p in model.patch_embed.patch_size)
    if any(length % step for length, step in zip(side, patch)):
        raise ValueError(f"{name} has {patch[0]}x{patch[1]} patches, so the input sides (img_size) must be "
                         f"multiples of them, got {side[0]}x{side[1]}")
    if checkpoint is not None:
        _load_timm_checkpoint(model, name, checkpoint)
    return model.eval()
