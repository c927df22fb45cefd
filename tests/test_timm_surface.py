"""The rest of timm's surface on an FPET-patched model (docs/design.md §2 step 10): ``unmerge_tokens`` and
:func:`record_merge`, the feature APIs (``forward_intermediates``, ``get_intermediate_layers``, ``features_only``),
``forward_head`` on features of an earlier forward, ``prune_intermediate_layers`` / ``set_input_size`` /
``reset_classifier``, and ``patch_drop_rate``. Each test failed on the main before these were added."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels import ops
from fpet_kernels.geometry import Checkerboard
from fpet_kernels.vit_patch import MergeInfo, record_merge

from tests.helpers import backend_marks, images, tiny_vit

BACKENDS = [pytest.param("reference"), pytest.param("cpp", marks=backend_marks("cpp"))]


# ---------------------------------------------------------------------------------------------- the unmerge op
def unmerge_loop(x, index, grid):
    """The definition, one token at a time."""
    batch, _, channels = x.shape
    out = torch.empty(batch, grid.num_tokens, channels, dtype=x.dtype)
    for b in range(batch):
        for j in range(grid.num_b):
            out[b, grid.b_token(j)] = x[b, j]
        for i in range(grid.num_a):
            out[b, grid.a_token(i)] = x[b, index[b, i]]
    return out


@pytest.mark.parametrize("grid_size,prefix", [((4, 4), 1), ((3, 5), 0), ((5, 2), 2), ((1, 2), 1), ((7, 7), 5)])
def test_unmerge_tokens_matches_the_loop_and_its_gradient(grid_size, prefix):
    grid = Checkerboard.of(grid_size, prefix)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, grid.num_b, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.randint(prefix, grid.num_b, (3, grid.num_a), generator=generator)
    out = ops.unmerge_tokens(x, index, grid_size, prefix)
    assert torch.equal(out, unmerge_loop(x.detach(), index, grid))
    assert torch.autograd.gradcheck(lambda t: ops.unmerge_tokens(t, index, grid_size, prefix), (x,))


def test_unmerge_tokens_refuses_bad_input():
    x, index = torch.randn(2, 9, 4), torch.full((2, 8), 1)
    with pytest.raises(ValueError, match="x has 8 tokens but"):
        ops.unmerge_tokens(x[:, :8], index, (4, 4), 1)
    with pytest.raises(TypeError, match="index must be an int64"):
        ops.unmerge_tokens(x, index.int(), (4, 4), 1)
    with pytest.raises(ValueError, match=r"index must have shape \[B, NA\] = \[2, 8\]"):
        ops.unmerge_tokens(x, index[:, :7], (4, 4), 1)
    with pytest.raises(ValueError, match=r"must lie in \[P, NB\)"):
        ops.unmerge_tokens(x, torch.zeros(2, 8, dtype=torch.int64), (4, 4), 1)


# ---------------------------------------------------------------------------------------------- record_merge
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_record_merge_returns_the_assignment_the_forward_used(backend, grad):
    model = fk.apply_fpet(tiny_vit(global_pool="avg"), layer=1, backend=backend)
    x = images(model)
    with torch.set_grad_enabled(grad):
        expected = model(x)
        with record_merge(model) as merges:
            out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    (info,) = merges
    assert isinstance(info, MergeInfo) and info.layer == 1 and info.grid_size == (8, 8)
    assert info.index.shape == (2, 32) and info.size.shape == (2, 33)
    # the recorded sizes count the patches merged into each token
    counts = torch.ones(2, 33).scatter_add_(1, info.index, torch.ones(2, 32))
    assert torch.equal(info.size, counts)
    with pytest.raises(ValueError, match="not patched with FPET"):
        with record_merge(tiny_vit()):
            pass


# ---------------------------------------------------------------------------------------------- feature APIs
def test_forward_intermediates_are_unmerged_onto_the_grid():
    plain = tiny_vit(img_size=56, global_pool="avg")  # a 7x7 grid: timm's reshape used to fail on it
    model = fk.apply_fpet(copy.deepcopy(plain), layer=1)
    x = images(model)
    with torch.no_grad():
        final, blocks = model.forward_intermediates(x)
        expected_final, expected_blocks = plain.forward_intermediates(x)
        merged = model.forward_intermediates(x, output_fmt="NLC", fpet_merged=True, return_prefix_tokens=True)
    assert [tuple(t.shape) for t in blocks] == [(2, 32, 7, 7)] * 4 and final.shape == expected_final.shape
    torch.testing.assert_close(blocks[0], expected_blocks[0])  # before the merge: the unpatched model's
    info = merged["fpet_merge"]
    for block in (1, 3):
        tokens = torch.cat([merged["image_intermediates_prefix"][block], merged["image_intermediates"][block]], 1)
        assert tokens.shape[1] == 1 + 24
        dense = unmerge_loop(tokens, info.index, Checkerboard.of((7, 7), 1))[:, 1:]
        torch.testing.assert_close(blocks[block], dense.reshape(2, 7, 7, 32).permute(0, 3, 1, 2))
    # the unmerged final features pool to the model's own output (each token repeated size times)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(final), model(x), atol=1e-6, rtol=1e-5)


def test_forward_intermediates_output_forms():
    model = fk.apply_fpet(tiny_vit(reg_tokens=2), layer=2)
    x = images(model)
    with torch.no_grad():
        pairs = model.forward_intermediates(x, indices=[1, 3], return_prefix_tokens=True, intermediates_only=True)
        as_dict = model.forward_intermediates(x, indices=2, output_dict=True, output_fmt="NLC")
        early = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NLC", fpet_merged=True)
        layers = model.get_intermediate_layers(x, n=4, reshape=True)
    assert [(tuple(p.shape), tuple(c.shape)) for p, c in pairs] == [((2, 32, 8, 8), (2, 3, 32))] * 2
    assert [tuple(t.shape) for t in as_dict["image_intermediates"]] == [(2, 64, 32)] * 2
    assert as_dict["image_features"].shape == (2, 67, 32) and "image_intermediates_prefix" not in as_dict
    assert early["fpet_merge"] is None  # stopped before the merge block
    assert [tuple(t.shape) for t in layers] == [(2, 32, 8, 8)] * 4
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x, fpet_merged=True)


def test_features_only_model_gives_timm_shapes():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, img_size=64,
                              out_indices=(1, 3, 5, 11))
    fk.apply_fpet(model)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in features] == [(1, 192, 4, 4)] * 4


def test_dense_head_on_unmerged_features_learns():
    """Segmentation-style use: a 1x1 head on the unmerged last-block features learns a per-patch label (bright
    patch or dark patch) in a few steps."""
    torch.manual_seed(0)
    model = fk.apply_fpet(tiny_vit(img_size=32), layer=1)
    model.requires_grad_(False)
    head = torch.nn.Conv2d(32, 2, kernel_size=1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)

    def batch():
        labels = torch.randint(0, 2, (16, 4, 4), generator=generator)
        pixels = labels.float().repeat_interleave(8, 1).repeat_interleave(8, 2) * 2 - 1
        return (pixels.unsqueeze(1).expand(-1, 3, -1, -1) + 0.3 * torch.randn(16, 3, 32, 32)), labels

    def loss_and_accuracy(x, labels):
        (features,) = model.forward_intermediates(x, indices=[3], intermediates_only=True)
        logits = head(features)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    x_test, labels_test = batch()
    with torch.no_grad():
        before, _ = loss_and_accuracy(x_test, labels_test)
    for _ in range(40):
        loss, _ = loss_and_accuracy(*batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, accuracy = loss_and_accuracy(x_test, labels_test)
    assert after < 0.6 * before and accuracy > 0.8, (float(before), float(after), float(accuracy))


# ---------------------------------------------------------------------------------------------- forward_head
@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_forward_head_on_features_of_an_earlier_forward_is_refused(pool):
    model = fk.apply_fpet(tiny_vit(global_pool=pool), layer=1)
    with torch.no_grad():
        first = model.forward_features(images(model, seed=1))
        expected = model.forward_head(first)
        second = model.forward_features(images(model, seed=2))
        with pytest.raises(ValueError, match="not the output of this thread's last forward_features"):
            model.forward_head(first)
        smaller = model.forward_features(images(model, batch=1, seed=3))
        with pytest.raises(ValueError, match="token sizes are unknown"):
            model.forward_head(second)  # another batch size: sizes of a different shape
        torch.testing.assert_close(model.forward_head(smaller.detach()), model(images(model, batch=1, seed=3)))
        torch.testing.assert_close(expected, model(images(model, seed=1)))


def test_forward_head_with_token_pooling_needs_no_sizes():
    model = fk.apply_fpet(tiny_vit(global_pool="token"), layer=1)
    with torch.no_grad():
        first = model.forward_features(images(model, seed=1))
        expected = model.forward_head(first)
        model.forward_features(images(model, seed=2))
        torch.testing.assert_close(model.forward_head(first), expected)


# ---------------------------------------------------------------------------------------------- model surgery
def test_prune_intermediate_layers_keeps_the_patch_consistent():
    model = fk.apply_fpet(tiny_vit(), layer=2)
    with pytest.raises(ValueError, match="would drop FPET's merge block 2"):
        model.prune_intermediate_layers(indices=[0, 1])
    assert len(model.blocks) == 4
    assert model.prune_intermediate_layers(indices=[1, 2], prune_head=False) == [1, 2]
    assert len(model.blocks) == 3
    with torch.no_grad():
        assert model(images(model)).shape == (2, 5)
    fk.remove_fpet(model)  # used to fail with an IndexError
    plain = tiny_vit()
    plain.prune_intermediate_layers(indices=[1, 2], prune_head=False)
    with torch.no_grad():
        assert torch.equal(model(images(model)), plain(images(plain)))


def test_set_input_size_and_reset_classifier_keep_the_patch():
    plain = tiny_vit(global_pool="token")
    model = fk.apply_fpet(copy.deepcopy(plain), layer=1)
    for net in (plain, model):
        net.set_input_size(img_size=(48, 40))  # a 6x5 grid
        net.reset_classifier(3, "avg")
    model.head.load_state_dict(plain.head.state_dict())
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad(), record_merge(model) as merges:
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert features.shape == (2, 1 + 15, 32) and merges[0].grid_size == (6, 5)
    size = merges[0].size[:, 1:].unsqueeze(-1)
    torch.testing.assert_close(logits, model.head(model.fc_norm((features[:, 1:] * size).sum(1) / size.sum(1))))
    fk.remove_fpet(model)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_patch_dropout_is_refused_at_apply():
    with pytest.raises(ValueError, match="patch_drop_rate=0.25 is not supported by FPET"):
        fk.apply_fpet(tiny_vit(patch_drop_rate=0.25))


def test_tome_refuses_the_feature_api():
    model = fk.apply_tome(tiny_vit(), r=4)
    with pytest.raises(NotImplementedError, match="not supported on a ToMe model"):
        model.forward_intermediates(images(model))
    with torch.no_grad():
        first = model.forward_features(images(model, seed=1))
        model.forward_features(images(model, seed=2))
    model.global_pool = "avg"
    with pytest.raises(ValueError, match="ToMe features"):
        model.forward_head(first)
