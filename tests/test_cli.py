"""The `fpet` command."""
import subprocess
import sys

import pytest

import fpet_kernels
from fpet_kernels import cli
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
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "gpu-report", "train", "eval", "export", "data"):
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
    # merged inside block 4
    assert "65x8" in " ".join(lines["backbone"]) and "65x5, 33x3" in " ".join(lines["FPET+LoRA"])
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


# ------------------------------------------------------------------ user mistakes: one line on stderr, no traceback
def _error_line(capsys, argv, command, status=2):
    """Run ``fpet argv`` in-process: it must end with ``status`` and print exactly one line ``fpet <command>:
    error: ...`` on stderr, without a traceback; return that line."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fpet {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_a_swin_model_is_one_line_naming_the_reason(capsys, command):
    flag = "--models" if command == "bench" else "--model"
    line = _error_line(capsys, [command, flag, "swin_tiny_patch4_window7_224", "--no-progress"], command)
    assert f"argument {flag}: " in line and "SwinTransformer" in line and "no single token grid" in line


@pytest.mark.parametrize("command", ["demo", "bench", "train"])
def test_a_resnet_model_is_one_line_naming_the_reason(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "data"))
    flag = "--models" if command == "bench" else "--model"
    extra = ["--data", "pocket-vtab:digits", "--out", str(tmp_path / "run")] if command == "train" else []
    line = _error_line(capsys, [command, flag, "resnet18", "--no-progress", *extra], command)
    assert f"argument {flag}: " in line and "ResNet" in line and "convolutional models" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("model, layer, depth", [("vit_tiny_patch16_224", "12", 12), ("test_vit", "6", 6),
                                                 ("pocket-vit", "8", 8)])
def test_a_merge_layer_outside_the_model_is_one_line(tmp_path, monkeypatch, capsys, model, layer, depth):
    """--layer == depth: the timing demo (timm models) and the fine-tuning demo (pocket-vit, before any training)."""
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "data"))
    argv = ["demo", "--model", model, "--layer", layer, "--epochs", "1", "--runs", "1", "--warmup", "0",
            "--no-progress", "--out", str(tmp_path / "runs")]
    line = _error_line(capsys, argv, "demo")
    assert f"argument --layer: expected a merge block in [0, {depth}) for {model} ({depth} blocks), got {layer}" in line
    assert not (tmp_path / "runs").exists()
    assert "argument --layer" in _error_line(capsys, ["demo", "--layer", "-1"], "demo")


def test_zero_runs_is_one_line(capsys):
    line = _error_line(capsys, ["demo", "--model", "vit_tiny_patch16_224", "--runs", "0"], "demo")
    assert line == "fpet demo: error: argument --runs: expected a run count (an int >= 1), got '0'"


@pytest.mark.parametrize("command", ["demo", "train", "bench"])
def test_zero_threads_is_one_line(capsys, command):
    extra = ["--data", "pocket-vtab:digits"] if command == "train" else []
    line = _error_line(capsys, [command, "--model" + ("s" if command == "bench" else ""), "vit_tiny_patch16_224",
                                "--threads", "0", *extra], command)
    assert "argument --threads: expected a thread count (an int >= 1), got '0'" in line


def test_train_with_an_image_size_off_the_patch_grid_is_one_line(capsys, tmp_path):
    line = _error_line(capsys, ["train", "--data", "pocket-vtab:digits", "--model", "test_vit", "--img-size", "33",
                                "--out", str(tmp_path / "run")], "train")
    assert "argument --img-size: test_vit has 16x16 patches" in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["-1", "0"])
def test_a_batch_size_below_one_is_one_line(capsys, size):
    line = _error_line(capsys, ["demo", "--model", "vit_tiny_patch16_224", "--batch-size", size], "demo")
    assert f"argument --batch-size: expected a batch size (an int >= 1), got '{size}'" in line


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--model", "test_vit", "--warmup", "-1"], "--warmup"),
        (["--model", "test_vit", "--num-classes", "-1"], "--num-classes"),
        (["--epochs", "-1"], "--epochs"),
        (["--task", "no-such-task"], "--task"),
        (["--model", "test_vit", "--img-size", "33"], "--img-size"),
        (["--model", "test_vit", "--checkpoint", "MISSING"], "--checkpoint"),
        (["--model", "no_such_model"], "--model"),
    ],
)
def test_other_demo_mistakes_are_one_line(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "data"))
    argv = [str(tmp_path / "missing.pth") if a == "MISSING" else a for a in argv]
    line = _error_line(capsys, ["demo", *argv, "--no-progress", "--out", str(tmp_path / "runs")], "demo")
    assert f"argument {flag}: " in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--jobs", "0"], "--jobs"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--triton-archs", "x"], "--triton-archs"),
        (["--launcher", "no_such_module:launch"], "--launcher"),
        (["--launcher", "json:no_such_function"], "--launcher"),
        (["--launcher", "json"], "--launcher"),
    ],
)
def test_gpu_report_mistakes_are_one_line(capsys, argv, flag):
    line = _error_line(capsys, ["gpu-report", "--roofline", *argv], "gpu-report")
    assert f"argument {flag}: " in line


@pytest.mark.parametrize("argv", [[], ["no-such-command"]])
def test_a_missing_or_unknown_command_is_one_line(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("fpet: error: "), err
    assert "fpet --help" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"fpet {fpet_kernels.__version__} (torch ") and "timm " in out
    assert len(out.strip().splitlines()) == 1


def _failing_command(error):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    "error, status, text",
    [
        (ValueError("no good\nat all"), 1, "fpet data: error: no good at all (set FPET_DEBUG=1 for the traceback)"),
        (FileNotFoundError(2, "No such file or directory", "x.bin"), 1, "No such file or directory: 'x.bin'"),
        (KeyboardInterrupt(), 130, "fpet data: interrupted"),
    ],
)
def test_a_failed_run_is_one_line_and_FPET_DEBUG_shows_the_traceback(monkeypatch, capsys, error, status, text):
    monkeypatch.setattr(cli, "run_data", _failing_command(error))
    monkeypatch.delenv("FPET_DEBUG", raising=False)
    capsys.readouterr()
    try:
        assert main(["data", "--list"]) == status
    except (KeyboardInterrupt, Exception) as escaped:  # a KeyboardInterrupt would end the whole pytest session
        pytest.fail(f"{escaped!r} escaped main()")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and text in err and "Traceback" not in err
    monkeypatch.setenv("FPET_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["data", "--list"])


def test_a_config_error_out_of_a_command_names_its_flag(monkeypatch, capsys):
    from fpet_kernels.train import ConfigError

    monkeypatch.setattr(cli, "run_data", _failing_command(ConfigError("seed", "expected a seed")))
    line = _error_line(capsys, ["data", "--list"], "data")
    assert line == "fpet data: error: argument --seed: expected a seed"


def test_internal_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "run_data", _failing_command(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["data", "--list"])


def test_help_documents_exit_status_and_FPET_DEBUG(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "FPET_DEBUG=1" in out and "--version" in out and "130 when interrupted" in out
