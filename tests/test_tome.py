"""The ToMe-style baseline (fpet_kernels.tome): the merge against a slow loop version, the timm patch, its errors."""
from __future__ import annotations

import pytest
import timm
import torch

from fpet_kernels import add_pet, apply_fpet, apply_tome, mark_trainable, remove_fpet, remove_tome
from fpet_kernels.tome import bipartite_soft_matching, get_tome_patch, tome_merge
from fpet_kernels.tools.benchmark import tokens_per_block


def loop_tome_merge(x, metric, size, r, prefix):
    """ToMe written out token by token: the same semantics as tome_merge, one batch item at a time (r = 0: no-op)."""
    if r == 0:
        return x, size
    outputs, sizes = [], []
    for b in range(x.shape[0]):
        patches = list(range(prefix, x.shape[1]))
        a_tokens, b_tokens = patches[0::2], patches[1::2]
        unit = torch.nn.functional.normalize(metric[b].double(), dim=-1)
        best = []
        for i in a_tokens:
            scores = [float(unit[i] @ unit[j]) for j in b_tokens]
            j = max(range(len(b_tokens)), key=lambda k: (scores[k], -k))  # first index of the max
            best.append((scores[j], j))
        order = sorted(range(len(a_tokens)), key=lambda k: -best[k][0])  # stable: ties keep index order
        merged, kept = order[:r], order[r:]
        rows = [x[b, t] for t in range(prefix)]
        row_sizes = [size[b, t] for t in range(prefix)]
        for k in kept:
            rows.append(x[b, a_tokens[k]])
            row_sizes.append(size[b, a_tokens[k]])
        for jb, t in enumerate(b_tokens):
            members = [t] + [a_tokens[k] for k in merged if best[k][1] == jb]
            weight = sum(size[b, m] for m in members)
            rows.append(sum(size[b, m] * x[b, m] for m in members) / weight if len(members) > 1 else x[b, t])
            row_sizes.append(weight)
        outputs.append(torch.stack(rows))
        sizes.append(torch.stack(row_sizes))
    return torch.stack(outputs), torch.stack(sizes)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("patches", [2, 7, 16])
@pytest.mark.parametrize("with_size", [False, True])
def test_tome_merge_matches_the_loop_version(prefix, patches, with_size):
    torch.manual_seed(prefix * 100 + patches)
    batch, channels, dim = 3, 5, 4
    tokens = prefix + patches
    x = torch.randn(batch, tokens, channels, dtype=torch.float64)
    metric = torch.randn(batch, tokens, dim, dtype=torch.float64)
    size = torch.rand(batch, tokens, dtype=torch.float64) * 3 + 0.5 if with_size else None
    for r in range(patches // 2 + 1):
        out, out_size = tome_merge(x, metric, size, r, prefix)
        expected, expected_size = loop_tome_merge(x, metric, size if size is not None else torch.ones(
            batch, tokens, dtype=torch.float64), r, prefix)
        assert out.shape == (batch, tokens - r, channels)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_size, expected_size, rtol=1e-12, atol=1e-12)
        # the total size, and the size-weighted sum of the tokens, are conserved
        full = torch.ones(batch, tokens, dtype=torch.float64) if size is None else size
        torch.testing.assert_close(out_size.sum(1), full.sum(1))
        torch.testing.assert_close((out * out_size[..., None]).sum(1), (x * full[..., None]).sum(1))


def test_tome_merge_gradient_flows_to_every_member():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    metric = torch.randn(2, 9, 4, dtype=torch.float64)
    size = torch.rand(2, 9, dtype=torch.float64) + 0.5
    torch.autograd.gradcheck(lambda t: tome_merge(t, metric, size, 3, 1)[0], (x,))


def test_matching_bounds_and_kept_order():
    metric = torch.randn(2, 11, 4)
    with pytest.raises(ValueError, match=r"r must be in \[0, 5\]"):
        bipartite_soft_matching(metric, 6, 1)
    src, dst, kept = bipartite_soft_matching(metric, 2, 1)
    assert src.shape == dst.shape == (2, 2) and kept.shape == (2, 3)
    assert torch.equal(torch.sort(torch.cat([src, kept], 1), 1).values, torch.arange(5).expand(2, 5))
    assert int(dst.max()) < 5


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=64, **kwargs).eval()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_apply_tome_token_counts_and_remove_restores_outputs(global_pool):
    model = _vit(global_pool=global_pool)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(images)
    grid = model.patch_embed.num_patches  # 16 patches + 1 class token at 64x64
    apply_tome(model, 3)
    assert get_tome_patch(model) is not None
    counts = tokens_per_block(model, images)
    expected, tokens = [], 1 + grid
    for _ in model.blocks:
        expected.append(tokens)
        tokens -= min(3, (tokens - 1) // 2)
    assert counts == expected
    with torch.inference_mode():
        merged = model(images)
    assert merged.shape == before.shape and torch.isfinite(merged).all()
    assert not torch.allclose(merged, before)
    remove_tome(model)
    assert get_tome_patch(model) is None
    with torch.inference_mode():
        assert torch.equal(model(images), before)


def test_tome_r_zero_keeps_the_outputs():
    model = _vit()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(images)
        apply_tome(model, 0)
        torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-6)


def test_tome_schedule_per_block_and_training_step():
    model = add_pet(_vit(), "lora")
    depth = len(model.blocks)
    apply_tome(model, [2] + [0] * (depth - 1))
    images = torch.randn(2, 3, 64, 64)
    assert tokens_per_block(model, images) == [17] + [15] * (depth - 1)
    mark_trainable(model)
    model.train()
    model(images).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tome_errors():
    model = _vit()
    with pytest.raises(ValueError, match="r must be an int >= 0 or a list of"):
        apply_tome(model, -1)
    with pytest.raises(ValueError, match="r must be"):
        apply_tome(model, [1, 2])
    with pytest.raises(ValueError, match="r must be"):
        apply_tome(model, True)
    with pytest.raises(ValueError, match="not patched with ToMe"):
        remove_tome(model)
    apply_tome(model, 2)
    with pytest.raises(ValueError, match="already patched with ToMe"):
        apply_tome(model, 2)
    with pytest.raises(ValueError, match="patched with ToMe; FPET and ToMe cannot be combined"):
        apply_fpet(model)
    remove_tome(model)
    apply_fpet(model)
    with pytest.raises(ValueError, match="patched with FPET"):
        apply_tome(model, 2)
    remove_fpet(model)
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_tome(torch.nn.Linear(2, 2), 1)
