"""`fpet bench` (fpet_kernels.tools.model_bench) on a tiny timm ViT: every variant, the report, the errors."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

from fpet_kernels.cli import main
from fpet_kernels.tome import apply_tome
from fpet_kernels.tools import benchmark, model_bench

TINY = ["--models", "test_vit", "--img-size", "64", "--batch-size", "2", "--threads", "1", "--rounds", "2",
        "--warmup", "0", "--latency-rounds", "2", "--train-batch", "2", "--train-rounds", "1", "--no-progress"]


def test_bench_writes_the_report(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["models"]["test_vit"]["variants"]
    from fpet_kernels.backends import resolve_backend

    assert report["models"]["test_vit"]["merge_backend"] == resolve_backend("auto", torch.device("cpu")).name
    tome = [name for name in rows if name.startswith("ToMe r=")]
    assert {"backbone", "free halving", *model_bench.PET_VARIANTS} <= set(rows) and 1 <= len(tome) <= 3
    assert rows["backbone"]["vs_backbone"] == 1.0
    assert rows["backbone"]["params"]["trainable"] == rows["backbone"]["params"]["total"]
    assert rows["free halving"]["params"]["trainable"] is None
    for name in model_bench.PET_VARIANTS:
        row = rows[name]
        assert 0 < row["params"]["trainable"] < row["params"]["total"]
        assert row["train_step_s"] > 0 and len(row["train_step_seconds"]) == 1
        assert row["train_memory"]["peak_rss_mib"] > 0 and row["train_memory"]["method"]
    assert rows["FPET+LoRA"]["gflops"] < rows["LoRA"]["gflops"]
    assert rows["free halving"]["gflops"] < rows["backbone"]["gflops"]
    # eval as deployed: LoRA folded into qkv, so LoRA has the backbone's GFLOPs and FPET+LoRA the free halving's
    assert report["settings"]["fold_lora"] and rows["LoRA"]["gflops"] == pytest.approx(rows["backbone"]["gflops"])
    assert rows["FPET+LoRA"]["gflops"] < rows["FPET+AdaptFormer"]["gflops"]
    assert all(len(r["eval_seconds"]) == 2 and r["latency_p50_ms"] <= r["latency_p90_ms"] for r in rows.values())
    assert (tmp_path / "throughput_vs_gflops.png").stat().st_size > 0 and (tmp_path / "training.png").exists()
    table = (tmp_path / "bench.md").read_text()
    assert "| FPET+LoRA |" in table and "| free halving |" in table
    assert "| FPET+LoRA |" in capsys.readouterr().out


def test_bench_given_tome_r_and_no_train(tmp_path):
    assert main(["bench", *TINY, "--tome-r", "1,3", "--no-train", "--no-plots", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["models"]["test_vit"]["variants"]
    assert [n for n in rows if n.startswith("ToMe")] == ["ToMe r=1", "ToMe r=3"]
    assert "train_step_s" not in rows["LoRA"] and not (tmp_path / "training.png").exists()


def test_bench_unfolded_lora(tmp_path):
    args = ["bench", *TINY, "--tome-r", "1", "--no-train", "--no-plots", "--unfolded-lora", "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["models"]["test_vit"]["variants"]
    assert not report["settings"]["fold_lora"] and rows["LoRA"]["gflops"] > rows["backbone"]["gflops"]
    assert "eval with LoRA unfolded" in (tmp_path / "bench.md").read_text()


def test_matched_tome_r_is_the_closest():
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", pretrained=False, img_size=64).eval()
    one = torch.randn(1, 3, 64, 64)
    gflops = {r: benchmark.count_gflops(apply_tome(copy.deepcopy(backbone), r), one) for r in range(1, 9)}
    target = (gflops[3] + gflops[4]) / 2 + 1e-6
    best = min(gflops, key=lambda r: abs(gflops[r] - target))
    assert model_bench.matched_tome_r(backbone, target, one) == best


def test_bench_errors(capsys):
    assert main(["bench", "--models", "resnet18", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VisionTransformer" in err
    with pytest.raises(SystemExit):
        main(["bench", "--rounds", "0"])
    assert "expected a round count" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--tome-r", "x"])
    assert "comma-separated ints" in capsys.readouterr().err
