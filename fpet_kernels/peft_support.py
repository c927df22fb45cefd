"""peft support: saving a peft-wrapped FPET model with its token merger, and peft's frozen copies.

peft's ``save_pretrained`` stores the adapter weights (``lora_*``) and the copies of the ``modules_to_save`` only. The
FPET token merger (its refinement adapter ``down`` / ``up`` trains) is a module of the backbone, so it is saved only
when it is one of the ``modules_to_save``: call :func:`~fpet_kernels.apply_fpet` first, then build the peft config with
:func:`fpet_modules_to_save`::

    vit = fpet_kernels.apply_fpet(build_backbone(), layer=6)
    model = peft.get_peft_model(vit, peft.LoraConfig(r=4, target_modules=["qkv"],
                                                     modules_to_save=fpet_modules_to_save(vit)))
    fpet_kernels.mark_trainable(model)
    ...  # train
    model.save_pretrained(path)
    # load: a fresh backbone, apply_fpet with the same arguments, then peft
    model = peft.PeftModel.from_pretrained(fpet_kernels.apply_fpet(build_backbone(), layer=6), path)

peft wraps each of them in a ``ModulesToSaveWrapper``: a frozen ``original_module`` and one trainable copy per adapter
(``modules_to_save.<adapter>``), the active one used in the forward pass (the FPET merge block calls the wrapper; the
merger's attributes such as ``backend`` read through it). :func:`peft_frozen_modules` lists the frozen ones, which
:func:`~fpet_kernels.pet.mark_trainable` leaves frozen. peft is never imported here: a model holds peft modules only if
peft has been imported.
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch.nn as nn

from .vit import find_vision_transformer
from .vit_patch import _MERGER_NAME, get_fpet_patch

__all__ = ["fpet_modules_to_save", "peft_frozen_modules"]


def fpet_modules_to_save(model: nn.Module) -> List[str]:
    """The names to pass as peft's ``modules_to_save`` so that ``save_pretrained`` keeps what FPET trains besides the
    adapter: the ViT's classifier head(s) (``head``, ``head_dist``; those with parameters) and the FPET token merger,
    as module paths in ``model`` (e.g. ``["head", "blocks.6.token_merger"]``; peft matches them by suffix).

    Raises:
        ValueError: ``model`` is not patched with FPET (call ``apply_fpet`` before ``get_peft_model``: a merger added
            to a peft model afterwards is not saved), or it is already a peft model (``modules_to_save`` is fixed
            when peft wraps the model).
    """
    if _is_peft_model(model):
        raise ValueError(
            "fpet_modules_to_save: the model is already a peft model; call apply_fpet and fpet_modules_to_save on "
            "the backbone and pass the names to the peft config before get_peft_model"
        )
    vit = find_vision_transformer(model)
    patch = get_fpet_patch(vit)
    if patch is None:
        raise ValueError(
            "fpet_modules_to_save: the model is not patched with FPET; call apply_fpet(model) before get_peft_model "
            "(a token merger added to a peft model afterwards is not saved by save_pretrained)"
        )
    paths = {id(module): name for name, module in model.named_modules()}
    wanted = [getattr(vit, name, None) for name in ("head", "head_dist")]
    wanted = [m for m in wanted if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    wanted.append(getattr(vit.blocks[patch.layer], _MERGER_NAME))
    return [paths[id(module)] for module in wanted]


def peft_frozen_modules(model: nn.Module) -> List[nn.Module]:
    """peft's frozen copies in ``model``: the ``original_module`` of each peft training wrapper
    (``ModulesToSaveWrapper``, ``TrainableTokensWrapper``) and the ``modules_to_save`` copies of inactive adapters;
    ``[]`` if peft has not been imported."""
    frozen: List[nn.Module] = []
    wrappers = _peft_wrapper_types()
    if not wrappers:
        return frozen
    for module in model.modules():
        if not isinstance(module, wrappers):
            continue
        original = getattr(module, "original_module", None)
        if isinstance(original, nn.Module):
            frozen.append(original)
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict):
            active = set() if getattr(module, "disable_adapters", False) else set(_active_adapters(module))
            frozen.extend(copy for name, copy in copies.items() if name not in active)
    return frozen


def _active_adapters(wrapper: nn.Module) -> List[str]:
    active = getattr(wrapper, "active_adapters", None)
    if active is None:
        active = getattr(wrapper, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _peft_wrapper_types() -> Tuple[type, ...]:
    """peft's training wrapper classes, if peft is imported (not importing it: that is slow and not needed)."""
    if "peft" not in sys.modules:
        return ()
    try:
        from peft.utils import other
    except ImportError:  # pragma: no cover - a broken or very old peft
        return ()
    names = ("AuxiliaryTrainingWrapper", "ModulesToSaveWrapper")  # the first since peft 0.15, the second before
    return tuple(getattr(other, name) for name in names if isinstance(getattr(other, name, None), type))


def _is_peft_model(model: nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, (PeftModel, BaseTuner))
