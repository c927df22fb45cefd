"""The experiment scripts of python/: the accuracy table, the SKIP table and the linear probe, on shortened runs."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.helpers import REPO


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "python", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "data"))


def test_accuracy_table_quick_run(tmp_path, capsys):
    table = _script("accuracy_table")
    out = tmp_path / "out"
    assert table.main(["--quick", "--tasks", "count", "--methods", "linear probe,FPET+LoRA", "--threads", "1",
                       "--timing-runs", "1", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((out / "accuracy_table.json").read_text())
    assert report["tasks"] == ["count"] and report["methods"] == ["linear probe", "FPET+LoRA"]
    assert report["pairs"] == []  # LoRA alone was not run
    for method in report["methods"]:
        assert 0.0 <= report["accuracy"][method]["count"] <= 100.0
        assert report["mean"][method] == report["accuracy"][method]["count"]
    assert report["trainable_params"]["linear probe"] < report["trainable_params"]["FPET+LoRA"]
    speed = report["speed"]
    assert set(speed) == {"backbone", "linear probe", "FPET+LoRA"}
    assert speed["FPET+LoRA"]["gflops_per_image"] < speed["linear probe"]["gflops_per_image"]
    assert speed["backbone"]["speedup"] == 1.0
    markdown = (out / "accuracy_table.md").read_text()
    assert "| FPET+LoRA |" in markdown and "| backbone (no training) |" in markdown
    # --resume reuses the stored runs (same config): the same accuracies, nothing retrained
    mtime = os.path.getmtime(tmp_path / "runs" / "count" / "fpet-lora" / "pet.safetensors")
    assert table.main(["--quick", "--tasks", "count", "--methods", "linear probe,FPET+LoRA", "--threads", "1",
                       "--timing-runs", "1", "--out", str(out), "--runs", str(tmp_path / "runs"), "--resume"]) == 0
    assert os.path.getmtime(tmp_path / "runs" / "count" / "fpet-lora" / "pet.safetensors") == mtime
    assert json.loads((out / "accuracy_table.json").read_text())["accuracy"] == report["accuracy"]


def test_skip_table_quick_run(tmp_path):
    table = _script("skip_table")
    out = tmp_path / "out"
    args = ["--quick", "--tasks", "count", "--threads", "1", "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert table.main(args) == 0
    report = json.loads((out / "skip_table.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["prompt tuning (VPT)", "SKIP keep 0.5", "FPET+VPT", "FPET+SKIP keep 0.5"]
    for name in names:
        assert 0.0 <= report["accuracy"][name]["count"] <= 100.0
    speed = report["speed"]
    assert speed["SKIP keep 0.5"]["gflops_per_image"] < speed["prompt tuning (VPT)"]["gflops_per_image"]
    assert speed["FPET+SKIP keep 0.5"]["gflops_per_image"] < speed["SKIP keep 0.5"]["gflops_per_image"]
    assert report["ffn_params"]["SKIP keep 0.5"] < 0.51 * report["ffn_params"]["prompt tuning (VPT)"]
    assert [goal["met"] in (True, False) for goal in report["goals"]] == [True, True]
    markdown = (out / "skip_table.md").read_text()
    assert "| FPET+SKIP keep 0.5 |" in markdown and "| goal |" in markdown
    mtime = os.path.getmtime(tmp_path / "runs" / "count" / "vpt" / "keep0.5" / "pet.safetensors")
    assert table.main(args + ["--resume"]) == 0  # reuses the jobs: nothing retrained
    assert os.path.getmtime(tmp_path / "runs" / "count" / "vpt" / "keep0.5" / "pet.safetensors") == mtime


def test_accuracy_table_refuses_unknown_methods(tmp_path):
    with pytest.raises(SystemExit, match="unknown --methods"):
        _script("accuracy_table").main(["--methods", "LoRA,ToMe", "--out", str(tmp_path)])


def test_linear_probe_features_and_probe():
    import numpy as np
    import torch

    probe = _script("linear_probe")
    from fpet_kernels import models

    torch.manual_seed(0)
    model = models.build_pocket_vit(0).eval()
    images = torch.randn(6, 3, 64, 64)
    features = probe.extract_features(model, [(images[i], i % 2) for i in range(6)], batch_size=4)
    with torch.inference_mode():
        tokens = model.forward_features(images)
    np.testing.assert_allclose(features["token"], tokens[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(features["avg"], tokens[:, 1:].mean(1).numpy(), atol=1e-6)
    assert features["last4"].shape == (6, 5 * models.POCKET_VIT["embed_dim"])
    np.testing.assert_allclose(features["last4"][:, 3 * 128:4 * 128], features["token"], atol=1e-6)
    np.testing.assert_array_equal(features["labels"], [0, 1, 0, 1, 0, 1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    assert probe.probe_accuracy(x[:30], y[:30], x[30:], y[30:], C=10.0) >= 80.0
