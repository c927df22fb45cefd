"""bench/gpu_check.py, the one-command GPU validation: its dry run on CPU end to end (every part, tiny shapes, cpp in
place of cuda, Triton interpreted), its failure handling, and the comparison it judges the kernels by."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fpet_kernels.backends import Tolerance, get_backend
from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
# The dry run's backends, those this machine has (triton is refused on triton < 3.3, cpp needs the extension).
DRY_BACKENDS = tuple(name for name in ("cpp", "triton") if get_backend(name).available)


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _run(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = _run(out, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "summary.json") as f:
        return out, json.load(f), result.stdout


def test_dry_run_runs_every_part(dry_run):
    out, summary, stdout = dry_run
    assert list(summary["parts"]) == list(gpu_check.PARTS)
    for name, record in summary["parts"].items():
        assert record["status"] in ("ok", "skipped"), (name, record.get("error"))
        assert f"== {name}: up to" in stdout and f"   {name}: {record['status']} in" in stdout  # time per part
        assert os.path.exists(out / f"{name}.json") and os.path.exists(out / f"{name}.log")
    text = (out / "summary.md").read_text()
    for section in ("## Environment", "## GPU tests", "## Correctness against the reference", "## Op timing",
                    "## Model"):
        assert section in text


def test_dry_run_build_is_skipped_when_the_extension_is_built(dry_run):
    build = dry_run[1]["parts"]["build"]
    from fpet_kernels.backends import compiled

    if compiled.is_loaded():
        assert build["status"] == "skipped" and build["result"]["extension"]["loaded"]
    else:  # it built the CPU kernels
        assert build["status"] == "ok" and build["result"]["extension"]["loaded"]


def test_dry_run_runs_the_gpu_tests(dry_run):
    tests = dry_run[1]["parts"]["tests"]["result"]
    assert "-m gpu" in tests["command"] and set(tests["returncodes"]) == {0}
    assert sorted(f for shard in tests["shards"] for f in shard) == sorted(set(
        f for shard in tests["shards"] for f in shard))  # every file in one shard
    assert tests["counts"].get("failed", 0) == 0 and tests["counts"].get("error", 0) == 0
    if "triton" in DRY_BACKENDS:
        assert tests["counts"]["passed"] > 0  # the interpreted Triton tests
    assert tests["counts"]["skipped"] > 0  # the cuda backend's, without a GPU


def test_dry_run_checks_every_op_backend_and_dtype(dry_run):
    result = dry_run[1]["parts"]["correctness"]["result"]
    rows = result["rows"]
    assert result["failed"] == 0 and result["cut_for_time"] == 0
    seen = {(r["op"], r["backend"], r["dtype"]) for r in rows}
    assert seen == {(op, b, d) for op in gpu_check.OPS for b in DRY_BACKENDS
                    for d in ("float32", "bfloat16", "float16")}
    assert set(result["skipped"]) == {"cpp", "triton"} - set(DRY_BACKENDS)  # with the registry's reason
    for row in rows:
        assert row["ok"] and row["tol_use"] <= 1
        for mode in gpu_check.MODES:
            assert math.isfinite(row[f"{mode}_max_abs"])


def test_dry_run_times_every_op_mode_and_backend(dry_run):
    result = dry_run[1]["parts"]["op_timing"]["result"]
    rows = result["rows"]
    assert result["errors"] == 0 and result["copy_bandwidth_GBps"] > 0
    assert {(r["op"], r["mode"], r["backend"]) for r in rows} == {
        (op, mode, b) for op in gpu_check.OPS for mode in gpu_check.MODES for b in ("reference", *DRY_BACKENDS)}
    assert all(r["ms"] > 0 for r in rows)
    merge = [r for r in rows if r["op"] == "merge_tokens"]
    assert all("achieved_GBps" in r for r in merge)  # the roofline model covers merge_tokens in every mode


def test_dry_run_times_the_model_variants(dry_run):
    result = dry_run[1]["parts"]["model"]["result"]
    merges = [b for b in ("triton", "cpp") if b in DRY_BACKENDS] + ["reference"]
    assert set(result["eval"]) == {"backbone", "LoRA", *(f"FPET+LoRA ({b})" for b in merges)}
    for name, entry in result["eval"].items():
        assert entry["img_per_s"] > 0 and entry["latency_p90_ms"] >= entry["latency_p50_ms"] > 0
        assert entry.get("merge_backend", "-") == (name[len("FPET+LoRA ("):-1] if "(" in name else "-")
    assert set(result["train"]) == {"LoRA", f"FPET+LoRA ({merges[0]})"}
    lora, fpet = result["train"]["LoRA"], result["train"][f"FPET+LoRA ({merges[0]})"]
    assert lora["step_ms"] > 0 and fpet["trainable_params"] > lora["trainable_params"]  # + the refinement adapter


def test_a_failing_part_is_recorded_and_the_next_part_runs(tmp_path):
    """Without --dry-run on a machine without a GPU, the environment part fails; the next part still runs (and
    fails in its turn); the summary records both and the exit status is 1."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    result = _run(tmp_path, "--parts", "environment,correctness", "--budget", "120")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["parts"]) == ["environment", "correctness"]
    assert summary["parts"]["environment"]["status"] == "failed"
    assert "no CUDA device" in summary["parts"]["environment"]["error"]
    assert summary["parts"]["correctness"]["status"] == "failed"
    assert "failed" in (tmp_path / "summary.md").read_text()


def test_unknown_part_is_a_one_line_error(tmp_path):
    result = _run(tmp_path, "--parts", "build,nonsense")
    assert result.returncode == 2 and "--parts: unknown part(s) ['nonsense']" in result.stderr


def test_shards_balance_the_test_counts():
    shards = gpu_check._shards({"a.py": 10, "b.py": 6, "c.py": 5, "d.py": 1}, 2)
    assert shards == [["a.py", "d.py"], ["b.py", "c.py"]]
    assert gpu_check._shards({"a.py": 3}, 8) == [["a.py"]]


def test_compare_measures_against_the_tolerance():
    want = torch.tensor([[1.0, -math.inf], [2.0, 3.0]])
    tol = Tolerance(atol=0.1, rtol=0.0)
    same = gpu_check._compare(want.clone(), want, tol)
    assert same["max_abs"] == 0 and same["use"] == 0 and same["bad_items"] == []
    off = gpu_check._compare(torch.tensor([[1.05, -math.inf], [2.0, 3.3]]), want, tol)
    assert off["max_abs"] == pytest.approx(0.3, abs=1e-6) and off["use"] == pytest.approx(3.0, rel=1e-5)
    assert off["bad_items"] == [1]  # only the second batch item is outside the tolerance
    assert gpu_check._compare(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), want, tol)["bad_items"] == [0]  # inf lost
    assert gpu_check._compare(torch.tensor([3, 1]), torch.tensor([3, 2]), tol)["bad_items"] == [1]  # indices
    assert gpu_check._compare(None, want, tol)["use"] == math.inf  # a gradient the reference has is missing


def test_near_ties_are_found_per_batch_item():
    scores = torch.tensor([[[0.9, 0.5, -math.inf], [0.2, 0.2 + 5e-5, -math.inf]],
                           [[0.9, 0.1, -math.inf], [0.3, 0.8, -math.inf]]])
    assert gpu_check._near_tie_items(scores) == {0}
