"""SKIP (fpet_kernels.skip): attribution against a one-neuron-at-a-time autograd computation, selection, structural
pruning (exactness cases), the bias fold, checkpoints of pruned models, SKIP on FPET-patched models, bad input, and
the `fpet skip` command on a tiny task."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fpet_kernels import add_pet, apply_fpet, load_pet, mark_trainable, save_pet
from fpet_kernels.cli import main
from fpet_kernels.skip import (
    attribute_ffn,
    check_keep_ratio,
    ffn_parameters,
    prune_ffn,
    select_neurons,
    skip_config,
    skip_prune,
)
from fpet_kernels.tools.benchmark import count_gflops
from fpet_kernels.vit_patch import get_fpet_patch

from .helpers import tiny_vit


def _model(fpet: bool = False, prompts: bool = True) -> torch.nn.Module:
    model = tiny_vit(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=4)
    if prompts:
        add_pet(model, "vpt-shallow", num_tokens=2)
    if fpet:
        apply_fpet(model, 1, refine_bits=32, backend="reference")
    torch.manual_seed(1)
    with torch.no_grad():  # prompts and head away from their init, so the gradients are not special
        for param in mark_and_list(model):
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def mark_and_list(model):
    mark_trainable(model)
    return [p for p in model.parameters() if p.requires_grad]


def _batches(count: int = 2, batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 4, (batch,), generator=generator))
            for _ in range(count)]


def _brute_force_attribution(model, batches):
    """A[l, n] one neuron and one example at a time: d z_y / d h[:, n] from a zero perturbation of column n only."""
    vit = model
    layers = len(vit.blocks)
    width = vit.blocks[0].mlp.fc1.out_features
    scores = torch.zeros(layers, width, dtype=torch.float64)
    examples = 0
    for images, labels in batches:
        for i in range(images.shape[0]):
            image, label = images[i:i + 1], int(labels[i])
            for layer in range(layers):
                for n in range(width):
                    state = {}

                    def hook(module, args, output, n=n):
                        delta = torch.zeros(output.shape[1], dtype=output.dtype, requires_grad=True)
                        state["delta"], state["h"] = delta, output.detach()
                        patch = get_fpet_patch(vit)
                        size = None if patch is None else patch.state.get("size")
                        state["size"] = size if size is not None and size.shape == output.shape[:2] else None
                        out = output.clone()
                        out[0, :, n] = out[0, :, n] + delta
                        return out

                    handle = vit.blocks[layer].mlp.act.register_forward_hook(hook)
                    try:
                        logit = model(image)[0, label]
                        (grad,) = torch.autograd.grad(logit, state["delta"])
                    finally:
                        handle.remove()
                    contribution = (state["h"][0, :, n].double() * grad.double()).abs()
                    weights = (torch.ones_like(contribution) if state["size"] is None
                               else state["size"][0].double())
                    scores[layer, n] += (contribution * weights).sum() / weights.sum()
            examples += 1
    return scores / examples


@pytest.mark.parametrize("fpet", [False, True], ids=["vit", "fpet"])
def test_attribution_equals_one_neuron_at_a_time_autograd(fpet):
    model = _model(fpet=fpet)
    batches = _batches()
    result = attribute_ffn(model, batches)
    expected = _brute_force_attribution(model, batches)
    assert result.num_examples == 6 and result.widths == [32, 32, 32]
    assert (expected > 0).float().mean() > 0.5  # the comparison is not between zeros
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-9)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_attribution_uses_size_weighted_means_on_merged_tokens():
    """On an FPET model the later blocks' token mean is size-weighted: it differs from the plain mean there, not
    before the merge block."""
    model = _model(fpet=True)
    batches = _batches(count=1)
    weighted = attribute_ffn(model, batches).mean_activation
    plain_means = []

    def hook(module, args, output):
        plain_means.append(output.detach().double().mean(dim=1).mean(dim=0))

    handles = [block.mlp.act.register_forward_hook(hook) for block in model.blocks]
    with torch.no_grad():
        model(batches[0][0])
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(weighted[0], plain_means[0])
    assert not torch.allclose(weighted[2], plain_means[2])


def test_keep_ratio_one_leaves_outputs_unchanged():
    model = _model()
    x = _batches(1)[0][0]
    before = model(x)
    report = skip_prune(model, _batches(), keep_ratio=1.0)
    assert report.kept == report.widths and skip_config(model) is None
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_pruning_neurons_with_zero_fc2_columns_leaves_outputs_unchanged():
    model = _model()
    x = _batches(1)[0][0]
    dead = [torch.tensor([0, 3, 7, 8, 20, 31]), torch.arange(0, 32, 2), torch.tensor([5])]
    with torch.no_grad():
        for block, columns in zip(model.blocks, dead):
            block.mlp.fc2.weight[:, columns] = 0
    before = model(x)
    kept = [torch.tensor([n for n in range(32) if n not in set(c.tolist())]) for c in dead]
    prune_ffn(model, kept)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [26, 16, 31]
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)


def test_bias_fold_is_exact_for_constant_activations():
    """Removed neurons whose fc1 rows are zero have activation act(bias) everywhere: folding their mean into fc2.bias
    reproduces the unpruned outputs; without the fold they are lost."""
    model = _model()
    x = _batches(1)[0][0]
    removed = torch.arange(16, 32)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight[removed] = 0
            block.mlp.fc1.bias[removed] = torch.linspace(-1, 2, 16)
    before = model(x)
    attribution = attribute_ffn(model, _batches())
    kept = [torch.arange(16)] * 3
    unfolded = prune_ffn(_copy(model), kept)
    prune_ffn(model, kept, mean_activation=attribution.mean_activation, fold_bias=True)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unfolded(x), before, atol=1e-3)
    assert skip_config(model)["folded"] == [0, 1, 2]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_pruned_model_has_fewer_parameters_and_flops():
    model = _model()
    x = _batches(1)[0][0][:1]
    params, ffn, flops = sum(p.numel() for p in model.parameters()), ffn_parameters(model), count_gflops(model, x)
    report = skip_prune(model, _batches(), keep_ratio=0.25)
    assert report.kept == [8, 8, 8]
    assert report.params_after == sum(p.numel() for p in model.parameters()) < params
    assert report.ffn_params_after == ffn_parameters(model) < ffn
    assert report.removed_share_of_ffn == pytest.approx((ffn - report.ffn_params_after) / ffn)
    assert count_gflops(model, x) < flops


def test_select_neurons_per_layer_and_global():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0], [0.1, 0.2, 0.3, 0.4], [9.0, 9.0, 8.0, 7.0]])
    layer = select_neurons(scores, 0.5)
    assert [k.tolist() for k in layer] == [[0, 2], [2, 3], [0, 1]]
    assert [k.numel() for k in select_neurons(scores, 0.3)] == [2, 2, 2]  # ceil(0.3 * 4)
    chosen = select_neurons(scores, 0.5, selection="global", min_keep_ratio=0.25)
    assert sum(k.numel() for k in chosen) == 6
    # the minimum of each layer (its best neuron), then the best of the rest over all layers: 9, 8, 7 before 4
    assert [k.tolist() for k in chosen] == [[0], [3], [0, 1, 2, 3]]
    assert [k.tolist() for k in select_neurons(torch.ones(1, 4), 0.5)] == [[0, 1]]  # ties: lower index


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_keep_ratios_are_refused(bad):
    with pytest.raises(ValueError, match="keep_ratio must be a number in \\(0, 1\\]"):
        check_keep_ratio(bad)
    with pytest.raises(ValueError, match="keep_ratio"):
        skip_prune(_model(), _batches(1), keep_ratio=bad)
    with pytest.raises(ValueError, match="keep_ratio"):
        select_neurons(torch.ones(2, 4), bad)


def test_prune_ffn_refuses_bad_indices():
    model = _model()
    with pytest.raises(ValueError, match="one entry per block"):
        prune_ffn(model, [torch.arange(4)])
    with pytest.raises(ValueError, match=r"kept\[1\] must index"):
        prune_ffn(model, [None, torch.tensor([0, 32]), None])
    with pytest.raises(ValueError, match="repeats"):
        prune_ffn(model, [torch.tensor([1, 1]), None, None])
    with pytest.raises(ValueError, match="empty"):
        prune_ffn(model, [torch.tensor([], dtype=torch.int64), None, None])
    with pytest.raises(ValueError, match="needs mean_activation"):
        prune_ffn(model, [torch.tensor([1]), None, None], fold_bias=True)
    assert skip_config(model) is None and model.blocks[0].mlp.fc1.out_features == 32


def test_pruning_twice_composes_indices():
    model = _model()
    prune_ffn(model, [torch.arange(4, 20), None, None])
    prune_ffn(model, [torch.tensor([0, 5, 15]), None, None])
    assert skip_config(model)["kept"][0].tolist() == [4, 9, 19]
    fresh = _model()
    prune_ffn(fresh, [torch.tensor([4, 9, 19]), None, None])
    x = _batches(1)[0][0]
    torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("fpet", [False, True], ids=["vit", "fpet"])
@pytest.mark.parametrize("fold", [False, True], ids=["nofold", "fold"])
def test_pruned_model_round_trips_through_save_and_load(tmp_path, fpet, fold):
    model = _model(fpet=fpet)
    x = _batches(1)[0][0]
    skip_prune(model, _batches(), keep_ratio=0.35, fold_bias=fold, selection="global")
    expected = model(x)
    path = tmp_path / "pruned.safetensors"
    save_pet(model, path)
    fresh = tiny_vit(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=4)
    load_pet(fresh, path)
    assert skip_config(fresh)["kept"].keys() == skip_config(model)["kept"].keys()
    for layer, kept in skip_config(model)["kept"].items():
        assert torch.equal(skip_config(fresh)["kept"][layer], kept)
    assert (get_fpet_patch(fresh) is not None) == fpet
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)
    load_pet(fresh, path)  # onto the same pruned model again: accepted, same outputs
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_loading_a_pruned_checkpoint_onto_other_weights_is_refused_and_changes_nothing(tmp_path):
    model = _model()
    skip_prune(model, _batches(), keep_ratio=0.5)
    path = tmp_path / "pruned.safetensors"
    save_pet(model, path)
    other = tiny_vit(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=4)
    with torch.no_grad():
        other.blocks[0].mlp.fc1.weight.add_(1.0)
    with pytest.raises(ValueError, match="backbone weights differ"):
        load_pet(other, path)
    assert skip_config(other) is None and other.blocks[0].mlp.fc1.out_features == 32
    unpruned = tiny_vit(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=4)
    add_pet(unpruned, "vpt-shallow", num_tokens=2)
    with pytest.raises(ValueError, match="SKIP: checkpoint pruned vs model unpruned"):
        load_pet(unpruned, path)


def test_skip_on_an_fpet_model_runs_and_retunes():
    from fpet_kernels.train import fit

    model = _model(fpet=True)
    skip_prune(model, _batches(), keep_ratio=0.25)
    trainable = mark_and_list(model)
    before = [p.detach().clone() for p in trainable]
    logs, _ = fit(model, _batches(count=2, batch=4, seed=3), epochs=2, lr=1e-2, warmup_epochs=0, progress=False,
                  log=lambda line: None)
    assert len(logs) == 2 and all(math.isfinite(entry["train_loss"]) for entry in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    assert all(not p.requires_grad for block in model.blocks for p in block.mlp.parameters())
    assert model.eval()(_batches(1)[0][0]).shape == (3, 4)


def test_attribution_refuses_unsupported_models():
    from fpet_kernels import apply_tome

    with pytest.raises(ValueError, match="ToMe"):
        attribute_ffn(apply_tome(_model(prompts=False), 2), _batches(1))
    model = _model()
    model.blocks[1].mlp.fc2 = torch.nn.Sequential(model.blocks[1].mlp.fc2)
    with pytest.raises(ValueError, match="block 1: mlp.fc1 / mlp.fc2 must be plain nn.Linear"):
        attribute_ffn(model, _batches(1))


# ---------------------------------------------------------------------------------------------- fpet skip
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from fpet_kernels import data

    return data.pocket_vtab_dir("distance", root=str(tmp_path_factory.mktemp("pocket")), sizes=(12, 6, 12),
                                progress=False)


SKIP_ARGS = ["--model", "pocket-vit", "--threads", "1", "--no-progress", "--throughput-runs", "1",
             "--batch-size", "6", "--warmup-epochs", "0.5", "--epochs", "1", "--retune-epochs", "1"]


@pytest.mark.parametrize("fpet", [False, True], ids=["vit", "fpet"])
def test_fpet_skip_command_writes_the_report(task_dir, tmp_path, capsys, fpet):
    out = tmp_path / "skip"
    args = ["skip", "--data", f"vtab1k:{task_dir}", *SKIP_ARGS, "--keep-ratios", "0.5,0.25", "--out", str(out)]
    assert main(args + (["--fpet"] if fpet else [])) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pet"] == "vpt-shallow" and results["fpet"] is fpet
    assert set(results["runs"]) == {"keep0.5", "keep0.25"}
    small, large = results["runs"]["keep0.25"], results["runs"]["keep0.5"]
    assert small["params_after"] < large["params_after"] < results["tuned"]["params"]
    assert small["gflops_per_image"] < large["gflops_per_image"] < results["tuned"]["gflops_per_image"]
    for run in (small, large):
        assert 0 <= run["test_acc_after_pruning"] <= 1 and 0 <= run["test_acc_after_retuning"] <= 1
        assert run["eval_img_per_s"] > 0 and run["speedup_vs_tuned"] > 0
    report = (out / "report.md").read_text()
    assert "| keep0.25 |" in report and "% of FFN" in report
    # the pruned checkpoint is an ordinary PET checkpoint: fpet eval rebuilds it on a fresh backbone
    capsys.readouterr()
    assert main(["eval", "--pet-checkpoint", str(out / "keep0.25" / "pet.safetensors"), "--data",
                 f"vtab1k:{task_dir}", "--model", "pocket-vit", "--threads", "1", "--no-progress",
                 "--throughput-runs", "1", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(small["test_acc_after_retuning"])


def test_fpet_skip_prunes_an_already_tuned_checkpoint(task_dir, tmp_path):
    tuned = tmp_path / "tuned"
    assert main(["train", "--data", f"vtab1k:{task_dir}", *SKIP_ARGS[:-2], "--pet", "lora", "--fpet", "--out",
                 str(tuned)]) == 0
    out = tmp_path / "skip"
    assert main(["skip", "--data", f"vtab1k:{task_dir}", *SKIP_ARGS, "--keep-ratios", "0.35", "--out", str(out),
                 "--tuned", str(tuned / "pet.safetensors")]) == 0
    results = json.loads((out / "results.json").read_text())
    trained = json.loads((tuned / "results.json").read_text())
    assert results["pet"] == "lora" and results["fpet"] is True and not (out / "tuned").exists()
    assert results["tuned"]["test_acc"] == pytest.approx(trained["test_acc"])
    assert results["runs"]["keep0.35"]["kept"] == [math.ceil(0.35 * 512)] * 8


@pytest.mark.parametrize("args, flag", [
    (["--keep-ratios", "0"], "--keep-ratios"),
    (["--keep-ratios", "1.5"], "--keep-ratios"),
    (["--keep-ratios", "nan"], "--keep-ratios"),
    (["--keep-ratios", "a,b"], "--keep-ratios"),
    (["--selection", "random"], "--selection"),
    (["--min-keep-ratio", "0"], "--min-keep-ratio"),
    (["--selection", "global", "--keep-ratios", "0.2", "--min-keep-ratio", "0.5"], "--min-keep-ratio"),
    (["--tuned", "no/such/file.safetensors"], "--tuned"),
])
def test_fpet_skip_argument_errors_are_one_line(task_dir, tmp_path, capsys, args, flag):
    from .test_train import _one_error_line

    line = _one_error_line(capsys, lambda: main(["skip", "--data", f"vtab1k:{task_dir}", *SKIP_ARGS, "--out",
                                                 str(tmp_path / "x"), *args]), "skip")
    assert f"argument {flag}" in line
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked
