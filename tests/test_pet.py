"""PET methods: each one alone and with FPET in either order, peft's LoRA, mark_trainable."""
import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.pet import AdaptFormerAdapter, LoRAQKV, VisualPrompts
from fpet_kernels.tools.benchmark import tokens_per_block
from fpet_kernels.vit_patch import get_fpet_patch

from tests.helpers import images, tiny_vit

METHODS = sorted(fk.PET_METHODS)


def trained_step(model, seed=0):
    """One backward pass on a fixed batch; returns the names of parameters that got a gradient."""
    x = images(model, batch=4, seed=seed)
    loss = F.cross_entropy(model(x), torch.arange(4) % 5)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_alone_and_with_fpet(method):
    model = fk.add_pet(tiny_vit(), method).train()
    fk.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained_step(model) == trainable
    assert any(n.startswith("head.") for n in trainable)
    fk.apply_fpet(model, layer=1)
    fk.mark_trainable(model)
    model.zero_grad()
    grads = trained_step(model)
    assert any(".token_merger." in n for n in grads) and all(
        model.get_parameter(n).requires_grad for n in grads
    )


def test_methods_add_what_they_say():
    model = fk.add_pet(tiny_vit(), "lora")
    assert all(isinstance(b.attn.qkv, LoRAQKV) and b.attn.qkv.rank == 8 for b in model.blocks)
    model = fk.add_pet(tiny_vit(), "bi-adaptformer")
    assert all(isinstance(b.adaptformer, AdaptFormerAdapter) and b.adaptformer.down.bits == 1 for b in model.blocks)
    assert model.blocks[0].adaptformer.down.out_features == 32
    model = fk.add_pet(tiny_vit(), "linear")
    assert fk.mark_trainable(model) == sum(p.numel() for p in model.head.parameters())


def test_lora_and_adaptformer_start_as_identity():
    x = images(tiny_vit())
    with torch.no_grad():
        base = tiny_vit()(x)
        for method in ("lora", "adaptformer"):
            assert torch.allclose(fk.add_pet(tiny_vit(), method)(x), base, atol=1e-6), method


def test_lora_folded_inference_equals_unfolded():
    model = fk.add_pet(tiny_vit(), "bi-lora")
    x = images(model)
    unfolded = model(x)  # grad mode on: LoRA branch computed separately
    with torch.no_grad():
        folded = model(x)
    torch.testing.assert_close(folded, unfolded.detach(), rtol=1e-5, atol=1e-5)
    # The cache follows in-place updates of the LoRA weights.
    with torch.no_grad():
        model.blocks[0].attn.qkv.lora_b_q.weight.add_(0.5)
        refolded = model(x)
    assert not torch.allclose(refolded, folded)
    torch.testing.assert_close(refolded, model(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adaptformer", "vpt-deep", "bi-lora"])
def test_add_pet_and_apply_fpet_compose_in_either_order(method):
    first = fk.apply_fpet(fk.add_pet(tiny_vit(), method), layer=1)
    second = fk.add_pet(fk.apply_fpet(tiny_vit(), layer=1), method)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    second.load_state_dict(first.state_dict())
    x = images(first)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


@pytest.mark.parametrize("method,depth", [("vpt-shallow", 1), ("vpt-deep", 4)])
def test_prompts_are_prefix_tokens_never_merged(method, depth):
    model = fk.apply_fpet(fk.add_pet(tiny_vit(), method, num_tokens=3), layer=1)
    assert isinstance(model.vpt, VisualPrompts) and model.vpt.prompts.shape[0] == depth
    assert model.num_prefix_tokens == 4
    assert tokens_per_block(model, images(model, 1)) == [68, 68, 36, 36]
    seen = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:4].clone()))
    with torch.no_grad():
        model(images(model))
    size = get_fpet_patch(model).state.get("size")
    assert torch.equal(size[:, :4], torch.ones(2, 4))
    if method == "vpt-deep":
        torch.testing.assert_close(seen[0], model.vpt.prompts[3].expand(2, -1, -1))


def test_peft_lora_on_qkv_composes_with_fpet():
    peft = pytest.importorskip("peft")
    vit = tiny_vit()
    model = peft.get_peft_model(vit, peft.LoraConfig(r=4, target_modules=["qkv"]))
    fk.apply_fpet(model, layer=1)
    assert tokens_per_block(model, images(vit, 1)) == [65, 65, 33, 33]
    fk.mark_trainable(model)
    model.train()
    grads = trained_step(model)
    assert any("lora_A" in n for n in grads) and any(".token_merger." in n for n in grads)
    assert all("lora_" in n or ".token_merger." in n or ".head." in n for n in grads)
    fk.remove_fpet(model)
    assert tokens_per_block(model, images(vit, 1)) == [65] * 4


def test_bad_pet_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        fk.add_pet(tiny_vit(), "prefix-tuning")
    with pytest.raises(TypeError, match="unknown"):
        fk.add_pet(tiny_vit(), "lora", bottleneck=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        fk.add_pet(fk.add_pet(tiny_vit(), "lora"), "lora")
    with pytest.raises(ValueError, match="already has visual prompts"):
        fk.add_pet(fk.add_pet(tiny_vit(), "vpt-shallow"), "vpt-deep")
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        fk.add_pet(torch.nn.Linear(2, 2), "lora")
