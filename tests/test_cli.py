"""The `fpet` command."""
import subprocess
import sys

from fpet_kernels.cli import _format_tokens, main


def test_format_tokens():
    assert _format_tokens([197] * 7 + [99] * 5) == "197x7, 99x5"


def test_demo_prints_the_comparison_table(capsys):
    assert main(["demo", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--runs", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             ("backbone", "LoRA", "FPET+LoRA")}
    assert set(lines) == {"backbone", "LoRA", "FPET+LoRA"}
    assert "197x12" in lines["backbone"] and "197x7, 99x5" in lines["FPET+LoRA"]
    fields = lines["FPET+LoRA"].split()
    assert float(fields[3]) < float(lines["backbone"].split()[2])  # fewer GFLOPs
    assert fields[-1] in ("reference", "cpp")


def test_demo_loads_a_local_checkpoint(tmp_path, capsys):
    import timm
    import torch

    path = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=7).state_dict(), path)
    args = ["demo", "--model", "vit_tiny_patch16_224", "--num-classes", "7", "--checkpoint", str(path),
            "--batch-size", "1", "--runs", "1", "--warmup", "0"]
    assert main(args) == 0
    assert str(path) in capsys.readouterr().out


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "fpet_kernels", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--checkpoint" in result.stdout



def test_help_lists_every_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "gpu-report", "train", "eval", "data"):
        assert command in out


def test_fine_tuning_demo_on_the_shipped_backbone(tmp_path, monkeypatch, capsys):
    """The README's main command, shortened: 1 epoch per method on a pocket-VTAB task generated into tmp_path."""
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "data"))
    args = ["demo", "--task", "orientation", "--epochs", "1", "--runs", "1", "--warmup", "0", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "runs")]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
             ("backbone", "LoRA", "FPET+LoRA")}
    assert set(lines) == {"backbone", "LoRA", "FPET+LoRA"}
    assert lines["backbone"][1] == "-" and lines["LoRA"][1].endswith("%") and lines["FPET+LoRA"][1].endswith("%")
    assert 0.0 <= float(lines["FPET+LoRA"][1].rstrip("%")) <= 100.0
    assert "65x8" in " ".join(lines["backbone"]) and "65x5, 33x3" in " ".join(lines["FPET+LoRA"])  # merged inside block 4
    gflops = {name: float(fields[-4]) for name, fields in lines.items()}
    assert gflops["FPET+LoRA"] < gflops["LoRA"]
    assert lines["FPET+LoRA"][-1] in ("reference", "cpp")
    for name in ("lora", "fpet-lora"):  # the runs are kept with --out
        assert (tmp_path / "runs" / name / "pet.safetensors").is_file()


def test_demo_timing_only_and_bad_models(capsys):
    assert main(["demo", "--timing-only", "--batch-size", "2", "--runs", "1", "--warmup", "0"]) == 0
    assert "64x64" in capsys.readouterr().out
    assert main(["demo", "--model", "resnet18", "--runs", "1"]) == 2
    assert "VisionTransformer" in capsys.readouterr().err
