"""PET checkpoints: save only what a PET (+ FPET) model trains, rebuild it on a fresh backbone, fold, remove.

* :func:`save_pet` writes the PET parameters of a model (see "What is stored") to one safetensors file, with the
  configuration needed to rebuild the model in its metadata; :func:`load_pet` rebuilds the same model from a fresh
  timm backbone (``add_pet`` / ``apply_fpet`` with the stored configuration, then the tensors).
* :func:`fold_pet` merges LoRA into the qkv weights (plain ``nn.Linear`` qkv afterwards).
* :func:`remove_pet` takes everything ``add_pet`` and ``apply_fpet`` added off a model again.

What is stored
    Exactly the parameters :func:`~fpet_kernels.pet.mark_trainable` trains (:func:`~fpet_kernels.pet.pet_parameters`):
    the parameters of modules marked ``fpet_trainable`` (AdaptFormer adapters, visual prompts, the FPET
    ``TokenMerger``), the ``lora_*`` weights of :class:`~fpet_kernels.pet.LoRAQKV`, and the classifier ``head`` /
    ``head_dist``. The set is read from the model's structure, not from ``requires_grad`` (a model fresh from
    ``add_pet`` has every flag on). No backbone weight is stored: the backbone is identified by its architecture and
    a SHA-256 of its weights, which :func:`load_pet` checks. :func:`save_pet` refuses a model whose other parameters
    were left trainable while some are frozen (they would be lost), and PET it cannot rebuild (e.g. peft's LoRA:
    save that with peft).

1-bit weights (``bi-lora``, ``bi-adaptformer``, ``refine_bits=1``)
    Each weight ``W`` of a 1-bit :class:`~fpet_kernels.binary.QuantLinear` is used through
    ``Q(W) = mu +- c * sigma`` (:func:`~fpet_kernels.binary.binarize`). It is stored packed, 8 signs per byte:

    ``NAME@signs`` uint8 ``[ceil(numel / 8)]``
        the sign of ``W^ = (W - mu) / (sigma + 1e-5)`` (1: ``W^ >= 0``), ``W`` flattened row-major, element
        ``8 j + k`` in bit ``k`` (least significant first) of byte ``j``, zero padding;
    ``NAME@mu``, ``NAME@sigma`` 0-dim, the weight's dtype
        ``W.mean()`` and ``W.std()`` exactly as ``binarize`` computes them (on the weight's device);
    ``NAME@fix_index`` int64 ``[k]``, ``NAME@fix_value`` ``[k]``
        the elements whose straight-through value ``W^ + (c sign - W^)`` is not exactly ``c sign`` in floating point
        (it is not for ``|W^| >~ 4.7``); usually ``k = 0``.

    ``(c sign, patched at fix_index) * sigma + mu`` reproduces the model's ``Q(W)`` bit for bit (checked when
    saving). With ``deploy=False`` (the default) the latent float weight ``NAME`` is kept as well, so training can
    resume; ``deploy=True`` stores the packed form only: :func:`load_pet` then installs a
    :class:`DeployedBinaryLinear` holding ``Q(W)`` itself, whose outputs equal the original model's exactly, but
    which cannot be trained further.

SKIP-pruned models (:mod:`fpet_kernels.skip`)
    A model whose FFNs were pruned by :func:`~fpet_kernels.skip.prune_ffn` also stores, per pruned block ``l``, the
    kept neuron indices into the original FFN width (``@skip.blocks.l.kept``, int64) and, where the removed
    neurons were folded into ``fc2.bias``, that bias (``@skip.blocks.l.fc2_bias``). :func:`load_pet` prunes the fresh
    backbone with those indices before anything else, so the SHA-256 covers the pruned backbone (the folded biases
    excepted: they are stored). Such files have ``format_version`` 2 and a ``skip`` metadata entry
    ``{hidden: [original F per block], kept: {block: count}, folded: [blocks]}``; other files stay version 1.

File format (``FORMAT_VERSION = 2``; version 1: without ``skip``)
    A safetensors file. Tensors: the PET parameters under their names in the ViT's ``named_parameters()`` (e.g.
    ``blocks.0.attn.qkv.lora_a_q.weight``, ``head.weight``, ``vpt.prompts``, ``blocks.2.token_merger.down.weight``)
    and the packed 1-bit tensors above. Metadata: one key, ``"fpet_pet"``, holding a JSON object (sorted keys; one
    key, because safetensors writes several in random order, and checkpoints of the same weights must be identical
    bytes)::

        format            "fpet_kernels.pet"
        format_version    1
        version           the fpet_kernels version that wrote it
        deploy            true: 1-bit weights packed only
        backbone          {class, embed_dim, depth, num_heads, patch_size, img_size, num_prefix_tokens,
                           num_classes, global_pool, sha256}   (num_prefix_tokens without VPT prompts)
        pet               [{method, hparams}, ...]  one per add_pet call, in order (hparams with defaults filled in)
        fpet              {layer, refine_dim, refine_bits, refine_scale, refine_dropout, prop_attn, backend} or null
        binary            {NAME: {shape, dtype}} for every 1-bit weight
        skip              (version 2 only) the FFN pruning, above

Loading onto a model that already has PET / FPET
    Accepted only if it matches the checkpoint (same methods and hyper-parameters, same FPET settings except the
    kernel backend); the tensors are then loaded into the existing modules. Anything else is a ValueError saying
    what differs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .binary import BINARY_MAGNITUDE, QuantLinear, binarize
from .merger import TokenMerger
from .pet import _CONFIG_ATTR, _PROMPTS_NAME, add_pet, pet_config, pet_parameters
from .pet.adaptformer import AdaptFormerAdapter
from .pet.lora import LoRAQKV
from .pet.vpt import VisualPrompts
from .skip import _SKIP_ATTR, _restore_ffn, prune_ffn, skip_config
from .version import __version__
from .vit import find_vision_transformer
from .vit_patch import apply_fpet, get_fpet_patch, remove_fpet

__all__ = [
    "FORMAT_VERSION",
    "PetCheckpointInfo",
    "DeployedBinaryLinear",
    "save_pet",
    "load_pet",
    "read_pet_checkpoint",
    "fold_pet",
    "remove_pet",
]

FORMAT_VERSION = 2
_SKIP_PREFIX = "@skip.blocks."
_FORMAT = "fpet_kernels.pet"
_METADATA_KEY = "fpet_pet"
_FOLDED_ATTR = "_fpet_folded_lora"  # on the ViT after fold_pet: the LoRA records that were folded
_MAX_LISTED = 8

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------- 1-bit weights
class DeployedBinaryLinear(nn.Module):
    """A 1-bit Linear rebuilt from a deploy checkpoint: ``weight`` is the deployed ``Q(W)`` (a buffer, two levels
    ``mu +- c * sigma``), not the latent weight, so it is not a parameter and cannot be trained further.

    Drop-in for a 1-bit :class:`~fpet_kernels.binary.QuantLinear` (``bits``, ``in_features``, ``out_features``,
    ``effective_weight()``, same forward). ``packed`` holds the checkpoint's packed tensors (CPU), so
    :func:`save_pet` with ``deploy=True`` writes them back unchanged.
    """

    bits = 1

    def __init__(self, weight: torch.Tensor, bias: Optional[nn.Parameter], packed: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_parameter("bias", bias)
        self.packed = {key: value.detach().cpu().clone() for key, value in packed.items()}

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=1, deployed"


def _pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """bool ``[n]`` -> uint8 ``[ceil(n / 8)]``, element ``8 j + k`` in bit ``k`` of byte ``j``."""
    n = positive.numel()
    bits = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
    bits[:n] = positive.reshape(-1).to(torch.uint8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 ``[ceil(n / 8)]`` -> bool ``[n]`` (inverse of :func:`_pack_signs`)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def _rebuild_binary(record: Dict[str, torch.Tensor], shape: List[int]) -> torch.Tensor:
    """The deployed weight ``Q(W)`` from its packed record, with binarize's own operations and rounding."""
    mu, sigma = record["mu"], record["sigma"]
    positive = _unpack_signs(record["signs"], math.prod(shape))
    value = BINARY_MAGNITUDE * torch.where(positive, 1.0, -1.0).to(mu.dtype)
    value[record["fix_index"]] = record["fix_value"]
    return value.reshape(shape) * sigma + mu


def _pack_binary(weight: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The packed record of a 1-bit weight (see the module docstring), computed on the weight's device as
    :func:`~fpet_kernels.binary.binarize` does, and checked to rebuild ``binarize(weight)`` bit for bit."""
    with torch.no_grad():
        w = weight.detach()
        mu, sigma = w.mean(), w.std()
        normalized = (w - mu) / (sigma + 1e-5)
        sign = torch.where(normalized >= 0, 1.0, -1.0).to(normalized.dtype)
        ideal = BINARY_MAGNITUDE * sign
        straight_through = normalized + (ideal - normalized)
        fix_index = (straight_through != ideal).reshape(-1).nonzero().reshape(-1)
        record = {
            "signs": _pack_signs((normalized >= 0).cpu()),
            "mu": mu.cpu(),
            "sigma": sigma.cpu(),
            "fix_index": fix_index.cpu(),
            "fix_value": straight_through.reshape(-1)[fix_index].cpu(),
        }
        expected = binarize(w).cpu()
        rebuilt = _rebuild_binary(record, list(w.shape))
    if not torch.equal(rebuilt, expected) and not torch.isnan(expected).any():
        raise RuntimeError("internal error: the packed 1-bit weight does not rebuild binarize(weight) exactly")
    return record


def _binary_modules(vit: nn.Module) -> Dict[str, nn.Module]:
    """``weight name -> module`` for every 1-bit QuantLinear and DeployedBinaryLinear in the ViT."""
    return {
        f"{name}.weight": module
        for name, module in vit.named_modules()
        if (isinstance(module, QuantLinear) and module.bits == 1) or isinstance(module, DeployedBinaryLinear)
    }


# ---------------------------------------------------------------------------------------------- what the model is
def _vpt_tokens(vit: nn.Module) -> int:
    prompts = getattr(vit, _PROMPTS_NAME, None)
    return prompts.num_tokens if isinstance(prompts, VisualPrompts) else 0


def _backbone_identity(vit: nn.Module) -> Dict[str, Any]:
    """The architecture fields a checkpoint must match (without the weights' hash)."""
    patch_embed = vit.patch_embed
    img_size = getattr(patch_embed, "img_size", None)
    return {
        "class": type(vit).__name__,
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 0,
        "patch_size": [int(p) for p in patch_embed.patch_size],
        "img_size": None if img_size is None else [int(s) for s in img_size],
        "num_prefix_tokens": int(vit.num_prefix_tokens) - _vpt_tokens(vit),
        "num_classes": int(vit.num_classes),
        "global_pool": vit.global_pool,
    }


def _backbone_sha256(vit: nn.Module, pet_names: set) -> str:
    """SHA-256 of the backbone's own parameters (all but the PET ones), in float32, under their names in the plain
    timm model (LoRA's ``qkv.base_layer.*`` counts as ``qkv.*``), so it is the same before and after ``add_pet``."""
    lora_prefixes = [name for name, module in vit.named_modules() if isinstance(module, LoRAQKV)]
    items = []
    for name, param in vit.named_parameters():
        if name in pet_names:
            continue
        for prefix in lora_prefixes:
            if name.startswith(prefix + ".base_layer."):
                name = prefix + name[len(prefix) + len(".base_layer"):]
        items.append((name, param))
    digest = hashlib.sha256()
    for name, param in sorted(items, key=lambda item: item[0]):
        digest.update(f"{name}:{list(param.shape)}\n".encode())
        digest.update(param.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fpet_settings(vit: nn.Module) -> Optional[Dict[str, Any]]:
    patch = get_fpet_patch(vit)
    if patch is None:
        return None
    merger: TokenMerger = vit.blocks[patch.layer].token_merger
    return {
        "layer": patch.layer,
        "refine_dim": merger.refine_dim,
        "refine_bits": merger.refine_bits,
        "refine_scale": merger.refine_scale,
        "refine_dropout": merger.refine_dropout,
        "prop_attn": patch.prop_attn,
        "backend": merger.backend,
    }


def _kind(method: str) -> str:
    """The module kind a PET method adds: ``lora``, ``adaptformer``, ``vpt`` (``linear``: itself, none)."""
    for kind in ("lora", "adaptformer", "vpt"):
        if kind in method:
            return kind
    return method


def _pet_modules(vit: nn.Module) -> Dict[str, List[str]]:
    """Names of the PET modules in the ViT, by kind (``lora``, ``adaptformer``, ``vpt``)."""
    found: Dict[str, List[str]] = {"lora": [], "adaptformer": [], "vpt": []}
    for name, module in vit.named_modules():
        if isinstance(module, LoRAQKV):
            found["lora"].append(name)
        elif isinstance(module, AdaptFormerAdapter):
            found["adaptformer"].append(name)
        elif isinstance(module, VisualPrompts):
            found["vpt"].append(name)
    return found


def _check_records(vit: nn.Module, what: str) -> None:
    """Refuse folded models and PET modules that add_pet did not record (so cannot be rebuilt)."""
    if getattr(vit, _FOLDED_ATTR, None):
        raise ValueError(
            f"{what}: this model's LoRA was folded into its qkv weights by fold_pet, so its backbone weights are no "
            "longer the original ones; use the model from before fold_pet"
        )
    recorded = {_kind(r["method"]) for r in pet_config(vit)}
    for kind, names in _pet_modules(vit).items():
        if names and kind not in recorded:
            raise ValueError(
                f"{what}: the model has {kind} modules ({', '.join(names[:3])}) that add_pet did not record; only "
                "PET added by fpet_kernels.add_pet can be saved and rebuilt"
            )


def _checked_pet_parameters(vit: nn.Module, what: str) -> Dict[str, nn.Parameter]:
    """pet_parameters(vit), each checked to belong to a module save_pet / load_pet know how to rebuild."""
    known = set()
    for module in vit.modules():
        if isinstance(module, LoRAQKV):
            for child in (module.lora_a_q, module.lora_b_q, module.lora_a_v, module.lora_b_v):
                known.update(id(p) for p in child.parameters())
        elif isinstance(module, (AdaptFormerAdapter, VisualPrompts, TokenMerger)):
            known.update(id(p) for p in module.parameters())
    for head_name in ("head", "head_dist"):
        head = getattr(vit, head_name, None)
        if isinstance(head, nn.Module):
            known.update(id(p) for p in head.parameters())
    params = pet_parameters(vit)
    unknown = [name for name, param in params.items() if id(param) not in known]
    if unknown:
        raise ValueError(
            f"{what}: the PET parameters {_listed(unknown)} were not added by fpet_kernels (add_pet / apply_fpet), "
            "e.g. peft's LoRA; save those with their own library (peft: save_pretrained)"
        )
    return params


def _listed(items: List[str]) -> str:
    shown = ", ".join(repr(item) for item in items[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(items) > _MAX_LISTED else ''}] ({len(items)})"


# ---------------------------------------------------------------------------------------------- save
@dataclasses.dataclass(frozen=True)
class PetCheckpointInfo:
    """What :func:`save_pet` wrote.

    Attributes:
        path: the file.
        file_bytes: its size on disk (header included).
        num_params: number of PET parameter values stored (1-bit weights counted once).
        num_binary_params: of these, the 1-bit weights' values.
        binary_bytes: bytes of the packed 1-bit tensors (signs, mu, sigma, fixes).
        float_bytes: bytes of the float tensors (PET parameters, and latent 1-bit weights unless ``deploy``).
        deploy: whether the 1-bit weights were stored packed only.
    """

    path: str
    file_bytes: int
    num_params: int
    num_binary_params: int
    binary_bytes: int
    float_bytes: int
    deploy: bool


def _folded_bias_names(skip: Optional[Dict[str, Any]]) -> set:
    """The fc2 biases SKIP folded removed neurons into: stored, so not part of the backbone's hash."""
    return set() if skip is None else {f"blocks.{layer}.mlp.fc2.bias" for layer in skip["folded"]}


def _skip_metadata(skip: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if skip is None:
        return None
    return {"hidden": skip["hidden"], "kept": {str(k): int(v.numel()) for k, v in sorted(skip["kept"].items())},
            "folded": skip["folded"]}


def _metadata(vit: nn.Module, pet_names: set, deploy: bool, binary: Dict[str, nn.Module]) -> Dict[str, Any]:
    skip = skip_config(vit)
    extra = {} if skip is None else {"skip": _skip_metadata(skip)}
    return {
        **extra,
        "format": _FORMAT,
        "format_version": FORMAT_VERSION if skip is not None else 1,
        "version": __version__,
        "deploy": deploy,
        "backbone": {**_backbone_identity(vit), "sha256": _backbone_sha256(vit, pet_names | _folded_bias_names(skip))},
        "pet": pet_config(vit),
        "fpet": _fpet_settings(vit),
        "binary": {
            name: {"shape": list(module.weight.shape), "dtype": str(module.weight.dtype).replace("torch.", "")}
            for name, module in binary.items()
        },
    }


def save_pet(model: nn.Module, path: PathLike, *, deploy: bool = False) -> PetCheckpointInfo:
    """Write the PET parameters of ``model`` (see the module docstring) and its PET / FPET configuration to the
    safetensors file ``path`` (replaced atomically); return what was written.

    Args:
        model: a timm VisionTransformer with PET from :func:`~fpet_kernels.add_pet` and / or FPET from
            :func:`~fpet_kernels.apply_fpet` (or neither: then only the head is stored), or a module wrapping one.
        path: the file to write.
        deploy: store 1-bit weights packed only (about 1/32 of their float32 size), for inference; the default also
            keeps their latent float weights, which resuming training needs.
    Raises:
        ValueError: PET that cannot be rebuilt (not added by add_pet / apply_fpet, or folded by fold_pet);
            parameters outside the PET set left trainable while others are frozen; ``deploy=False`` for a model
            loaded from a deploy checkpoint (its latent 1-bit weights are not available).
    """
    from safetensors.torch import save_file

    vit = find_vision_transformer(model)
    _check_records(vit, "save_pet")
    params = _checked_pet_parameters(vit, "save_pet")
    frozen = any(not p.requires_grad for p in vit.parameters())
    extra = [name for name, p in vit.named_parameters() if p.requires_grad and name not in params]
    if frozen and extra:
        raise ValueError(
            f"save_pet stores only the PET parameters, but {_listed(extra)} outside them require grad while other "
            "parameters are frozen: their training would be lost. Freeze them (mark_trainable) or save the full "
            "state_dict"
        )
    binary = _binary_modules(vit)
    tensors: Dict[str, torch.Tensor] = {}
    binary_bytes = float_bytes = num_binary = 0
    for name, param in params.items():
        if name not in binary:
            tensors[name] = param.detach().cpu().contiguous().clone()
            float_bytes += param.numel() * param.element_size()
    for name, module in binary.items():
        if isinstance(module, DeployedBinaryLinear):
            if not deploy:
                raise ValueError(
                    f"save_pet(deploy=False): {name} was loaded from a deploy checkpoint and has no latent weights; "
                    "save with deploy=True"
                )
            record = module.packed
        else:
            record = _pack_binary(module.weight)
            if not deploy:
                tensors[name] = module.weight.detach().cpu().contiguous().clone()
                float_bytes += module.weight.numel() * module.weight.element_size()
        for key, value in record.items():
            tensors[f"{name}@{key}"] = value.contiguous().clone()
            binary_bytes += value.numel() * value.element_size()
        num_binary += module.weight.numel()
    num_params = sum(p.numel() for name, p in params.items() if name not in binary) + num_binary
    skip = skip_config(vit)
    if skip is not None:
        for layer, kept in skip["kept"].items():
            tensors[f"{_SKIP_PREFIX}{layer}.kept"] = kept.contiguous()
        for layer in skip["folded"]:
            tensors[f"{_SKIP_PREFIX}{layer}.fc2_bias"] = vit.blocks[layer].mlp.fc2.bias.detach().cpu().contiguous().clone()
    metadata = _metadata(vit, set(params), deploy, binary)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return PetCheckpointInfo(
        path=path,
        file_bytes=os.path.getsize(path),
        num_params=num_params,
        num_binary_params=num_binary,
        binary_bytes=binary_bytes,
        float_bytes=float_bytes,
        deploy=deploy,
    )


# ---------------------------------------------------------------------------------------------- load
def read_pet_checkpoint(path: PathLike) -> Dict[str, Any]:
    """The configuration stored in a :func:`save_pet` file (the ``fpet_pet`` metadata object, see the module
    docstring), without loading its tensors. ValueError if ``path`` is not such a file or is of a newer format."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PET checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
    except Exception as error:  # safetensors' SafetensorError and friends: not a safetensors file
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if raw is None:
        raise ValueError(f"{path} is not an fpet_kernels PET checkpoint: its metadata has no {_METADATA_KEY!r} key")
    meta = json.loads(raw)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: format must be {_FORMAT!r}, got {meta.get('format')!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r} is not readable by fpet_kernels {__version__} "
            f"(reads up to {FORMAT_VERSION})"
        )
    return meta


def _differences(label: str, stored: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    return [
        f"{label}{key}: checkpoint {stored.get(key)!r} vs model {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


def _config_differences(meta: Dict[str, Any], vit: nn.Module) -> List[str]:
    """How the PET / FPET already on ``vit`` differs from the checkpoint's (the FPET backend does not count)."""
    stored, current = meta["pet"], pet_config(vit)
    problems = []
    if [r["method"] for r in stored] != [r["method"] for r in current]:
        problems.append(
            f"PET methods: checkpoint {[r['method'] for r in stored]} vs model {[r['method'] for r in current]}"
        )
    else:
        for s, c in zip(stored, current):
            problems += _differences(f"{s['method']} ", s["hparams"], c["hparams"])
    stored_fpet, current_fpet = meta["fpet"], _fpet_settings(vit)
    if (stored_fpet is None) != (current_fpet is None):
        problems.append(
            f"FPET: checkpoint {'none' if stored_fpet is None else stored_fpet} vs model "
            f"{'none' if current_fpet is None else current_fpet}"
        )
    elif stored_fpet is not None:
        stored_fpet = {k: v for k, v in stored_fpet.items() if k != "backend"}
        current_fpet = {k: v for k, v in current_fpet.items() if k != "backend"}
        problems += _differences("FPET ", stored_fpet, current_fpet)
    return problems


def _load_tensors(vit: nn.Module, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], path: str) -> None:
    """Check every tensor against the model's PET parameters first, then copy them in (nothing is changed on a
    mismatch)."""
    deploy = bool(meta["deploy"])
    params = pet_parameters(vit)
    binary = _binary_modules(vit)
    problems = []
    if set(binary) != set(meta["binary"]):
        problems.append(
            f"1-bit weights: checkpoint {sorted(meta['binary'])} vs model {sorted(binary)}"
        )
    expected: Dict[str, Optional[tuple]] = {name: tuple(p.shape) for name, p in params.items() if name not in binary}
    for name, module in binary.items():
        shape = tuple(module.weight.shape)
        stored_shape = tuple(meta["binary"].get(name, {}).get("shape", shape))
        if stored_shape != shape:
            problems.append(f"{name}: checkpoint shape {list(stored_shape)} vs model {list(shape)}")
        if isinstance(module, DeployedBinaryLinear) and not deploy:
            problems.append(f"{name}: the model holds a deployed 1-bit weight; load a training checkpoint onto a "
                            "fresh backbone")
        if not deploy:
            expected[name] = shape
        expected.update({f"{name}@signs": (math.ceil(math.prod(shape) / 8),), f"{name}@mu": (), f"{name}@sigma": (),
                         f"{name}@fix_index": None, f"{name}@fix_value": None})
        signs, index, value = (tensors.get(f"{name}@{key}") for key in ("signs", "fix_index", "fix_value"))
        if signs is not None and signs.dtype != torch.uint8:
            problems.append(f"{name}@signs: checkpoint dtype {signs.dtype} vs expected torch.uint8")
        if index is not None and value is not None:
            if index.dim() != 1 or index.shape != value.shape or index.dtype != torch.int64:
                problems.append(f"{name}@fix_index / @fix_value: checkpoint shapes {list(index.shape)} and "
                                f"{list(value.shape)} ({index.dtype}), expected two equal 1-D shapes, int64 indices")
            elif index.numel() and not 0 <= int(index.min()) <= int(index.max()) < math.prod(shape):
                problems.append(f"{name}@fix_index: indices outside [0, {math.prod(shape)})")
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing:
        problems.append(f"tensors the model needs but the checkpoint lacks: {_listed(missing)}")
    if unexpected:
        problems.append(f"tensors in the checkpoint the model has no place for: {_listed(unexpected)}")
    for key, shape in expected.items():
        if shape is not None and key in tensors and tuple(tensors[key].shape) != shape:
            problems.append(f"{key}: checkpoint shape {list(tensors[key].shape)} vs model {list(shape)}")
    if problems:
        raise ValueError(f"load_pet: {path} does not fit this model: " + "; ".join(problems))

    with torch.no_grad():
        for name, param in params.items():
            if name not in binary:
                param.copy_(tensors[name])
        for name, module in binary.items():
            if not deploy:
                module.weight.copy_(tensors[name])
                continue
            record = {key: tensors[f"{name}@{key}"] for key in ("signs", "mu", "sigma", "fix_index", "fix_value")}
            weight = _rebuild_binary(record, list(module.weight.shape))
            weight = weight.to(device=module.weight.device, dtype=module.weight.dtype)
            deployed = DeployedBinaryLinear(weight, module.bias, record).train(module.training)
            parent_name, _, child = name[: -len(".weight")].rpartition(".")
            setattr(vit.get_submodule(parent_name), child, deployed)


def _has_additions(vit: nn.Module) -> bool:
    return bool(pet_config(vit)) or get_fpet_patch(vit) is not None or any(_pet_modules(vit).values())


def _skip_tensors(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], vit: nn.Module, path: str,
                  check_widths: bool = True) -> Tuple[List[Optional[torch.Tensor]], Dict[int, torch.Tensor]]:
    """Take the SKIP tensors out of ``tensors`` and check them against the metadata and the model: the kept indices
    per block (None: not pruned) and the folded fc2 biases."""
    skip = meta.get("skip")
    names = [key for key in tensors if key.startswith(_SKIP_PREFIX)]
    found = {key: tensors.pop(key) for key in names}
    if skip is None:
        if found:
            raise ValueError(f"load_pet: {path} holds SKIP tensors ({_listed(names)}) but no skip metadata")
        return [None] * len(vit.blocks), {}
    pruned = skip_config(vit)
    widths = [block.mlp.fc1.out_features for block in vit.blocks] if pruned is None else pruned["hidden"]
    problems = []
    if check_widths and skip["hidden"] != widths:
        problems.append(f"FFN widths: checkpoint {skip['hidden']} vs model {widths} (load onto an unpruned backbone)")
    kept: List[Optional[torch.Tensor]] = [None] * len(vit.blocks)
    biases: Dict[int, torch.Tensor] = {}
    expected = {f"{_SKIP_PREFIX}{layer}.kept" for layer in skip["kept"]}
    expected |= {f"{_SKIP_PREFIX}{layer}.fc2_bias" for layer in skip["folded"]}
    if set(found) != expected:
        problems.append(f"SKIP tensors: checkpoint has {sorted(found)}, its metadata names {sorted(expected)}")
    for layer_text, count in skip["kept"].items():
        layer = int(layer_text)
        indices = found.get(f"{_SKIP_PREFIX}{layer}.kept")
        if indices is None or not 0 <= layer < len(widths):
            continue
        if (indices.dim() != 1 or indices.dtype != torch.int64 or indices.numel() != count or count < 1
                or int(indices.min()) < 0 or int(indices.max()) >= widths[layer]
                or not bool((indices[1:] > indices[:-1]).all())):
            problems.append(f"{_SKIP_PREFIX}{layer}.kept: expected {count} increasing int64 indices in "
                            f"[0, {widths[layer]})")
            continue
        kept[layer] = indices
    for layer in skip["folded"]:
        bias = found.get(f"{_SKIP_PREFIX}{layer}.fc2_bias")
        if bias is not None and 0 <= layer < len(widths):
            if tuple(bias.shape) != (vit.blocks[layer].mlp.fc2.out_features,):
                problems.append(f"{_SKIP_PREFIX}{layer}.fc2_bias: shape {list(bias.shape)}, expected "
                                f"[{vit.blocks[layer].mlp.fc2.out_features}]")
            biases[layer] = bias
    if problems:
        raise ValueError(f"load_pet: {path} does not fit this model: " + "; ".join(problems))
    return kept, biases


def _skip_differences(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], vit: nn.Module) -> List[str]:
    """How the SKIP pruning already on ``vit`` differs from the checkpoint's."""
    current = skip_config(vit)
    stored = meta.get("skip")
    if (stored is None) != (current is None):
        return [f"SKIP: checkpoint {'unpruned' if stored is None else 'pruned'} vs model "
                f"{'unpruned' if current is None else 'pruned'}"]
    if stored is None:
        return []
    same = stored["hidden"] == current["hidden"] and sorted(map(int, stored["kept"])) == sorted(current["kept"])
    same = same and all(torch.equal(tensors.get(f"{_SKIP_PREFIX}{layer}.kept", torch.empty(0)), kept)
                        for layer, kept in current["kept"].items())
    return [] if same else ["SKIP: the checkpoint's pruned FFN neurons differ from the model's"]


def load_pet(
    model: nn.Module, path: PathLike, *, backend: Optional[str] = None, check_backbone: bool = True
) -> nn.Module:
    """Rebuild the PET (+ FPET) model saved by :func:`save_pet` on ``model`` in place and return it.

    On a fresh backbone (a plain timm ViT of the same architecture) this calls ``add_pet`` / ``apply_fpet`` with the
    stored configuration and loads the tensors: outputs then equal the saved model's exactly (same dtype and
    device; a deploy checkpoint's 1-bit weights are :class:`DeployedBinaryLinear`, equal on any device). A model
    that already has PET / FPET is accepted only if it matches the checkpoint (module docstring). Nothing is left
    changed when loading fails.

    Args:
        model: the backbone (or a module wrapping it), with the same pretrained weights as when saved.
        path: a file written by :func:`save_pet`.
        backend: FPET kernel backend for a fresh build, instead of the stored one (it is a kernel choice, not part
            of the trained model).
        check_backbone: require the backbone weights' SHA-256 to equal the stored one (other pretrained weights,
            or another dtype, give other outputs); ``False`` skips the check.
    Raises:
        ValueError: not a PET checkpoint; another architecture, other backbone weights, other PET / FPET on the
            model, or tensors of other names or shapes; each message says what differs (checkpoint vs model).
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    meta = read_pet_checkpoint(path)
    vit = find_vision_transformer(model)
    _check_records(vit, "load_pet")
    problems = _differences("", {k: v for k, v in meta["backbone"].items() if k != "sha256"}, _backbone_identity(vit))
    if problems:
        raise ValueError(f"load_pet: {path} is for another architecture: " + "; ".join(problems))
    tensors = load_file(path)
    fresh = not _has_additions(vit) and skip_config(vit) is None
    if not fresh:
        problems = _config_differences(meta, vit) + _skip_differences(meta, tensors, vit)
        if problems:
            raise ValueError(
                f"load_pet: the model already has PET / FPET that differs from {path}: " + "; ".join(problems)
                + ". Load onto a fresh backbone (or call remove_pet(model) first)"
            )
    # On a model pruned the same way (checked above) the indices are there already; the folded biases are loaded.
    kept, biases = _skip_tensors(tensors, meta, vit, path, check_widths=fresh)
    saved_ffn = {layer: (vit.blocks[layer].mlp.fc1, vit.blocks[layer].mlp.fc2)
                 for layer in range(len(vit.blocks))} if fresh else {}
    try:
        if fresh and any(k is not None for k in kept):
            prune_ffn(vit, kept)
        if check_backbone:
            sha = _backbone_sha256(vit, set(pet_parameters(vit)) | _folded_bias_names(meta.get("skip")))
            if sha != meta["backbone"]["sha256"]:
                raise ValueError(
                    f"load_pet: the backbone weights differ from those {path} was trained on (SHA-256 checkpoint "
                    f"{meta['backbone']['sha256'][:12]}... vs model {sha[:12]}...): other pretrained weights, other "
                    "dtype, or modified weights. Pass check_backbone=False to load anyway"
                )
    except BaseException:
        if saved_ffn:
            _restore_ffn(vit, saved_ffn, None)
        raise
    if not fresh:
        _load_tensors(vit, tensors, meta, path)
        _set_folded_biases(vit, biases)
        return model
    try:
        _set_folded_biases(vit, biases)
        if biases:
            vit.__dict__[_SKIP_ATTR]["folded"] = sorted(biases)
        for record in meta["pet"]:
            add_pet(model, record["method"], **record["hparams"])
        if meta["fpet"] is not None:
            settings = dict(meta["fpet"])
            if backend is not None:
                settings["backend"] = backend
            apply_fpet(model, settings.pop("layer"), **settings)
        _load_tensors(vit, tensors, meta, path)
    except BaseException:
        if _has_additions(vit):
            remove_pet(model)
        _restore_ffn(vit, saved_ffn, None)
        raise
    return model


def _set_folded_biases(vit: nn.Module, biases: Dict[int, torch.Tensor]) -> None:
    """Copy SKIP's folded fc2 biases into the pruned model (a bias is created where fc2 had none)."""
    for layer, bias in biases.items():
        fc2 = vit.blocks[layer].mlp.fc2
        if fc2.bias is None:
            fc2.bias = nn.Parameter(torch.zeros(fc2.out_features, device=fc2.weight.device, dtype=fc2.weight.dtype),
                                    requires_grad=fc2.weight.requires_grad)
        with torch.no_grad():
            fc2.bias.copy_(bias)


# ---------------------------------------------------------------------------------------------- fold / remove
def fold_pet(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Fold every LoRA into its qkv weight for deployment, in place; return ``model``.

    Each :class:`~fpet_kernels.pet.LoRAQKV` becomes a plain ``nn.Linear`` with the weight
    ``W + scale * [B_q A_q; 0; B_v A_v]`` (1-bit LoRA: of the binarised ``Q(A)``, ``Q(B)``). Outputs equal the LoRA
    model's under ``torch.no_grad()`` exactly (LoRA already runs on that folded weight there) and its grad-mode
    outputs within float rounding (float32: well within ``atol=1e-5``). The original qkv weights are not kept, so
    :func:`remove_pet`, :func:`save_pet` and :func:`load_pet` refuse a folded model.

    AdaptFormer (a nonlinear branch) and VPT (extra tokens) cannot be folded: with ``strict=True`` (default) a model
    that has them is refused before anything changes; ``strict=False`` folds the LoRA and leaves them as they are.
    FPET stays as it is.

    Raises:
        ValueError: no LoRA to fold, or (``strict``) PET that cannot be folded.
    """
    vit = find_vision_transformer(model)
    modules = _pet_modules(vit)
    if not modules["lora"]:
        raise ValueError(
            f"fold_pet: the model has no LoRA to fold (PET: {[r['method'] for r in pet_config(vit)]}); only LoRA "
            "can be folded into the backbone, AdaptFormer and VPT cannot"
        )
    others = [name for kind in ("adaptformer", "vpt") for name in modules[kind]]
    if strict and others:
        raise ValueError(
            f"fold_pet: {_listed(others)} cannot be folded (AdaptFormer is a nonlinear branch, VPT adds tokens); "
            "pass strict=False to fold the LoRA and keep them as modules"
        )
    with torch.no_grad():
        for name in modules["lora"]:
            lora: LoRAQKV = vit.get_submodule(name)
            base = lora.base_layer
            folded = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None,
                device=base.weight.device, dtype=base.weight.dtype,
            )
            folded.weight.copy_(lora.merged_weight())
            folded.weight.requires_grad_(base.weight.requires_grad)
            if base.bias is not None:
                folded.bias.copy_(base.bias)
                folded.bias.requires_grad_(base.bias.requires_grad)
            parent_name, _, child = name.rpartition(".")
            setattr(vit.get_submodule(parent_name), child, folded.train(lora.training))
    records = getattr(vit, _CONFIG_ATTR, [])
    vit.__dict__.setdefault(_FOLDED_ATTR, []).extend(r for r in records if _kind(r["method"]) == "lora")
    records[:] = [r for r in records if _kind(r["method"]) != "lora"]
    return model


def _owned_by(hook: Any, owner: object) -> bool:
    if isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__self__", None) is owner


def _remove_hooks_owned_by(root: nn.Module, owner: object) -> None:
    """Remove every forward (pre-)hook in ``root``'s modules that is a method of ``owner`` (or a partial of one)."""
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if _owned_by(hook, owner)]:
                del hooks[key]
                for extra in (
                    module._forward_pre_hooks_with_kwargs,
                    module._forward_hooks_with_kwargs,
                    module._forward_hooks_always_called,
                ):
                    extra.pop(key, None)


def remove_pet(model: nn.Module) -> nn.Module:
    """Take off everything :func:`~fpet_kernels.add_pet` and :func:`~fpet_kernels.apply_fpet` added, in place;
    return ``model``.

    LoRA's wrapped qkv Linear (the original module, never modified) goes back in place, AdaptFormer adapters and
    visual prompts and their hooks go (``num_prefix_tokens`` back), FPET is removed with
    :func:`~fpet_kernels.remove_fpet`, and the add_pet record is dropped: the backbone's modules and parameters are
    the original ones again and its outputs are bit-identical to the untouched backbone's. The classifier head is
    the backbone's own and keeps whatever weights it was trained to.

    Raises:
        ValueError: nothing to remove, or LoRA folded by :func:`fold_pet` (the original qkv weights are gone).
    """
    vit = find_vision_transformer(model)
    if getattr(vit, _FOLDED_ATTR, None):
        raise ValueError("remove_pet: this model's LoRA was folded by fold_pet; the original qkv weights are gone")
    if not _has_additions(vit):
        raise ValueError("remove_pet: the model has no PET (add_pet) or FPET (apply_fpet) to remove")
    if get_fpet_patch(vit) is not None:
        remove_fpet(vit)
    modules = _pet_modules(vit)
    for name in modules["lora"]:
        parent_name, _, child = name.rpartition(".")
        setattr(vit.get_submodule(parent_name), child, vit.get_submodule(name).base_layer)
    for name in modules["adaptformer"]:
        parent_name, _, child = name.rpartition(".")
        parent = vit.get_submodule(parent_name)
        _remove_hooks_owned_by(parent, getattr(parent, child))
        del parent._modules[child]
    for name in modules["vpt"]:
        prompts = vit.get_submodule(name)
        _remove_hooks_owned_by(vit, prompts)
        parent_name, _, child = name.rpartition(".")
        del vit.get_submodule(parent_name)._modules[child]
        if name == _PROMPTS_NAME:
            vit.num_prefix_tokens -= prompts.num_tokens
    vit.__dict__.pop(_CONFIG_ATTR, None)
    return model

