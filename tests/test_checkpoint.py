"""PET checkpoints (fpet_kernels/checkpoint.py): save_pet / load_pet round trips for every method with and without
FPET, packed 1-bit weights and deploy checkpoints, mismatch errors, fold_pet, remove_pet, determinism."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.binary import binarize
from fpet_kernels.checkpoint import DeployedBinaryLinear, _binary_modules
from fpet_kernels.pet import LoRAQKV, pet_config, pet_parameters
from fpet_kernels.vit_patch import get_fpet_patch

from tests.helpers import images, run_python, tiny_vit

METHODS = sorted(fk.PET_METHODS)
BACKBONE_KEYS = ("base_layer", "pos_embed", "cls_token", "patch_embed", "mlp.fc1", "attn.proj", "norm1", "norm2")


def pet_model(method="lora", fpet=False, seed=1, **fpet_kwargs):
    """tiny_vit + method (+ FPET at layer 1) with every PET parameter moved off its init, so that a wrong or
    missing tensor shows in the outputs (LoRA and AdaptFormer start as the identity)."""
    model = fk.add_pet(tiny_vit(), method)
    if fpet:
        fk.apply_fpet(model, layer=1, **fpet_kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pet_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def outputs(model, x):
    """Eval outputs under no_grad (LoRA adds its products in place) and with grad mode on (out of place)."""
    with torch.no_grad():
        folded = model(x)
    return folded, model(x).detach()


def stored_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("fpet", [False, True], ids=["plain", "fpet"])
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_onto_a_fresh_backbone(method, fpet, tmp_path):
    model = pet_model(method, fpet)
    path = tmp_path / "pet.safetensors"
    info = fk.save_pet(model, path)
    loaded = fk.load_pet(tiny_vit(), path)
    x = images(model)
    for got, want in zip(outputs(loaded, x), outputs(model, x)):
        assert torch.equal(got, want)
    assert pet_config(loaded) == pet_config(model) == [{"method": method, "hparams": fk.PET_METHODS[method]}]
    assert (get_fpet_patch(loaded) is not None) == fpet
    want_params = pet_parameters(model)
    got_params = pet_parameters(loaded)
    assert set(got_params) == set(want_params)
    for name, param in want_params.items():  # latent 1-bit weights too: training can resume
        assert torch.equal(got_params[name], param), name
    assert info.num_params == sum(p.numel() for p in want_params.values())
    assert info.file_bytes == path.stat().st_size


def test_only_pet_parameters_are_stored(tmp_path):
    model = pet_model("bi-lora", fpet=True)
    path = tmp_path / "pet.safetensors"
    info = fk.save_pet(model, path)
    tensors = stored_tensors(path)
    keys = set(tensors)
    names = {key.split("@")[0] for key in keys}
    assert names == set(pet_parameters(model))
    assert not [key for key in keys if any(part in key for part in BACKBONE_KEYS)]
    assert {"head.weight", "head.bias", "blocks.1.token_merger.down.weight@signs"} <= keys
    # The file is its header and these tensors, nothing else.
    header = int.from_bytes(path.read_bytes()[:8], "little")
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == info.float_bytes + info.binary_bytes
    assert path.stat().st_size == 8 + header + payload
    meta = fk.read_pet_checkpoint(path)
    assert set(meta) == {"format", "format_version", "version", "deploy", "backbone", "pet", "fpet", "binary"}
    assert meta["backbone"] == {
        "class": "VisionTransformer", "embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": [8, 8],
        "img_size": [64, 64], "num_prefix_tokens": 1, "num_classes": 5, "global_pool": "token",
        "sha256": meta["backbone"]["sha256"],
    }
    assert meta["pet"] == [{"method": "bi-lora", "hparams": {"rank": 32, "scale": 1.0}}]
    assert meta["fpet"] == {"layer": 1, "refine_dim": 32, "refine_bits": 1, "refine_scale": 1.0,
                            "refine_dropout": 0.1, "prop_attn": True, "backend": "auto"}


def test_packed_binary_weights_and_deploy_checkpoint(tmp_path):
    model = pet_model("bi-lora", fpet=True)
    train_path, deploy_path = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    train = fk.save_pet(model, train_path)
    deploy = fk.save_pet(model, deploy_path, deploy=True)
    binary = _binary_modules(model)
    n = sum(m.weight.numel() for m in binary.values())
    assert deploy.num_binary_params == train.num_binary_params == n == 16 * 32 * 32 + 2 * 16 * 32
    # 8 signs per byte, plus mu and sigma (4 bytes each) per weight; no fixes needed at this init.
    tensors = stored_tensors(deploy_path)
    for name, module in binary.items():
        assert tensors[f"{name}@signs"].dtype == torch.uint8
        assert tensors[f"{name}@signs"].numel() == math.ceil(module.weight.numel() / 8)
        assert name not in tensors  # deploy: no latent weight
    assert deploy.binary_bytes == n // 8 + 8 * len(binary)
    assert 1 / 32 <= deploy.binary_bytes / (4 * n) < 1 / 32 * 1.1
    assert train.file_bytes - deploy.file_bytes >= 4 * n  # the latent float32 weights
    # The rebuilt 1-bit weights are the model's Q(W), bit for bit; outputs are equal.
    loaded = fk.load_pet(tiny_vit(), deploy_path)
    rebuilt = _binary_modules(loaded)
    for name, module in binary.items():
        assert isinstance(rebuilt[name], DeployedBinaryLinear)
        assert torch.equal(rebuilt[name].weight, binarize(module.weight).detach()), name
    x = images(model)
    loaded.eval()
    for got, want in zip(outputs(loaded, x), outputs(model.eval(), x)):
        assert torch.equal(got, want)


def test_deploy_model_is_frozen_and_resaves_identically(tmp_path):
    path = tmp_path / "deploy.safetensors"
    fk.save_pet(pet_model("bi-adaptformer", fpet=True), path, deploy=True)
    loaded = fk.load_pet(tiny_vit(), path)
    names = {n for n, _ in loaded.named_parameters()}
    assert not any(n.endswith(("adaptformer.down.weight", "token_merger.up.weight")) for n in names)
    with pytest.raises(ValueError, match="no latent weights; save with deploy=True"):
        fk.save_pet(loaded, tmp_path / "again.safetensors")
    fk.save_pet(loaded, tmp_path / "again.safetensors", deploy=True)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_outlier_weights_rebuild_exactly(tmp_path):
    """|W^| > ~4.7: the straight-through value W^ + (c sign - W^) is not exactly c sign in float32; the packed
    record carries those elements, so the deployed weight is still Q(W) bit for bit."""
    model = pet_model("bi-lora")
    weight = model.blocks[0].attn.qkv.lora_a_q.weight
    with torch.no_grad():
        weight[0, :3] = torch.tensor([40.0, -25.0, 9.0]) * weight.std()
    path = tmp_path / "deploy.safetensors"
    fk.save_pet(model, path, deploy=True)
    assert stored_tensors(path)["blocks.0.attn.qkv.lora_a_q.weight@fix_index"].numel() > 0
    loaded = fk.load_pet(tiny_vit(), path)
    assert torch.equal(loaded.blocks[0].attn.qkv.lora_a_q.weight, binarize(weight).detach())
    x = images(model)
    for got, want in zip(outputs(loaded, x), outputs(model, x)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(embed_dim=48), "embed_dim: checkpoint 32 vs model 48"),
    (dict(depth=3), "depth: checkpoint 4 vs model 3"),
    (dict(patch_size=16), "patch_size: checkpoint [8, 8] vs model [16, 16]"),
    (dict(img_size=32), "img_size: checkpoint [64, 64] vs model [32, 32]"),
    (dict(num_classes=7), "num_classes: checkpoint 5 vs model 7"),
    (dict(class_token=False, global_pool="avg"), "num_prefix_tokens: checkpoint 1 vs model 0"),
])
def test_another_architecture_is_refused(kwargs, message, tmp_path):
    path = tmp_path / "pet.safetensors"
    fk.save_pet(pet_model("lora", fpet=True), path)
    other = tiny_vit(**kwargs)
    with pytest.raises(ValueError, match="another architecture") as error:
        fk.load_pet(other, path)
    assert message in str(error.value)
    assert pet_config(other) == [] and get_fpet_patch(other) is None


def test_other_pet_on_the_model_is_refused_and_matching_pet_is_accepted(tmp_path):
    path = tmp_path / "pet.safetensors"
    saved = pet_model("lora", fpet=True)
    fk.save_pet(saved, path)
    cases = [
        (fk.add_pet(tiny_vit(), "adaptformer"), "PET methods: checkpoint ['lora'] vs model ['adaptformer']"),
        (fk.add_pet(tiny_vit(), "lora", rank=4), "lora rank: checkpoint 8 vs model 4"),
        (fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=2), "FPET layer: checkpoint 1 vs model 2"),
        (fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1, refine_bits=32),
         "FPET refine_bits: checkpoint 1 vs model 32"),
        (fk.add_pet(tiny_vit(), "lora"), "vs model none"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match="already has PET / FPET that differs") as error:
            fk.load_pet(model, path)
        assert message in str(error.value)
    # The same PET and FPET already on the model: the tensors are loaded into it (the kernel backend may differ).
    model = fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1)
    fk.load_pet(model, path)
    x = images(model)
    assert torch.equal(outputs(model, x)[0], outputs(saved, x)[0])
    fk.load_pet(fk.apply_fpet(fk.add_pet(tiny_vit(), "lora"), layer=1, backend="reference"), path)


def test_tensors_of_another_shape_are_refused_and_nothing_changes(tmp_path):
    from safetensors.torch import save_file

    path, bad = tmp_path / "pet.safetensors", tmp_path / "bad.safetensors"
    fk.save_pet(pet_model("bi-adaptformer", fpet=True), path)
    tensors = stored_tensors(path)
    raw = json.dumps(fk.read_pet_checkpoint(path), sort_keys=True)
    tensors["head.weight"] = tensors["head.weight"][:, :16].clone()
    tensors["blocks.0.adaptformer.up.weight@signs"] = tensors["blocks.0.adaptformer.up.weight@signs"][:-1].clone()
    del tensors["blocks.2.adaptformer.down.weight"]  # a latent 1-bit weight
    tensors["blocks.0.extra"] = torch.zeros(3)
    save_file(tensors, str(bad), metadata={"fpet_pet": raw})
    fresh = tiny_vit()
    with pytest.raises(ValueError, match="does not fit this model") as error:
        fk.load_pet(fresh, bad)
    message = str(error.value)
    assert "head.weight: checkpoint shape [5, 16] vs model [5, 32]" in message
    assert "blocks.0.adaptformer.up.weight@signs: checkpoint shape [127] vs model [128]" in message
    assert "lacks: ['blocks.2.adaptformer.down.weight'] (1)" in message
    assert "no place for: ['blocks.0.extra'] (1)" in message
    # The failed load took its PET and FPET off again: the backbone is untouched.
    assert pet_config(fresh) == [] and get_fpet_patch(fresh) is None
    assert list(fresh.state_dict()) == list(tiny_vit().state_dict())
    x = images(fresh)
    assert torch.equal(outputs(fresh, x)[0], outputs(tiny_vit(), x)[0])


def test_other_backbone_weights_are_refused_unless_asked(tmp_path):
    path = tmp_path / "pet.safetensors"
    fk.save_pet(pet_model("lora"), path)
    other = tiny_vit()
    with torch.no_grad():
        other.blocks[0].mlp.fc1.weight.add_(1e-3)
    with pytest.raises(ValueError, match="backbone weights differ"):
        fk.load_pet(other, path)
    assert pet_config(other) == []
    fk.load_pet(other, path, check_backbone=False)
    assert pet_config(other)[0]["method"] == "lora"


def test_what_save_pet_refuses(tmp_path):
    path = tmp_path / "pet.safetensors"
    model = pet_model("lora")
    fk.mark_trainable(model)
    model.norm.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['norm.weight', 'norm.bias'\] \(2\) outside them require grad"):
        fk.save_pet(model, path)
    model = tiny_vit()
    model.blocks[0].attn.qkv = LoRAQKV(model.blocks[0].attn.qkv)  # not through add_pet: no record to rebuild from
    with pytest.raises(ValueError, match="lora modules .*blocks.0.attn.qkv.* that add_pet did not record"):
        fk.save_pet(model, path)
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="not added by fpet_kernels .*peft"):
        fk.save_pet(model, path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not an fpet_kernels PET checkpoint"):
        fk.load_pet(tiny_vit(), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        fk.load_pet(tiny_vit(), path)


@pytest.mark.parametrize("method", ["lora", "bi-lora"])
def test_fold_pet_gives_plain_linear_qkv_with_the_same_outputs(method, tmp_path):
    model = pet_model(method, fpet=True)
    x = images(model)
    want_folded, want_branch = outputs(model, x)
    fk.fold_pet(model)
    assert all(type(block.attn.qkv) is nn.Linear for block in model.blocks)
    got_folded, got_branch = outputs(model, x)
    torch.testing.assert_close(got_folded, want_folded, rtol=0, atol=1e-5)  # one GEMM vs base + low-rank products
    torch.testing.assert_close(got_branch, want_branch, rtol=0, atol=1e-5)
    assert pet_config(model) == []
    with pytest.raises(ValueError, match="folded into its qkv weights by fold_pet"):
        fk.save_pet(model, tmp_path / "pet.safetensors")
    with pytest.raises(ValueError, match="folded by fold_pet; the original qkv weights are gone"):
        fk.remove_pet(model)
    fk.save_pet(pet_model(method, fpet=True), tmp_path / "pet.safetensors")
    with pytest.raises(ValueError, match="folded into its qkv weights by fold_pet"):
        fk.load_pet(model, tmp_path / "pet.safetensors")


def test_fold_pet_refuses_what_cannot_be_folded():
    for method in ("adaptformer", "vpt-deep", "linear"):
        with pytest.raises(ValueError, match="no LoRA to fold"):
            fk.fold_pet(pet_model(method))
    model = fk.add_pet(pet_model("lora"), "vpt-shallow")
    with pytest.raises(ValueError, match=r"\['vpt'\] \(1\) cannot be folded .*strict=False"):
        fk.fold_pet(model)
    assert isinstance(model.blocks[0].attn.qkv, LoRAQKV)  # nothing changed
    x = images(model)
    want = outputs(model, x)[0]
    fk.fold_pet(model, strict=False)
    assert type(model.blocks[0].attn.qkv) is nn.Linear and hasattr(model, "vpt")
    assert [r["method"] for r in pet_config(model)] == ["vpt-shallow"]
    torch.testing.assert_close(outputs(model, x)[0], want, rtol=0, atol=1e-5)


def _hooks(model):
    return [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("method", METHODS)
def test_remove_pet_restores_the_backbone_exactly(method, tmp_path):
    reference = tiny_vit()
    model = tiny_vit()
    qkv = [block.attn.qkv for block in model.blocks]
    fk.apply_fpet(fk.add_pet(model, method), layer=1)
    with torch.no_grad():
        for name, param in pet_parameters(model).items():
            if not name.startswith("head."):
                param.add_(0.1)
    fk.remove_pet(model)
    assert [block.attn.qkv for block in model.blocks] == qkv and all(type(q) is nn.Linear for q in qkv)
    assert _hooks(model) == _hooks(reference)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert [set(vars(m)) for m in model.modules()] == [set(vars(m)) for m in reference.modules()]
    assert model.num_prefix_tokens == reference.num_prefix_tokens
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = images(model)
    for a, b in zip(outputs(model, x), outputs(reference, x)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no PET .* or FPET .* to remove"):
        fk.remove_pet(model)


def _train_two_steps_and_save(path, seed):
    backbone = tiny_vit()  # seeds torch with 0 itself
    torch.manual_seed(seed)  # PET init and dropout masks
    model = fk.apply_fpet(fk.add_pet(backbone, "bi-lora"), layer=1)
    fk.mark_trainable(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        x = images(model, batch=4, seed=step)
        F.cross_entropy(model(x), torch.arange(4) % 5).backward()
        optimizer.step()
        optimizer.zero_grad()
    fk.save_pet(model, path)
    return model.eval()


def test_same_seed_training_gives_identical_checkpoint_bytes(tmp_path):
    first = _train_two_steps_and_save(tmp_path / "a.safetensors", seed=0)
    _train_two_steps_and_save(tmp_path / "b.safetensors", seed=0)
    _train_two_steps_and_save(tmp_path / "c.safetensors", seed=1)
    a, b, c = ((tmp_path / f"{k}.safetensors").read_bytes() for k in "abc")
    assert a == b and a != c
    loaded = fk.load_pet(tiny_vit(), tmp_path / "a.safetensors")
    x = images(first)
    assert torch.equal(outputs(loaded, x)[0], outputs(first, x)[0])


def test_importing_the_package_does_not_import_safetensors():
    assert run_python("import sys, json, fpet_kernels; print(json.dumps('safetensors' in sys.modules))") is False
