"""`fpet train` under torchrun: DistributedDataParallel over gloo on CPU (fpet_kernels.train, "Distributed").

The end-to-end test trains the tiny setting of tests/test_train.py (timm's ``test_vit`` at 32x32, one thread per
process) once in this process and once as 2 torchrun processes with the same global batch, and compares the saved
PET parameters. The data set has 13 training images and a global batch of 4, so every epoch ends with a batch of
one image: rank 1's part of it is empty (one image with weight 0), the path most likely to desynchronise the ranks.
The val (5) and test (11) sets do not split evenly over the 2 ranks either.

Dropout is off (``--refine-dropout 0``; LoRA and test_vit have none): each rank draws its own dropout masks, so with
dropout the two runs would agree in distribution only. Without it they differ only by float rounding: each rank's
forward runs on half the batch (other matmul blockings), and DDP's all-reduce adds the ranks' partial gradients
where the single process sums the whole batch in one reduction. Those are relative differences of ~1e-7 per step;
AdamW's normalised steps of at most lr = 1e-3 keep them at that scale over a few steps (seen: ~1e-7), so
atol 1e-5 leaves ample room while a wrong batch, order or loss scaling (differences of ~1e-4 and up) fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fpet_kernels import data
from fpet_kernels.cli import main
from fpet_kernels.train import _loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "test_vit", "--img-size", "32", "--threads", "1", "--no-progress", "--throughput-runs", "1",
         "--batch-size", "4", "--warmup-epochs", "0.5", "--epochs", "2", "--refine-dropout", "0"]


class _Indexed(torch.utils.data.Dataset):
    """Item ``i`` is ``(i, i)``: the batches show which images they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return index, index


def _epochs(loader, count: int = 2):
    return [[[t.tolist() for t in batch] for batch in loader] for _ in range(count)]


@pytest.mark.parametrize("n, batch, world", [(13, 4, 2), (15, 6, 2), (12, 6, 2), (10, 6, 3), (5, 4, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_see_the_single_process_global_batches(n, batch, world, shuffle):
    """Over 2 epochs, the ranks' parts of every step put together (weight-0 padding left out) are the single-process
    loader's batch, in order; each part is contiguous, carries the global batch size, and has an image."""
    single = _epochs(_loader(_Indexed(n), batch, shuffle=shuffle, seed=3))
    parts = [_epochs(_loader(_Indexed(n), batch, shuffle=shuffle, seed=3, rank=r, world_size=world))
             for r in range(world)]
    for epoch, batches in enumerate(single):
        assert all(len(p[epoch]) == len(batches) for p in parts)
        for step, (indices, labels) in enumerate(batches):
            joined = []
            for r in range(world):
                images, part_labels, weights, counts = parts[r][epoch][step]
                low, high = r * len(indices) // world, (r + 1) * len(indices) // world
                assert counts == [len(indices)] * len(images) and part_labels == images
                if low == high:  # an empty part: one image that counts for nothing
                    assert images == indices[:1] and weights == [0.0]
                else:
                    assert images == indices[low:high] and weights == [1.0] * (high - low)
                    joined += images
            assert joined == indices == labels
    if shuffle:
        assert single[0] != single[1]  # the order moves on with the epoch, on every rank alike


def test_batch_size_must_split_over_the_processes(tmp_path, monkeypatch, capsys):
    task = data.pocket_vtab_dir("distance", root=str(tmp_path), sizes=(4, 2, 4), progress=False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    argv = ["train", "--data", f"vtab1k:{task}", *TRAIN, "--batch-size", "5", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fpet train: error: argument --batch-size: "), err
    assert "multiple of the number of processes (2)" in err[0] and not (tmp_path / "run").exists()


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _torchrun(*args):
    """``torchrun --standalone --nproc_per_node 2 -m fpet_kernels ARGS`` (a free port of its own)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fpet_kernels", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny setting trained by one process (in this one) and by 2 torchrun processes: (one, two, args, the
    torchrun run)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    task = data.pocket_vtab_dir("distance", root=str(tmp_path), sizes=(13, 5, 11), progress=False)
    args = ["train", "--data", f"vtab1k:{task}", *TRAIN]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    result = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two", args, result


def test_two_processes_train_the_parameters_of_one(runs):
    one, two, _, result = runs
    # rank 0 alone logs: one header, one line per epoch, one test line
    assert result.stdout.count("trainable parameters:") == 1 and result.stdout.count("epoch 2/2:") == 1
    assert result.stdout.count("test acc") == 1

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    expected, actual = _safetensors(one / "pet.safetensors"), _safetensors(two / "pet.safetensors")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:  # the packed signs of 1-bit weights
            assert torch.equal(actual[key], value), key
    lora_b = [key for key in expected if "lora_b" in key]
    assert lora_b and all(expected[key].any() for key in lora_b)  # LoRA's B starts at zero: it did train
    logs = [_read_jsonl(folder / "log.jsonl") for folder in (one, two)]
    for single, double in zip(*logs):
        assert double["train_acc"] == single["train_acc"] and double["val_acc"] == single["val_acc"]
        assert double["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
        assert double["lr"] == single["lr"] and double["epoch"] == single["epoch"]
    results = [json.loads((folder / "results.json").read_text()) for folder in (one, two)]
    assert (results[0]["world_size"], results[1]["world_size"]) == (1, 2)
    for key in ("test_correct", "test_images", "val_images", "train_images", "trainable_params"):
        assert results[1][key] == results[0][key], key
    assert results[1]["test_images"] == 11 and results[1]["train_images"] == 13


def test_a_config_error_of_rank_0_stops_every_rank(runs):
    """``out`` holding a run is found by rank 0 alone (it prepares ``out``); every rank must give up, none wait."""
    _, two, args, _ = runs
    before = {p.name: p.read_bytes() for p in two.iterdir()}
    result = _torchrun(*args, "--out", str(two))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("fpet train: error: ")]
    # Both ranks raise it; torchrun may stop rank 1 once rank 0 has exited, before rank 1 prints its copy.
    assert 1 <= len(lines) <= 2 and all("argument --out" in line and "--overwrite" in line for line in lines), lines
    assert "exitcode  : 2" in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in two.iterdir()} == before
