"""fpet_kernels.train and the `fpet train` / `fpet eval` / `fpet data` commands, on a tiny task and a tiny timm ViT.

The data set is the pocket-VTAB task ``distance`` generated at 12 / 6 / 12 images (train800 / val200 / test) under
pytest's tmp_path and read as ``vtab1k:DIR``; the model is timm's ``test_vit`` (6 blocks, width 64) at 32x32
(a 2x2 patch grid), one thread. A run is 1-2 epochs of 2 steps. Nothing is written into the home cache.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fpet_kernels import data
from fpet_kernels.cli import main
from fpet_kernels.train import LOG_KEYS, RESULT_KEYS, ConfigError, TrainConfig, evaluate, learning_rate

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--threads", "1", "--no-progress", "--throughput-runs", "1", "--batch-size", "6", "--warmup-epochs", "0.5"]


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    """Any pocket-VTAB generation without an explicit root lands in tmp_path, never in the home cache."""
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "env_cache"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A tiny copy of the pocket-VTAB task ``distance`` (6 classes), as a VTAB-1k folder."""
    root = tmp_path_factory.mktemp("pocket")
    return data.pocket_vtab_dir("distance", root=str(root), sizes=(12, 6, 12), progress=False)


def _train(task_dir, out, *extra):
    """``fpet train`` in-process; returns its exit status."""
    return main(["train", "--data", f"vtab1k:{task_dir}", *MODEL, *FAST, "--out", str(out), *extra])


def _eval_json(task_dir, out, capsys, *extra):
    capsys.readouterr()
    args = ["eval", "--pet-checkpoint", str(out / "pet.safetensors"), "--data", f"vtab1k:{task_dir}",
            *MODEL[:2], "--threads", "1", "--no-progress", "--throughput-runs", "1", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fpet_run(task_dir, tmp_path_factory):
    """One FPET + LoRA run: 2 epochs of 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "fpet_lora"
    assert _train(task_dir, out, "--epochs", "2") == 0
    return out


def test_train_writes_the_documented_files(fpet_run):
    assert sorted(p.name for p in fpet_run.iterdir()) == ["config.json", "log.jsonl", "pet.safetensors",
                                                          "results.json"]
    lines = _read_jsonl(fpet_run / "log.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert set(line) == set(LOG_KEYS)
        assert 0 <= line["train_acc"] <= 1 and 0 <= line["val_acc"] <= 1
        assert line["seconds"] > 0 and line["img_per_s"] > 0 and line["peak_rss_mib"] > 0
    # 4 steps, 1 warm-up step: lr 1e-3 at steps 0 and 1, then the cosine: 1e-3 * (1 + cos(2 pi / 3)) / 2
    assert lines[0]["lr"] == pytest.approx(1e-3) and lines[1]["lr"] == pytest.approx(2.5e-4)
    results = json.loads((fpet_run / "results.json").read_text())
    assert set(results) == set(RESULT_KEYS)
    assert results["fpet"] is True and results["pet"] == "lora" and results["merge_backend"] in ("cpp", "reference")
    assert results["num_classes"] == 6 and results["img_size"] == 32 and results["test_images"] == 12
    assert results["val_acc"] == lines[-1]["val_acc"]
    assert results["test_acc"] == results["test_correct"] / 12
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["gflops_per_image"] > 0 and results["eval_img_per_s"] > 0 and results["threads"] == 1
    config = json.loads((fpet_run / "config.json").read_text())
    assert config["layer"] == 3 and config["threads"] == 1 and config["out"] == str(fpet_run)


def test_eval_reproduces_the_accuracies_train_recorded(fpet_run, task_dir, capsys):
    results = json.loads((fpet_run / "results.json").read_text())
    test = _eval_json(task_dir, fpet_run, capsys)
    assert (test["correct"], test["total"], test["accuracy"]) == (results["test_correct"], 12, results["test_acc"])
    assert test["fpet"] is True and test["pet"] == ["lora"] and test["gflops_per_image"] == results["gflops_per_image"]
    val = _eval_json(task_dir, fpet_run, capsys, "--split", "val")
    assert val["accuracy"] == results["val_acc"] and val["total"] == 6


def test_train_prints_the_trainable_parameter_count(task_dir, tmp_path, capsys):
    assert _train(task_dir, tmp_path / "run", "--epochs", "1", "--pet", "linear", "--no-fpet") == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert f"trainable parameters: {results['trainable_params']:,}" in out
    assert results["trainable_params"] == 64 * 6 + 6  # linear probe without FPET: the head only


def test_same_seed_gives_identical_checkpoint_bytes(task_dir, tmp_path):
    for name in ("a", "b"):
        assert _train(task_dir, tmp_path / name, "--epochs", "1") == 0
    assert _train(task_dir, tmp_path / "c", "--epochs", "1", "--seed", "1") == 0
    first = (tmp_path / "a" / "pet.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "pet.safetensors").read_bytes()
    assert first != (tmp_path / "c" / "pet.safetensors").read_bytes()
    logs = [_read_jsonl(tmp_path / name / "log.jsonl")[0] for name in ("a", "b")]
    assert logs[0]["train_loss"] == logs[1]["train_loss"] and logs[0]["val_acc"] == logs[1]["val_acc"]


def test_no_fpet_final_run_and_its_eval(task_dir, tmp_path, capsys):
    out = tmp_path / "final"
    assert _train(task_dir, out, "--epochs", "1", "--no-fpet", "--final", "--pet", "adaptformer") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fpet"] is False and results["merge_backend"] is None and results["final"] is True
    assert results["val_acc"] is None and results["val_images"] is None and results["train_images"] == 18
    assert _read_jsonl(out / "log.jsonl")[0]["val_acc"] is None
    test = _eval_json(task_dir, out, capsys)
    assert test["fpet"] is False and test["correct"] == results["test_correct"]


def test_pocket_vtab_spec_generates_the_task_quietly(tmp_path, capsys):
    """``pocket-vtab:TASK`` generates the task at its default sizes into $FPET_DATA_DIR (here under tmp_path) on
    first use, without a progress bar under --no-progress; the cheapest task, one epoch."""
    out = tmp_path / "run"
    assert main(["train", "--data", "pocket-vtab:faces", *MODEL, "--epochs", "1", "--threads", "1",
                 "--throughput-runs", "0", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    results = json.loads((out / "results.json").read_text())
    assert (results["train_images"], results["val_images"], results["test_images"]) == (800, 200, 500)
    assert results["eval_img_per_s"] is None and (tmp_path / "env_cache" / "faces" / ".complete").is_file()


def _one_error_line(capsys, call, command):
    """Run ``call`` (an in-process fpet command); it must exit with status 2 and print exactly one error line."""
    capsys.readouterr()
    try:
        status = call()
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fpet {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--data", "nonsense"], "--data"),
        (["--data", "pocket-vtab:no-such-task"], "--data"),
        (["--data", "vtab1k:/no/such/folder"], "--data"),
        (["--pet", "no-such-method"], "--pet"),
        (["--layer", "6"], "--layer"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--threads", "0"], "--threads"),
        (["--warmup-epochs", "3", "--epochs", "2"], "--warmup-epochs"),
        (["--checkpoint", "MISSING"], "--checkpoint"),
        (["--model", "no_such_model"], "--model"),
    ],
)
def test_train_argument_errors_are_one_line(task_dir, tmp_path, capsys, args, flag):
    base = {"--data": f"vtab1k:{task_dir}"}
    argv = ["train", *[x for k, v in base.items() if k not in args for x in (k, v)], *MODEL, *FAST]
    args = [str(tmp_path / "missing.pth") if a == "MISSING" else a for a in args]
    line = _one_error_line(capsys, lambda: main([*argv, *args, "--out", str(tmp_path / "run")]), "train")
    assert f"argument {flag}" in line
    assert not (tmp_path / "run").exists()  # nothing written before the arguments are checked


def test_train_refuses_a_checkpoint_of_another_model(task_dir, tmp_path, capsys):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit2").state_dict(), path)
    line = _one_error_line(capsys, lambda: _train(task_dir, tmp_path / "run", "--checkpoint", str(path)), "train")
    assert "argument --checkpoint" in line and "does not match test_vit" in line


def test_train_refuses_an_out_folder_holding_a_run(fpet_run, task_dir, capsys):
    line = _one_error_line(capsys, lambda: _train(task_dir, fpet_run), "train")
    assert "argument --out" in line and "--overwrite" in line


def test_eval_errors_are_one_line(fpet_run, task_dir, tmp_path, capsys):
    checkpoint = str(fpet_run / "pet.safetensors")

    def run(*args):
        return lambda: main(["eval", "--no-progress", "--throughput-runs", "0", *args])

    base = ["--pet-checkpoint", checkpoint, "--data", f"vtab1k:{task_dir}"]
    line = _one_error_line(capsys, run(*base, "--model", "test_vit2"), "eval")
    assert "argument --pet-checkpoint" in line and "another architecture" in line
    line = _one_error_line(capsys, run(*base, "--model", "test_vit", "--seed", "5"), "eval")
    assert "backbone weights differ" in line and "seed" in line
    other = data.pocket_vtab_dir("faces", root=str(tmp_path), sizes=(4, 2, 4), progress=False)
    line = _one_error_line(capsys, run("--pet-checkpoint", checkpoint, "--data", f"vtab1k:{other}",
                                       "--model", "test_vit"), "eval")
    assert "argument --data" in line and "2 classes" in line
    line = _one_error_line(capsys, run("--pet-checkpoint", str(tmp_path / "none.safetensors"),
                                       "--data", f"vtab1k:{task_dir}", "--model", "test_vit"), "eval")
    assert "argument --pet-checkpoint" in line
    _one_error_line(capsys, run(*base, "--split", "nope"), "eval")


def test_error_line_from_the_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fpet_kernels", "train", "--data", f"vtab1k:{tmp_path / 'absent'}", "--no-progress"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fpet train: error: argument --data: data spec 'vtab1k:{tmp_path / 'absent'}': "
        f"'{tmp_path / 'absent'}' is not a directory"
    ]


def test_data_list_names_every_task(capsys):
    assert main(["data", "--list"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == [task.name for task in data.list_tasks()]
    for row, task in zip(rows, data.list_tasks()):
        assert row.split()[1:3] == [task.group, str(task.num_classes)] and task.description in row


def test_data_generate(tmp_path, capsys):
    assert main(["data", "--generate", "faces", "--root", str(tmp_path), "--sizes", "4,2,4", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"faces: {tmp_path / 'faces'}"
    assert len(data.VTAB1k(tmp_path / "faces", "train800val200")) == 6
    assert "unknown pocket-VTAB task" in _one_error_line(capsys, lambda: main(["data", "--generate", "nope"]), "data")
    _one_error_line(capsys, lambda: main(["data"]), "data")


def test_learning_rate_schedule():
    peak = 1e-3
    assert [learning_rate(s, 10, 4, peak) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert learning_rate(4, 10, 4, peak) == pytest.approx(peak)
    assert learning_rate(7, 10, 4, peak) == pytest.approx(peak / 2)
    assert learning_rate(0, 10, 0, peak) == pytest.approx(peak)  # no warm-up: the cosine from the first step


def test_config_and_evaluate_checks_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        TrainConfig(data="pocket-vtab:digits", epochs=0).validate()
    assert info.value.field == "epochs"
    with pytest.raises(ConfigError) as info:
        TrainConfig(data="pocket-vtab:digits", pet="full").validate()
    assert info.value.field == "pet" and "lora" in info.value.message
    with pytest.raises(ConfigError) as info:
        evaluate(str(tmp_path / "x.safetensors"), "pocket-vtab:digits", split="val200")
    assert info.value.field == "split"


_PEAK_RSS_PROBE = """
import json, mmap
from fpet_kernels.train import PeakRSS
memory = PeakRSS()
memory.reset()
start = memory.current_mib()
block = mmap.mmap(-1, 64 * 2**20)  # 64 MiB of fresh anonymous pages, each one touched below
for offset in range(0, len(block), 4096):
    block[offset] = 1
during = memory.current_mib()
peak = memory.peak_mib()
block.close()
print(json.dumps({"method": memory.method, "start": start, "during": during, "peak": peak}))
"""


def test_peak_rss_measures_an_allocation():
    # In a fresh process with freshly mapped pages: in a long test session the allocator can serve a big tensor from
    # memory that is already resident, and then the RSS does not move at all (seen in CI).
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if probe["method"].startswith("VmHWM"):
        assert probe["during"] >= probe["start"] + 60, probe
        assert probe["peak"] >= probe["during"] - 1, probe
    else:
        assert probe["peak"] > 0
