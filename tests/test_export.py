"""ONNX export (fpet_kernels.export, `fpet export`): onnxruntime gives PyTorch's outputs at other batch sizes than the
traced one, the FPET graph has fewer FLOPs than the unmerged one, the model itself is left unchanged, bad input is
refused clearly."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import fpet_kernels as fk  # noqa: E402
from fpet_kernels.cli import main  # noqa: E402
from fpet_kernels.export import _check_outputs, export_onnx, onnx_gflops, onnx_session, time_onnx  # noqa: E402
from fpet_kernels.models import create_model  # noqa: E402
from fpet_kernels.tools import benchmark  # noqa: E402


def _pocket(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return create_model("pocket-vit", num_classes)


def _fpet_lora(**fpet):
    model = _pocket()
    fk.add_pet(model, "lora")
    fk.apply_fpet(model, **fpet)
    torch.manual_seed(1)  # LoRA's B starts at zero: give the folded weight something to fold
    for name, parameter in model.named_parameters():
        if "lora_" in name or "token_merger" in name:
            parameter.data.normal_(0, 0.05)
    return model.eval()


def _run(path, images):
    session = onnx_session(path)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = _fpet_lora()
    plain = fk.remove_fpet(copy.deepcopy(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_onnx(model, folder / "fpet.onnx")
    plain_result = export_onnx(plain, folder / "plain.onnx")
    return model, plain, before, result, plain_result


def test_onnxruntime_matches_pytorch_with_a_dynamic_batch(exported):
    model, _, _, result, _ = exported
    assert result.dynamic_batch and result.checked_batches == (1, 3) and result.max_abs_diff < 1e-4
    assert result.folded == ("lora",) and result.fpet_layer == fk.vit_patch.get_fpet_patch(model).layer
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(_run(result.path, images), expected, atol=1e-4, rtol=1e-4)
    graph = onnx.load(result.path).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][0] != ""


def test_the_graph_merges_with_plain_onnx_ops(exported):
    _, _, _, result, plain_result = exported
    nodes = onnx.load(result.path).graph.node
    assert all(node.domain in ("", "ai.onnx") for node in nodes)  # no custom op
    scatters = [n for n in nodes if n.op_type.startswith("Scatter")]
    assert scatters and all(n.op_type == "ScatterElements" for n in scatters)
    assert {onnx.helper.get_attribute_value(a) for n in scatters for a in n.attribute if a.name == "reduction"} \
        == {b"add"}
    assert any(n.op_type == "ArgMax" for n in nodes)
    # no LoRA branch left: the plain graph has as many MatMuls as the FPET graph less the merge's score matmul
    plain_nodes = onnx.load(plain_result.path).graph.node
    assert not any(n.op_type.startswith("Scatter") or n.op_type == "ArgMax" for n in plain_nodes)


def test_fewer_flops_than_the_unmerged_export_and_the_counter_agrees_with_torch(exported):
    model, plain, _, result, plain_result = exported
    assert result.gflops < 0.85 * plain_result.gflops
    image = torch.randn(1, 3, 64, 64)
    torch_gflops = benchmark.count_gflops(fk.fold_pet(copy.deepcopy(plain)).eval(), image)
    assert plain_result.gflops == pytest.approx(torch_gflops, rel=0.02)
    assert onnx_gflops(result.path, batch=4) == pytest.approx(result.gflops, rel=1e-6)


def test_the_model_itself_is_left_unchanged(exported):
    model, _, before, _, _ = exported
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.blocks[0].attn.qkv, fk.pet.LoRAQKV)
    assert not model.training
    assert [b.attn.fused_attn for b in model.blocks] == [b.attn.fused_attn for b in _pocket().blocks]


@pytest.mark.parametrize("method", ["adaptformer", "vpt-shallow", "bi-lora", None])
def test_pet_methods_export(tmp_path, method):
    model = _pocket()
    if method is not None:
        fk.add_pet(model, method)
    fk.apply_fpet(model, prop_attn=method != "adaptformer", backend="reference")
    result = export_onnx(model.eval(), tmp_path / "m.onnx", check_batches=(2,))
    assert result.max_abs_diff < 1e-4
    assert result.folded == (("bi-lora",) if method == "bi-lora" else ())


def test_avg_pool_and_no_fold(tmp_path):
    model = _pocket()
    model.reset_classifier(5, global_pool="avg")
    fk.add_pet(model, "lora")
    fk.apply_fpet(model)
    result = export_onnx(model.eval(), tmp_path / "m.onnx", fold=False, check_batches=(4,))
    assert result.folded == () and result.max_abs_diff < 1e-4


def test_eva_exports(tmp_path):
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=3, use_rot_pos_emb=True,
                swiglu_mlp=True, global_pool="avg")
    fk.apply_fpet(model, 2)
    assert export_onnx(model.eval(), tmp_path / "eva.onnx", check_batches=(3,)).max_abs_diff < 1e-4


def test_static_batch(tmp_path):
    result = export_onnx(_fpet_lora(), tmp_path / "m.onnx", batch_size=1, dynamic_batch=False)
    assert result.checked_batches == (1,)
    shape = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape] == [1, 3, 64, 64]


def test_the_check_catches_a_wrong_graph(tmp_path, exported):
    _, plain, _, result, _ = exported  # the FPET graph against the model without FPET
    param = next(plain.parameters())
    with pytest.raises(ValueError, match="differs from PyTorch"):
        _check_outputs(plain, result.path, (2,), (64, 64), 1e-4, 1e-4, 0, param)


def test_bad_arguments_are_refused(tmp_path):
    model = _fpet_lora()
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        export_onnx(model, path, batch_size=1)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, path, opset=17)
    with pytest.raises(ValueError, match="atol"):
        export_onnx(model, path, atol=-1)
    with pytest.raises(ValueError, match="check_batches"):
        export_onnx(model, path, check_batches=(0,))
    with pytest.raises(ValueError, match="img_size"):
        export_onnx(model, path, img_size=48)
    tome = fk.apply_tome(_pocket(), 4)
    with pytest.raises(ValueError, match="ToMe"):
        export_onnx(tome, path)
    with pytest.raises(ValueError, match="runs"):
        time_onnx([path], torch.zeros(1, 3, 64, 64), runs=0)
    assert not path.exists()


def _save(tmp_path, fpet=True):
    model = _fpet_lora() if fpet else fk.add_pet(_pocket(), "lora")
    path = tmp_path / ("pet.safetensors" if fpet else "plain.safetensors")
    fk.save_pet(model, path)
    return path


def test_cli_export_compare(tmp_path, capsys):
    checkpoint = _save(tmp_path)
    out = tmp_path / "deploy" / "model.onnx"
    args = ["export", "--pet-checkpoint", str(checkpoint), "--onnx", str(out), "--compare", "--runs", "2",
            "--time-batch", "2", "--threads", "1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["max_abs_diff"] < 1e-4 and out.is_file()
    assert report["unmerged"]["path"].endswith("model.unmerged.onnx")
    assert report["unmerged"]["gflops"] > report["export"]["gflops"]
    assert report["onnxruntime"]["speedup"] > 0 and report["onnxruntime"]["batch"] == 2
    assert main(["export", "--pet-checkpoint", str(checkpoint), "--onnx", str(out), "--no-check"]) == 0
    line = capsys.readouterr().out
    assert "lora folded" in line and "not checked" in line and "FPET merge at block" in line


def test_cli_export_mistakes_are_one_line(tmp_path, capsys):
    checkpoint = _save(tmp_path)
    plain = _save(tmp_path, fpet=False)
    cases = [
        (["--pet-checkpoint", str(checkpoint), "--onnx", str(tmp_path / "m.txt")], "--onnx"),
        (["--pet-checkpoint", str(plain), "--onnx", str(tmp_path / "m.onnx"), "--compare"], "--compare"),
        (["--pet-checkpoint", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--batch-size", "1"],
         "--static-batch"),
        (["--pet-checkpoint", str(tmp_path / "missing.safetensors"), "--onnx", str(tmp_path / "m.onnx")],
         "pet-checkpoint"),
    ]
    for extra, expected in cases:
        assert main(["export", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    for flag, value in (("--opset", "12"), ("--atol", "-1"), ("--rtol", "nan")):
        with pytest.raises(SystemExit):
            main(["export", "--pet-checkpoint", str(checkpoint), "--onnx", "m.onnx", flag, value])
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1
