"""FPET on timm's Eva family (eva02_*, vit_*_rope_*: RoPE, SwiGLU, register tokens), the same checks as for
VisionTransformer, and the models that stay unsupported, each refused with its reason (docs/design.md §2 step 7a)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.geometry import Checkerboard
from fpet_kernels.tools.benchmark import tokens_per_block

SMALL = dict(img_size=64, depth=4, num_classes=3)
EVAS = [
    pytest.param("eva02_tiny_patch14_224", dict(SMALL, img_size=56), id="eva02-swiglu"),
    pytest.param("vit_small_patch16_rope_224", dict(SMALL, embed_dim=64, num_heads=2), id="rope"),
    pytest.param("vit_base_patch16_rope_mixed_224", dict(SMALL, embed_dim=64, num_heads=2), id="rope-mixed"),
    pytest.param("vit_medium_patch16_rope_reg1_gap_256", dict(SMALL, embed_dim=64, num_heads=2), id="rope-reg-gap"),
]


def make(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def batch(model, size=2, seed=0):
    height, width = model.patch_embed.img_size
    return torch.randn(size, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,kwargs", EVAS)
def test_eva_token_counts_and_remove_restores_exactly(name, kwargs):
    plain = make(name, kwargs)
    model = fk.apply_fpet(copy.deepcopy(plain))
    prefix, cells = model.num_prefix_tokens, 16
    x = batch(model)
    assert tokens_per_block(model, x[:1]) == [prefix + cells] * 3 + [prefix + cells // 2]
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    fk.remove_fpet(model)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name,kwargs", EVAS[:2])
def test_later_eva_blocks_get_the_rotary_embedding_of_the_kept_b_cells(name, kwargs):
    model = fk.apply_fpet(make(name, kwargs), layer=1)
    seen = {}

    def capture(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs["rope"]
        return hook

    handles = [model.blocks[i].attn.register_forward_pre_hook(capture(i), with_kwargs=True) for i in (0, 2)]
    with torch.no_grad():
        model(batch(model))
    for handle in handles:
        handle.remove()
    cells = Checkerboard.of((4, 4), 0).indices()[1]
    assert seen[0].shape[-2] == 16 and seen[2].shape[-2] == 8
    assert torch.equal(seen[2], seen[0].index_select(-2, cells))


@pytest.mark.parametrize("name,kwargs", EVAS[:1] + EVAS[3:])
def test_eva_training_step_trains_the_merger_and_head_only(name, kwargs):
    model = fk.apply_fpet(make(name, kwargs)).train()
    fk.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.", "blocks.2.token_merger.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = F.cross_entropy(model(batch(model, 4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert torch.isfinite(loss) and changed == trainable


@pytest.mark.parametrize("name,kwargs", EVAS[:1] + EVAS[3:])
def test_eva_feature_api_is_unmerged_and_pools_like_the_model(name, kwargs):
    model = fk.apply_fpet(make(name, kwargs), layer=1)
    x = batch(model)
    with torch.no_grad():
        final, blocks = model.forward_intermediates(x)
        merged = model.forward_intermediates(x, output_fmt="NLC", fpet_merged=True)
        expected = model(x)
    width = model.embed_dim
    assert [tuple(t.shape) for t in blocks] == [(2, width, 4, 4)] * 4
    assert final.shape == (2, model.num_prefix_tokens + 16, width)
    assert [t.shape[1] for t in merged["image_intermediates"]] == [16, 8, 8, 8]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(final), expected, atol=1e-5, rtol=1e-5)


def test_pet_methods_on_eva_are_refused_with_the_reason():
    model = make(*EVAS[0].values)
    with pytest.raises(ValueError, match="timm Eva model .* use peft for PET on Eva"):
        fk.add_pet(model, "lora")


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2,
                                   use_post_norm=True), "EvaBlockPostNorm .* pre-norm blocks"),
        (lambda: timm.create_model("beit_base_patch16_224", pretrained=False, depth=2), "relative position bias"),
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1)),
         "Hierarchical or convolutional"),
        (lambda: timm.create_model("resnet18", pretrained=False), "Hierarchical or convolutional"),
    ],
    ids=["eva-post-norm", "beit", "swin", "resnet"],
)
def test_unsupported_models_are_refused_with_the_real_reason(build, message):
    with pytest.raises(ValueError, match=message):
        fk.apply_fpet(build())


@pytest.mark.parametrize("name,kwargs", EVAS[:2])
def test_eva_fused_and_unfused_attention_agree_with_proportional_attention(name, kwargs):
    model = fk.apply_fpet(make(name, kwargs), layer=1)
    x = batch(model)
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        unfused = model(x)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
