"""peft with FPET: save_pretrained / from_pretrained keep the token merger; mark_trainable leaves peft's frozen copies
(``original_module`` of a ``modules_to_save`` wrapper) frozen."""
import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk

from tests.helpers import images, tiny_vit

peft = pytest.importorskip("peft")

LAYER = 1
MERGER = f"base_model.model.blocks.{LAYER}.token_merger"


def lora_config(modules_to_save):
    return peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=modules_to_save)


def train_and_save(modules_to_save, path):
    """An FPET-then-peft model whose trainable weights (LoRA, the head, the merger) are perturbed as if trained, saved
    to ``path``; returns its eval outputs on a fixed batch."""
    model = peft.get_peft_model(fk.apply_fpet(tiny_vit(), layer=LAYER), lora_config(modules_to_save))
    fk.mark_trainable(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
        output = model.eval()(images(tiny_vit()))
    model.save_pretrained(path)
    return output


def load(path):
    """The documented load path: a fresh backbone, apply_fpet with the same arguments, then peft."""
    return peft.PeftModel.from_pretrained(fk.apply_fpet(tiny_vit(), layer=LAYER), path).eval()


def test_save_pretrained_round_trip_restores_token_merger(tmp_path):
    # Failed on main: fpet_kernels.peft_support.fpet_modules_to_save did not exist (ImportError), and the config used
    # until then (modules_to_save=["head"], as in tests/test_pet.py) saves no token_merger weight, so the loaded model
    # gives other outputs (the control at the end).
    from fpet_kernels.peft_support import fpet_modules_to_save

    names = fpet_modules_to_save(fk.apply_fpet(tiny_vit(), layer=LAYER))
    assert names == ["head", f"blocks.{LAYER}.token_merger"]
    expected = train_and_save(names, tmp_path / "fpet")
    loaded = load(tmp_path / "fpet")
    merger = loaded.get_submodule(MERGER)
    assert isinstance(merger, peft.utils.other.ModulesToSaveWrapper) and merger.backend == "auto"
    assert merger.refine_dim == 32  # TokenMerger attributes read through peft's wrapper (checkpoint, cli, train)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(tiny_vit())), expected)
    # Control: without the merger in modules_to_save its trained weights are lost and the outputs differ.
    lost = train_and_save(["head"], tmp_path / "head-only")
    with torch.no_grad():
        assert not torch.allclose(load(tmp_path / "head-only")(images(tiny_vit())), lost, atol=1e-3)


def test_fpet_modules_to_save_wants_fpet_before_peft():
    # Failed on main: fpet_kernels.peft_support did not exist.
    from timm.models.deit import VisionTransformerDistilled

    from fpet_kernels.peft_support import fpet_modules_to_save

    with pytest.raises(ValueError, match="not patched with FPET"):
        fpet_modules_to_save(tiny_vit())
    with pytest.raises(ValueError, match="already a peft model"):
        fpet_modules_to_save(peft.get_peft_model(fk.apply_fpet(tiny_vit(), layer=LAYER), lora_config(["head"])))
    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    assert fpet_modules_to_save(torch.nn.Sequential(fk.apply_fpet(deit, layer=1))) == [
        "0.head", "0.head_dist", "0.blocks.1.token_merger"
    ]


@pytest.mark.parametrize("fpet_first", [True, False], ids=["fpet-then-peft", "peft-then-fpet"])
def test_mark_trainable_leaves_peft_frozen_copies_frozen(fpet_first):
    # Failed on main: mark_trainable also trained peft's frozen copies, base_model.model.head.original_module.* (and,
    # FPET first, token_merger.original_module.*), which get no gradient since peft runs the active copy.
    config = lora_config(["head", "token_merger"])
    if fpet_first:
        model = peft.get_peft_model(fk.apply_fpet(tiny_vit(), layer=LAYER), config)
        merger = [f"{MERGER}.modules_to_save.default.down.weight", f"{MERGER}.modules_to_save.default.up.weight"]
    else:  # the merger is added after peft wrapped the model: a plain module (trained, but not saved by peft)
        model = fk.apply_fpet(peft.get_peft_model(tiny_vit(), config), layer=LAYER)
        merger = [f"{MERGER}.down.weight", f"{MERGER}.up.weight"]
    by_peft = {n for n, p in model.named_parameters() if p.requires_grad}  # lora_*, modules_to_save copies, merger
    count = fk.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == by_peft
    assert not any(".original_module." in n for n in trainable)
    assert {"base_model.model.head.modules_to_save.default.weight", *merger} <= trainable
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    loss = F.cross_entropy(model(images(tiny_vit(), batch=4)), torch.arange(4) % 5)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
