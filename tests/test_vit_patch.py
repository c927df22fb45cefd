"""apply_fpet / remove_fpet on timm VisionTransformer models (docs/design.md §2 steps 1-9)."""
import copy
import threading

import pytest
import timm
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.backends import get_backend
from fpet_kernels.tools.benchmark import tokens_per_block
from fpet_kernels.vit_patch import get_fpet_patch

from tests.helpers import assert_close, backend_marks, images, requires_backend, tiny_vit


def test_vit_small_197_to_99_tokens_after_block_6():
    model = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
    fk.apply_fpet(model)
    assert tokens_per_block(model, torch.randn(1, 3, 224, 224)) == [197] * 7 + [99] * 5


@pytest.mark.parametrize(
    "name,prefix", [("deit_tiny_distilled_patch16_224", 2), ("vit_base_patch16_224", 1)]
)
def test_named_models_keep_prefix_tokens(name, prefix):
    kwargs = dict(depth=4) if name.startswith("vit_base") else {}
    model = timm.create_model(name, **kwargs).eval()
    assert model.num_prefix_tokens == prefix
    fk.apply_fpet(model, layer=1)
    counts = tokens_per_block(model, torch.randn(1, 3, 224, 224))
    assert counts[:2] == [prefix + 196] * 2 and counts[2:] == [prefix + 98] * (len(counts) - 2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


def test_register_tokens_are_prefix_and_never_merged():
    model = tiny_vit(reg_tokens=4, global_pool="token")
    fk.apply_fpet(model, layer=1)
    assert tokens_per_block(model, images(model, 1)) == [69, 69, 37, 37]
    with torch.no_grad():
        model(images(model))
    size = get_fpet_patch(model).state.get("size")
    assert torch.equal(size[:, :5], torch.ones(2, 5)) and torch.equal(size.sum(-1), torch.full((2,), 69.0))


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_avg_pool_is_size_weighted(pool):
    model = fk.apply_fpet(tiny_vit(global_pool=pool, class_token=False, fc_norm=False), layer=1)
    x = images(model)
    with torch.no_grad():
        features = model.forward_features(x)
        size = get_fpet_patch(model).state.get("size")
        logits = model.forward_head(features)
    weighted = (features * size.unsqueeze(-1)).sum(1) / size.sum(-1, keepdim=True)
    pooled = weighted if pool == "avg" else 0.5 * (features.amax(1) + weighted)
    torch.testing.assert_close(logits, model.head(pooled))
    assert not torch.allclose(weighted, features.mean(1))  # the weighting changes the result


def test_non_square_input():
    model = timm.create_model("vit_tiny_patch16_224", img_size=(224, 160), num_classes=3).eval()
    fk.apply_fpet(model)
    assert tokens_per_block(model, torch.randn(1, 3, 224, 160)) == [141] * 7 + [71] * 5


def test_dynamic_img_size_reads_the_grid_per_forward():
    model = fk.apply_fpet(tiny_vit(dynamic_img_size=True), layer=2)
    assert tokens_per_block(model, torch.randn(1, 3, 64, 64)) == [65, 65, 65, 33]
    assert tokens_per_block(model, torch.randn(1, 3, 48, 80)) == [61, 61, 61, 31]


@pytest.mark.parametrize("kwargs", [{}, dict(init_values=1e-5), dict(reg_tokens=2, class_token=False, global_pool="avg")])
def test_remove_fpet_restores_outputs_exactly(kwargs):
    model = tiny_vit(**kwargs)
    x = images(model)
    with torch.no_grad():
        before = model(x)
        patched = fk.apply_fpet(model, layer=2)(x)
        after = fk.remove_fpet(model)(x)
    assert not torch.equal(before, patched)
    assert torch.equal(before, after)
    assert not hasattr(model.blocks[2], "token_merger") and "forward" not in vars(model.blocks[2])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_fused_attention_receives_log_size_mask():
    model = fk.apply_fpet(tiny_vit(), layer=1)
    assert all(block.attn.fused_attn for block in model.blocks)
    masks = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            model(images(model))
    finally:
        F.scaled_dot_product_attention = original
    size = get_fpet_patch(model).state.get("size")
    assert masks[:2] == [None, None] and len(masks) == 4
    for mask in masks[2:]:
        assert mask.dtype == torch.float32 and mask.shape == (2, 1, 1, 33)
        torch.testing.assert_close(mask, size.log()[:, None, None, :])


def test_fused_and_unfused_attention_agree_with_proportional_attention():
    model = fk.apply_fpet(tiny_vit(), layer=1)
    x = images(model)
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        unfused = model(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_prop_attn_off_passes_no_mask():
    x = images(tiny_vit())
    with torch.no_grad():
        on = fk.apply_fpet(tiny_vit(), layer=1)(x)
        off = fk.apply_fpet(tiny_vit(), layer=1, prop_attn=False)(x)
    assert not torch.allclose(on, off)


def test_state_dict_round_trip():
    model = fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    state = model.state_dict()
    assert any(k.startswith("blocks.1.token_merger.") for k in state)
    fresh = fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1)
    fresh.load_state_dict(state)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_deepcopy_of_a_patched_model():
    model = fk.apply_fpet(tiny_vit(), layer=1)
    clone = copy.deepcopy(model)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
    assert get_fpet_patch(clone).vit is clone
    fk.remove_fpet(clone)
    with torch.no_grad():
        assert torch.equal(clone(x), tiny_vit()(x))
        assert model(x).shape == (2, 5)  # the original stays patched


def test_state_is_reset_per_forward_and_private_to_threads():
    model = fk.apply_fpet(tiny_vit(global_pool="avg"), layer=1)
    small, large = images(model, batch=1, seed=1), images(model, batch=3, seed=2)
    with torch.no_grad():
        want_small, want_large = model(small), model(large)
    results = {}

    def run(name, x):
        with torch.no_grad():
            for _ in range(5):
                results.setdefault(name, []).append(model(x))

    threads = [threading.Thread(target=run, args=("small", small)), threading.Thread(target=run, args=("large", large))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, want_small) for r in results["small"])
    assert all(torch.equal(r, want_large) for r in results["large"])


def test_training_lowers_loss_and_only_intended_parameters_get_gradients():
    model = fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1).train()
    trainable = fk.mark_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert names == {n for n in names if "lora_" in n or ".token_merger." in n or n.startswith("head.")}
    assert any(".token_merger." in n for n in names) and any("lora_" in n for n in names)
    x = images(model, batch=8)
    y = torch.arange(8) % 5
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (name in names), name
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0]
    merger = model.blocks[1].token_merger
    assert merger.down.weight.grad.abs().sum() > 0 and merger.up.weight.grad.abs().sum() > 0


def test_bfloat16_autocast_forward_and_backward():
    model = fk.apply_fpet(tiny_vit(), layer=1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(model))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("make", [lambda: timm.create_model("convnext_atto"), lambda: torch.nn.Linear(3, 3)])
def test_unsupported_model_is_refused(make):
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        fk.apply_fpet(make())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 4\)"):
        fk.apply_fpet(tiny_vit(), layer=4)
    with pytest.raises(ValueError, match="global_pool='map' is not supported"):
        fk.apply_fpet(tiny_vit(global_pool="map"))
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.apply_fpet(tiny_vit(), backend="fast")
    with pytest.raises(ValueError, match="refine_bits must be 1 or 32"):
        fk.apply_fpet(tiny_vit(), refine_bits=8)
    with pytest.raises(ValueError, match="not patched with FPET"):
        fk.remove_fpet(tiny_vit())
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        fk.apply_fpet(tiny_vit(img_size=8))


def test_double_apply_is_refused():
    model = fk.apply_fpet(tiny_vit())
    with pytest.raises(ValueError, match="already patched"):
        fk.apply_fpet(model)


def test_unsupported_block_type_is_refused():
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(ValueError, match="not a timm pre-norm Block"):
        fk.apply_fpet(tiny_vit(block_fn=ParallelScalingBlock))


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpp", marks=backend_marks("cpp"))])
def test_torch_compile_of_a_patched_model(backend):
    model = fk.apply_fpet(fk.add_pet(tiny_vit(global_pool="avg"), "adaptformer"), layer=1, backend=backend)
    compiled = torch.compile(model, backend="aot_eager")
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x).square().sum().backward()
    assert model.blocks[1].token_merger.down.weight.grad is not None


@requires_backend("cpp")
def test_cpp_backend_matches_reference_in_a_model():
    backend = "cpp"
    x = images(tiny_vit(), batch=3)
    outputs, grads = {}, {}
    for name in ("reference", backend):
        model = fk.apply_fpet(fk.add_pet(tiny_vit(global_pool="avg"), "lora"), layer=1, backend=name,
                              refine_dropout=0.0)
        with torch.no_grad():
            outputs[name, "eval"] = model(x)
        model.train()
        fk.mark_trainable(model)
        out = model(x)
        out.square().sum().backward()
        outputs[name, "train"] = out.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for mode in ("eval", "train"):
        torch.testing.assert_close(outputs[backend, mode], outputs["reference", mode], rtol=1e-4, atol=1e-5)
    assert grads[backend].keys() == grads["reference"].keys()
    for name, grad in grads["reference"].items():
        torch.testing.assert_close(grads[backend][name], grad, rtol=1e-3, atol=1e-5, msg=name)


@requires_backend("triton")
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_apply_fpet_triton_matches_reference(reg_tokens):
    triton = get_backend("triton")
    device = triton.devices[0]
    outputs, parameter_grads = {}, {}
    for backend in ("reference", "triton"):
        model = fk.apply_fpet(tiny_vit(reg_tokens=reg_tokens, img_size=(64, 56)), layer=1, backend=backend)
        inputs = images(model).to(device)
        model.to(device)
        with torch.no_grad():
            outputs[backend] = model(inputs)
        model(inputs).square().sum().backward()  # eval mode: no dropout, so both backends see the same function
        parameter_grads[backend] = {n: p.grad for n, p in model.named_parameters() if "token_merger" in n}
    assert_close(outputs["triton"], outputs["reference"], triton.forward[torch.float32], "logits")
    assert parameter_grads["triton"].keys() == parameter_grads["reference"].keys()
    for name, grad in parameter_grads["reference"].items():
        assert_close(parameter_grads["triton"][name], grad, triton.grad[torch.float32], name)
