"""The GPU validation of fpet_kernels in one command (README "Validating on a GPU").

    python bench/gpu_check.py --out DIR             # on a Linux machine with one NVIDIA GPU, in the source tree
    python bench/gpu_check.py --out DIR --dry-run   # the same parts on CPU at tiny shapes (what CI runs)

Parts, each run in a fresh Python process with its own time budget (a failing or hanging part is recorded and the
next one runs; a CUDA error cannot poison the parts after it):

  environment  versions (Python, torch, triton, timm, peft, nvcc, driver), the GPU and its compute capability
  build        ``pip install --no-build-isolation --no-deps -e .`` for this GPU's arch only (FPET_CUDA_ARCHS from
               torch.cuda.get_device_capability(), MAX_JOBS = CPU count), timed
  tests        ``pytest -m gpu tests``: every test marked as needing a GPU (CUDA backend, Triton compiled for the GPU,
               full-size shapes); the pytest summary is kept
  correctness  every op and merge_tokens of the cuda and triton backends (forward, backward, no-grad path) against the
               reference at ViT-B/16 and ViT-L/16 shapes, B = 1, 64, 256, float32 / bfloat16 / float16, worst error
               per case and the registry's tolerance
  op_timing    every op per backend (reference, cuda, triton) with triton.testing.do_bench: forward,
               forward+backward, no-grad; achieved bandwidth of the roofline model's bytes (``fpet gpu-report
               --roofline``) against the datasheet peak and a streaming copy measured in the same run
  model        ViT-B/16 bfloat16: eval throughput at batch 256 and batch-1 latency for backbone, LoRA and FPET+LoRA
               (merge backend triton, cuda, reference); one training step (forward, backward, AdamW) at batch 64 for
               LoRA and FPET+LoRA with torch.cuda.max_memory_allocated

Everything goes to DIR: ``<part>.json`` and ``<part>.log`` per part, ``summary.json`` and ``summary.md``. The whole
run is budgeted to finish within ``--budget`` seconds (default 480); a part running out of its time stops starting
new cases and says how many it cut. ``--dry-run`` uses CPU tensors at tiny shapes, the cpp backend in place of cuda
and Triton under TRITON_INTERPRET=1, and skips the build when the extension is already built.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("environment", "build", "tests", "correctness", "op_timing", "model")
# Seconds per part on an H100/H200-class GPU with 16 CPU cores; they sum to less than the default --budget.
BUDGET = {"environment": 30, "build": 150, "tests": 110, "correctness": 60, "op_timing": 70, "model": 50}
DRY_BUDGET = {"environment": 60, "build": 900, "tests": 300, "correctness": 300, "op_timing": 200, "model": 200}
OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "scatter_mean_merge_dense",
       "merge_tokens")
MODES = ("forward", "backward", "no-grad")


# ============================================================================================ the plan (shapes)
class Plan:
    """What a run measures: full ViT shapes on the GPU, tiny ones in the dry run."""

    def __init__(self, dry_run: bool) -> None:
        import torch

        from fpet_kernels.geometry import Checkerboard
        from fpet_kernels.tools.gpu_report.shapes import VIT_B16, VIT_L16, Shapes

        self.dry_run = dry_run
        if dry_run:
            self.device = "cpu"
            self.backends = ("cpp", "triton")  # cpp in place of cuda; triton under the interpreter
            self.shapes = {"tiny_a": Shapes(Checkerboard(3, 4, 1), channels=24, head_dim=8, refine_dim=4),
                           "tiny_b": Shapes(Checkerboard(4, 4, 2), channels=16, head_dim=8, refine_dim=4)}
            self.batches = (1, 3)
            self.timing_dtypes = (torch.float32,)
        else:
            self.device = "cuda"
            self.backends = ("cuda", "triton")
            self.shapes = {"vit_b16": VIT_B16, "vit_l16": VIT_L16}
            self.batches = (1, 64, 256)
            self.timing_dtypes = (torch.bfloat16,)
        self.dtypes = (torch.float32, torch.bfloat16, torch.float16)


# ============================================================================================ small helpers
def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class PartFailed(Exception):
    """A part's own failure, with what it found before it (kept in the record)."""

    def __init__(self, message: str, result: Dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class Clock:
    """A part's soft deadline: cases start only while time is left, so the part writes its results in time."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.cut = 0

    def left(self) -> bool:
        return time.monotonic() < self.deadline

    def take(self) -> bool:
        """True if a case may start; else counts it as cut."""
        if self.left():
            return True
        self.cut += 1
        return False


def _compare(got, want, tolerance) -> Dict[str, Any]:
    """Worst absolute error, and the worst ``|got - want| / (atol + rtol |want|)`` (pass: <= 1) per batch item;
    non-finite entries must be equal. Integer tensors must be equal."""
    import torch

    if got is None or want is None:
        same = got is None and want is None
        return dict(max_abs=0.0 if same else math.inf, use=0.0 if same else math.inf, bad_items=[] if same else [-1])
    got, want = got.detach(), want.detach()
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return dict(max_abs=math.inf, use=math.inf, bad_items=[-1],
                    note=f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}")
    if not want.is_floating_point():
        per_item = (got != want).reshape(got.shape[0], -1).any(-1).to(torch.float64) * math.inf
        per_item = torch.nan_to_num(per_item, nan=0.0)
        return dict(max_abs=float((got != want).any()), use=float(per_item.max()) if per_item.numel() else 0.0,
                    bad_items=per_item.gt(1).nonzero().flatten().tolist())
    g, w = got.double(), want.double()
    finite = torch.isfinite(w)
    mismatch = (~finite & (g != w)) | (finite & ~torch.isfinite(g))
    diff = torch.where(finite, (g - w).abs(), torch.zeros_like(w))
    use = diff / (tolerance.atol + tolerance.rtol * w.abs().where(finite, torch.zeros_like(w))).clamp_min(1e-300)
    use = use.masked_fill(mismatch, math.inf)
    if use.numel() == 0:
        return dict(max_abs=0.0, use=0.0, bad_items=[])
    per_item = use.reshape(use.shape[0], -1).amax(-1) if use.dim() > 1 and use.shape[0] else use.reshape(1, -1).amax(-1)
    return dict(max_abs=float(diff.max()), use=float(use.max()), bad_items=per_item.gt(1).nonzero().flatten().tolist())


def _near_tie_items(scores, threshold: float = 1e-4) -> set:
    """Batch items with a row whose two best reference scores differ by at most ``threshold``: there a backend's
    float32 sums in another order may pick the other column, and everything downstream of the match differs."""
    import torch

    if scores.shape[-1] < 2:
        return set()
    top = scores.float().topk(2, dim=-1).values
    gap = (top[..., 0] - top[..., 1]).nan_to_num(nan=math.inf)
    return set(gap.le(threshold).any(-1).nonzero().flatten().tolist())


# ============================================================================================ part: environment
def part_environment(args, plan: Optional[Plan], clock: Clock) -> Dict[str, Any]:
    import platform

    import torch

    info: Dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__,
                                torch_cuda=torch.version.cuda, cpu_count=os.cpu_count(), platform=platform.platform())
    for module in ("triton", "timm", "peft", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # report, do not fail: the parts that need it will say so
            info[module] = f"not importable: {type(error).__name__}: {error}"
    for key, command in (("nvcc", ["nvcc", "--version"]),
                         ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                         ("commit", ["git", "-C", REPO, "rev-parse", "--short", "HEAD"])):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=20)
            info[key] = _tail(result.stdout, 1).strip() if result.returncode == 0 else f"rc {result.returncode}"
        except (OSError, subprocess.TimeoutExpired) as error:
            info[key] = f"unavailable: {error}"
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}{minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    elif not args.dry_run:
        raise PartFailed("no CUDA device is visible to torch (run with --dry-run on a CPU machine)", info)
    return info


# ============================================================================================ part: build
def _extension_state() -> Dict[str, Any]:
    """Whether fpet_kernels._C loads in a fresh process, and with CUDA kernels."""
    code = ("import json; from fpet_kernels.backends import compiled as c; e = c.load_error(); "
            "print(json.dumps(dict(loaded=e is None, error=e, cuda=e is None and c.cuda_kernels_built())))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    if result.returncode != 0:
        return dict(loaded=False, error=_tail(result.stderr, 5), cuda=False)
    return json.loads(result.stdout.strip().splitlines()[-1])


def part_build(args, plan: Optional[Plan], clock: Clock) -> Dict[str, Any]:
    before = _extension_state()
    if args.dry_run and before["loaded"]:
        return dict(status="skipped", reason="dry run: fpet_kernels._C is already built", extension=before)
    environment = json.load(open(os.path.join(args.out, "environment.json")))["result"] \
        if os.path.exists(os.path.join(args.out, "environment.json")) else {}
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
    if environment.get("capability"):
        env["FPET_CUDA_ARCHS"] = environment["capability"]
    elif args.dry_run:
        env["FPET_SKIP_CUDA_BUILD"] = "1"
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.out, "build_output.log"), "w") as f:
        f.write(result.stdout + "\n" + result.stderr)
    report = dict(command=" ".join(command[1:]), archs=env.get("FPET_CUDA_ARCHS", "cpu only"),
                  max_jobs=env["MAX_JOBS"], seconds=round(seconds, 1), returncode=result.returncode)
    if result.returncode != 0:
        report["pip_tail"] = _tail(result.stderr or result.stdout)
        # pip itself may be unusable offline (e.g. no setuptools build backend): build in place instead.
        start = time.perf_counter()
        fallback = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env,
                                  capture_output=True, text=True)
        report.update(fallback="setup.py build_ext --inplace", fallback_returncode=fallback.returncode,
                      fallback_seconds=round(time.perf_counter() - start, 1))
        if fallback.returncode != 0:
            report["fallback_tail"] = _tail(fallback.stderr or fallback.stdout)
    report["extension"] = after = _extension_state()
    if not after["loaded"] or (environment.get("capability") and not after["cuda"]):
        raise RuntimeError(f"the extension does not load with CUDA kernels after the build: {after}")
    return report


# ============================================================================================ part: tests
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)")


def _shards(files: Dict[str, int], jobs: int) -> List[List[str]]:
    """Test files split into ``jobs`` groups of about equal test counts (largest first, each to the lightest)."""
    count = max(1, min(jobs, len(files)))
    loads, shards = [0] * count, [[] for _ in range(count)]
    for name, tests in sorted(files.items(), key=lambda item: (-item[1], item[0])):
        k = loads.index(min(loads))
        loads[k] += tests
        shards[k].append(name)
    return [shard for shard in shards if shard]


def part_tests(args, plan: Optional[Plan], clock: Clock) -> Dict[str, Any]:
    """``pytest -m gpu`` over the test files, in parallel shards (one process each, CPU count at most 8): compiling
    the Triton kernels for the many small test shapes is CPU work."""
    selection = ["-m", "gpu", "-q", "-p", "no:cacheprovider"]
    env = dict(os.environ)
    if not args.dry_run:
        env["FPET_EXPECT_CUDA_KERNELS"] = "1"  # a build without CUDA kernels must fail, not skip
    start = time.perf_counter()
    collected = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", *selection], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
    files: Dict[str, int] = {}
    for line in collected.stdout.splitlines():
        if "::" in line:
            files[line.split("::")[0]] = files.get(line.split("::")[0], 0) + 1
    if not files:
        raise PartFailed("pytest collected no test marked gpu",
                         dict(output_tail=_tail(collected.stdout + collected.stderr)))
    shards = _shards(files, min(8, os.cpu_count() or 1))
    running = []
    for k, shard in enumerate(shards):
        log = open(os.path.join(args.out, f"tests_output_{k}.log"), "w")
        command = [sys.executable, "-m", "pytest", *shard, *selection, "-rfEs",
                   f"--junitxml={os.path.join(args.out, f'tests_junit_{k}.xml')}"]
        running.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    returncodes: List[Any] = []
    for process, log in running:
        try:
            returncodes.append(process.wait(timeout=max(1.0, clock.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncodes.append("timeout")
        log.close()
    counts: Dict[str, int] = {}
    failures = []
    for k in range(len(shards)):
        output = open(os.path.join(args.out, f"tests_output_{k}.log")).read()
        summary_line = next((line for line in reversed(output.splitlines()) if _SUMMARY.search(line)), "")
        for number, word in _SUMMARY.findall(summary_line):
            word = word.rstrip("s") if word.startswith(("error", "warning")) else word
            counts[word] = counts.get(word, 0) + int(number)
        junit = os.path.join(args.out, f"tests_junit_{k}.xml")
        if os.path.exists(junit):
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                problem = case.find("failure") if case.find("failure") is not None else case.find("error")
                if problem is not None:
                    failures.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                         message=(problem.get("message") or "")[:500]))
    summary = ", ".join(f"{n} {w}" for w, n in counts.items() if w not in ("warning", "deselected"))
    timed_out = sum(code == "timeout" for code in returncodes)
    report = dict(command="pytest " + " ".join(selection) + f" tests ({len(shards)} parallel shards by file)",
                  seconds=round(time.perf_counter() - start, 1), returncodes=returncodes, shards=shards,
                  summary=summary + (f"; {timed_out} shard(s) stopped at the time limit" if timed_out else ""),
                  counts=counts, failures=failures, failed=any(code != 0 for code in returncodes))
    return report


# ============================================================================================ part: correctness
def part_correctness(args, plan: Plan, clock: Clock) -> Dict[str, Any]:
    import torch

    from fpet_kernels import reference
    from fpet_kernels.backends import get_backend
    from fpet_kernels.tools.workloads import op_call, op_tensors, run_op

    rows: List[Dict[str, Any]] = []
    result = dict(rows=rows, skipped={})
    impls = {}
    for name in plan.backends:
        entry = get_backend(name)
        if entry.available:
            impls[name] = entry
        else:
            result["skipped"][name] = entry.unavailable_reason()
    out_path = os.path.join(args.out, "correctness.partial.json")
    for model, shape in plan.shapes.items():
        for batch in plan.batches:
            for dtype in plan.dtypes:
                tensors = op_tensors(shape, batch, dtype, plan.device)
                for op in OPS:
                    call, names = op_call(op, shape, tensors)
                    want = {mode: run_op(reference, call, names, tensors, mode) for mode in ("backward",)}
                    want_out, want_grads = want["backward"]
                    ties = _near_tie_items(reference.checkerboard_similarity(
                        tensors["metric"], shape.grid.size, shape.grid.prefix)) if op == "merge_tokens" else set()
                    grad_dtype = torch.float32 if op == "ste_match" else dtype
                    for name, entry in impls.items():
                        if dtype not in entry.dtypes:
                            continue
                        if not clock.take():
                            continue
                        row = dict(model=model, batch=batch, dtype=_dtype_name(dtype), op=op, backend=name)
                        try:
                            impl = entry.implementation()
                            worst = dict(max_abs=0.0, use=0.0)
                            bad_items: set = set()
                            for mode in MODES:
                                got_out, got_grads = run_op(impl, call, names, tensors, mode)
                                pairs = [(g, w, entry.forward[w.dtype] if w.is_floating_point() else None)
                                         for g, w in zip(got_out, want_out)]
                                if mode == "backward":
                                    # gradients to the tolerance of the inputs' dtype (the sizes' gradient of
                                    # 16-bit x is float32 but carries x's rounding); ste_match's scores are float32
                                    pairs += [(g, w, entry.grad[grad_dtype] if w is not None else None)
                                              for g, w in zip(got_grads, want_grads)]
                                mode_worst = dict(max_abs=0.0, use=0.0)
                                for g, w, tol in pairs:
                                    c = _compare(g, w, tol or get_backend("reference").forward[torch.float64])
                                    bad_items.update(c["bad_items"])
                                    for key in ("max_abs", "use"):
                                        mode_worst[key] = max(mode_worst[key], c[key])
                                        worst[key] = max(worst[key], c[key])
                                row[f"{mode}_max_abs"] = mode_worst["max_abs"]
                                row[f"{mode}_tol_use"] = mode_worst["use"]
                            explained = bad_items & ties
                            row.update(max_abs=worst["max_abs"], tol_use=worst["use"],
                                       bad_items=len(bad_items), near_tie_items=len(explained),
                                       ok=not (bad_items - ties))
                            if explained:
                                row["note"] = (f"{len(explained)} of {batch} items differ where the reference scores "
                                               f"have a near-tie (top-2 gap <= 1e-4): the match may flip there")
                        except Exception as error:
                            row.update(ok=False, error=f"{type(error).__name__}: {error}",
                                       traceback=_tail(traceback.format_exc(), 12))
                        rows.append(row)
                        _write_json(out_path, result)
                del tensors
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
    result.update(cases=len(rows), failed=sum(not r["ok"] for r in rows), cut_for_time=clock.cut)
    return result


# ============================================================================================ part: op timing
def _timer(device: str) -> Callable[[Callable], float]:
    """Milliseconds per call of ``fn``: triton.testing.do_bench (median, CUDA events) on a GPU; the median of
    perf_counter timings on CPU (the dry run)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def cpu_time(fn: Callable) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return cpu_time


_ROOFLINE_NAME = {("merge_tokens", "forward"): "merge_tokens fwd", ("merge_tokens", "backward"): "merge_tokens fwd+bwd",
                  ("merge_tokens", "no-grad"): "merge_tokens no-grad"}


def _model_bytes(op: str, mode: str, batch: int, dtype, shape) -> Optional[Tuple[int, int, int]]:
    """The roofline model's (bytes, tensor FLOPs, fp32 FLOPs) of ``op`` in ``mode`` (None where it has none: the
    backward of the single ops)."""
    import torch

    from fpet_kernels.tools.gpu_report.roofline import minimum_traffic

    name = _ROOFLINE_NAME.get((op, mode), op if mode != "backward" else None)
    if name is None:
        return None
    return minimum_traffic(name, batch, torch.empty((), dtype=dtype).element_size(), shape)


def part_op_timing(args, plan: Plan, clock: Clock) -> Dict[str, Any]:
    import torch

    from fpet_kernels.backends import get_backend
    from fpet_kernels.tools.gpu_report.roofline import bound_us, gpu_spec
    from fpet_kernels.tools.workloads import op_call, op_tensors, timed_call

    timer = _timer(plan.device)
    result: Dict[str, Any] = dict(rows=[], skipped={})
    spec = gpu_spec(torch.cuda.get_device_name(0)) if plan.device == "cuda" else None
    result["gpu_spec"] = spec
    # The floor of a memory-bound op: a streaming copy of 2 x 256 MiB (read + write), measured here.
    numel = (2**28 if plan.device == "cuda" else 2**22) // 2
    src = torch.randn(numel, device=plan.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    result["copy_bandwidth_GBps"] = copy_bandwidth = 2 * src.numel() * 2 / (copy_ms * 1e-3) / 1e9
    del src, dst
    impls = {}
    for name in ("reference", *plan.backends):
        entry = get_backend(name)
        if entry.available:
            impls[name] = entry.implementation()
        else:
            result["skipped"][name] = entry.unavailable_reason()
    out_path = os.path.join(args.out, "op_timing.partial.json")
    for dtype in plan.timing_dtypes:
        for model, shape in plan.shapes.items():
            for batch in plan.batches:
                tensors = op_tensors(shape, batch, dtype, plan.device)
                for op in OPS:
                    call, names = op_call(op, shape, tensors)
                    for mode in MODES:
                        model_cost = _model_bytes(op, mode, batch, dtype, shape)
                        for name, impl in impls.items():
                            if not clock.take():
                                continue
                            row = dict(model=model, batch=batch, dtype=_dtype_name(dtype), op=op, mode=mode,
                                       backend=name)
                            try:
                                row["ms"] = ms = timer(timed_call(impl, call, names, tensors, mode))
                                if model_cost is not None:
                                    nbytes, tensor_flops, fp32_flops = model_cost
                                    row["model_MB"] = nbytes / 1e6
                                    row["achieved_GBps"] = nbytes / (ms * 1e-3) / 1e9
                                    row["of_copy_bandwidth"] = row["achieved_GBps"] / copy_bandwidth
                                    if spec is not None:
                                        row["bound_us"] = bound_us(nbytes, tensor_flops, fp32_flops, spec)
                                        row["of_peak_bandwidth"] = nbytes / (ms * 1e-3) / spec["bandwidth"]
                            except Exception as error:
                                row.update(error=f"{type(error).__name__}: {error}")
                            result["rows"].append(row)
                            _write_json(out_path, result)
                del tensors
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
    result.update(cut_for_time=clock.cut, errors=sum("error" in r for r in result["rows"]))
    return result


# ============================================================================================ part: model
def _model_plan(plan: Plan) -> Dict[str, Any]:
    import torch

    if plan.dry_run:
        return dict(config=dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10),
                    dtype=torch.float32, eval_batch=4, latency_batch=1, train_batch=2,
                    merge_backends=("triton", "cpp", "reference"))
    return dict(config=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
                dtype=torch.bfloat16, eval_batch=256, latency_batch=1, train_batch=64,
                merge_backends=("triton", "cuda", "reference"))


def _variants(backbone, merge_backends: Sequence[str], skipped: Dict[str, str]) -> Dict[str, Callable]:
    """name -> builder of a fresh copy of the model variant (backbone, LoRA, FPET+LoRA per merge backend)."""
    import copy

    from fpet_kernels import add_pet, apply_fpet
    from fpet_kernels.backends import get_backend

    variants: Dict[str, Callable] = {"backbone": lambda: copy.deepcopy(backbone),
                                     "LoRA": lambda: add_pet(copy.deepcopy(backbone), "lora")}
    for name in merge_backends:
        entry = get_backend(name)
        if not entry.available:
            skipped[f"FPET+LoRA ({name})"] = entry.unavailable_reason()
            continue
        variants[f"FPET+LoRA ({name})"] = lambda name=name: apply_fpet(add_pet(copy.deepcopy(backbone), "lora"),
                                                                       backend=name)
    return variants


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_rounds(fns: Dict[str, Callable], device: str, rounds: int, clock: Clock) -> Dict[str, List[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per round) after one warm-up."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    _sync(device)
    for _ in range(rounds):
        if not clock.left():
            break
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def part_model(args, plan: Plan, clock: Clock) -> Dict[str, Any]:
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from fpet_kernels.backends import resolve_backend
    from fpet_kernels.vit_patch import get_fpet_patch

    mp = _model_plan(plan)
    device, dtype = plan.device, mp["dtype"]
    torch.manual_seed(0)
    backbone = VisionTransformer(**mp["config"]).eval()
    result: Dict[str, Any] = dict(config=mp["config"], dtype=_dtype_name(dtype), skipped={}, eval={}, train={})
    variants = _variants(backbone, mp["merge_backends"], result["skipped"])
    size = mp["config"]["img_size"]
    gen = torch.Generator().manual_seed(0)

    # -- eval: throughput at the eval batch, latency at batch 1, all variants in one process, round-robin
    models = {name: build().to(device=device, dtype=dtype).eval() for name, build in variants.items()}
    for name, model in models.items():
        result["eval"][name] = {}
        patch = get_fpet_patch(model)
        if patch is not None:
            backend = patch.vit.blocks[patch.layer].token_merger.backend
            result["eval"].setdefault(name, {})["merge_backend"] = resolve_backend(backend, torch.device(device)).name
    for label, batch, rounds in (("throughput", mp["eval_batch"], 10), ("latency", mp["latency_batch"], 30)):
        images = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
        with torch.inference_mode():
            fns = {name: (lambda model=model: model(images)) for name, model in models.items()}
            times = _time_rounds(fns, device, rounds if not plan.dry_run else 3, clock)
        for name, values in times.items():
            entry = result["eval"].setdefault(name, {})
            if not values:
                entry[label] = "cut for time"
                continue
            if label == "throughput":
                entry.update(batch=batch, img_per_s=batch / statistics.median(values), rounds=len(values))
            else:
                entry.update(latency_p50_ms=1e3 * _quantile(values, 0.5), latency_p90_ms=1e3 * _quantile(values, 0.9),
                             latency_rounds=len(values))
        base = result["eval"].get("backbone", {}).get("img_per_s")
        if label == "throughput" and base:
            for entry in result["eval"].values():
                if isinstance(entry.get("img_per_s"), float):
                    entry["speedup"] = entry["img_per_s"] / base
        _write_json(os.path.join(args.out, "model.partial.json"), result)
    del models
    if device == "cuda":
        torch.cuda.empty_cache()

    # -- one training step: forward, backward, AdamW; float32 weights under bfloat16 autocast
    train_names = ["LoRA"] + [n for n in variants if n.startswith("FPET+LoRA")][:1]
    batch = mp["train_batch"]
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, mp["config"]["num_classes"], (batch,), generator=gen).to(device)
    for name in train_names:
        if not clock.take():
            result["train"][name] = "cut for time"
            continue
        model = variants[name]().to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (Triton autotuning, AdamW state)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = _time_rounds({name: step}, device, 5 if not plan.dry_run else 2, clock)[name]
        entry = dict(batch=batch, trainable_params=sum(p.numel() for p in params),
                     step_ms=1e3 * statistics.median(times) if times else None, rounds=len(times))
        if device == "cuda":
            entry["max_memory_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        result["train"][name] = entry
        del model, optimizer, params
        if device == "cuda":
            torch.cuda.empty_cache()
        _write_json(os.path.join(args.out, "model.partial.json"), result)
    result["cut_for_time"] = clock.cut
    return result


# ============================================================================================ running the parts
PART_FUNCTIONS = dict(environment=part_environment, build=part_build, tests=part_tests,
                      correctness=part_correctness, op_timing=part_op_timing, model=part_model)


def run_part(args) -> int:
    """Run one part in this process (the orchestrator's child) and write ``<out>/<part>.json``."""
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    sys.path.insert(0, REPO)
    clock = Clock(args.seconds)
    start = time.perf_counter()
    plan = Plan(args.dry_run) if args.part not in ("environment", "build", "tests") else None
    record: Dict[str, Any] = dict(part=args.part)
    try:
        result = PART_FUNCTIONS[args.part](args, plan, clock)
        # A part reports what failed inside it as a count ("failed", "errors"); "status": "skipped" when it had
        # nothing to do.
        status = "failed" if result.get("failed") or result.get("errors") else result.get("status", "ok")
        record.update(status=status, result=result)
    except PartFailed as error:
        record.update(status="failed", error=str(error), result=error.result)
    except Exception as error:
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        print(record["traceback"], file=sys.stderr)
    record["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(os.path.join(args.out, f"{args.part}.json"), record)
    return 0


def orchestrate(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    budgets = DRY_BUDGET if args.dry_run else BUDGET
    parts = [p for p in PARTS if p in args.parts]
    deadline = time.monotonic() + args.budget
    summary: Dict[str, Any] = dict(dry_run=args.dry_run, budget_s=args.budget, parts={})
    total_start = time.perf_counter()
    for index, part in enumerate(parts):
        later = sum(budgets[p] for p in parts[index + 1:])
        left = deadline - time.monotonic()
        seconds = max(budgets[part], left - later) if not args.dry_run else budgets[part]
        seconds = max(5.0, min(seconds, left)) if not args.dry_run else seconds
        print(f"== {part}: up to {seconds:.0f} s", flush=True)
        path = os.path.join(args.out, f"{part}.json")
        if os.path.exists(path):
            os.remove(path)
        command = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out,
                   "--seconds", f"{0.85 * seconds:.1f}"] + (["--dry-run"] if args.dry_run else [])
        start = time.perf_counter()
        with open(os.path.join(args.out, f"{part}.log"), "w") as log:
            try:
                returncode = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            timeout=seconds + 20).returncode
            except subprocess.TimeoutExpired:
                returncode = "timeout"
        elapsed = time.perf_counter() - start
        if os.path.exists(path):
            record = json.load(open(path))
        else:
            partial = os.path.join(args.out, f"{part}.partial.json")
            record = dict(part=part, status="failed",
                          error=f"the part process ended without a result (exit: {returncode}); see {part}.log",
                          result=json.load(open(partial)) if os.path.exists(partial) else None)
        record["wall_s"] = round(elapsed, 1)
        summary["parts"][part] = record
        print(f"   {part}: {record['status']} in {elapsed:.1f} s"
              + (f" ({record['error']})" if record.get("error") else ""), flush=True)
    summary["total_s"] = round(time.perf_counter() - total_start, 1)
    _write_json(os.path.join(args.out, "summary.json"), summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(summary))
    print(f"== done in {summary['total_s']:.0f} s: {os.path.join(args.out, 'summary.md')}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary["parts"].values()) else 1


# ============================================================================================ the markdown summary
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def markdown(summary: Dict[str, Any]) -> str:
    parts = summary["parts"]
    dry = " (dry run on CPU: tiny shapes, cpp in place of cuda, Triton interpreted)" if summary["dry_run"] else ""
    lines = [f"# GPU check{dry}",
             "", f"Total {summary['total_s']:.0f} s (budget {summary['budget_s']} s).", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for name, record in parts.items():
        result = record.get("result") or {}
        note = record.get("error", "")
        if not note and isinstance(result, dict):
            note = result.get("summary") or result.get("reason") or ""
            if result.get("cut_for_time"):
                note += f" {result['cut_for_time']} cases cut for time"
        lines.append(f"| {name} | {record['status']} | {record.get('wall_s', '-')} | {note} |")
    env = (parts.get("environment") or {}).get("result") or {}
    if env:
        keys = ("gpu", "capability", "gpu_memory_gib", "driver", "python", "torch", "torch_cuda", "triton", "timm",
                "peft", "nvcc", "cpu_count", "commit")
        lines += ["", "## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {env[k]} |" for k in keys if k in env]
    build = (parts.get("build") or {}).get("result") or {}
    if build:
        if "command" in build:
            text = (f"`{build['command']}` for arch {build['archs']} with MAX_JOBS={build['max_jobs']}: exit "
                    f"{build['returncode']} after {build['seconds']} s")
            if "fallback" in build:
                text += (f"; then `{build['fallback']}`: exit {build['fallback_returncode']} after "
                         f"{build['fallback_seconds']} s")
        else:
            text = build.get("reason", "")
        lines += ["", "## Build", "", f"{text}. Extension: {build.get('extension')}"]
    tests = (parts.get("tests") or {}).get("result") or {}
    if tests:
        lines += ["", "## GPU tests", "", f"`{tests.get('command')}`: **{tests.get('summary')}** "
                  f"in {tests.get('seconds')} s"]
        lines += [f"- FAILED {f['test']}: {f['message'][:200]}" for f in tests.get("failures", [])]
    correct = (parts.get("correctness") or {}).get("result") or {}
    if correct.get("rows"):
        lines += ["", "## Correctness against the reference", "",
                  "Worst |got - want| and worst share of the registry tolerance (`tol use`, pass <= 1) over forward, "
                  "backward (gradients of every input) and the no-grad path.", "",
                  "| model | B | dtype | op | backend | fwd max abs | bwd max abs | no-grad max abs | tol use | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in correct["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['op']} | {r['backend']} | "
                         f"{_fmt(r.get('forward_max_abs'))} | {_fmt(r.get('backward_max_abs'))} | "
                         f"{_fmt(r.get('no-grad_max_abs'))} | {_fmt(r.get('tol_use'))} | "
                         f"{'yes' if r['ok'] else 'NO ' + r.get('error', '')} {r.get('note', '')} |")
        lines.append(f"\n{correct.get('cases')} cases, {correct.get('failed')} failed, "
                     f"{correct.get('cut_for_time')} cut for time; "
                     f"skipped backends: {correct.get('skipped') or 'none'}")
    timing = (parts.get("op_timing") or {}).get("result") or {}
    if timing.get("rows"):
        backends = list(dict.fromkeys(r["backend"] for r in timing["rows"]))
        keyed = {(r["model"], r["batch"], r["dtype"], r["op"], r["mode"], r["backend"]): r for r in timing["rows"]}
        spec = timing.get("gpu_spec")
        lines += ["", "## Op timing", "",
                  f"Median ms per call (`triton.testing.do_bench` on a GPU). A streaming copy in the same run moved "
                  f"{timing['copy_bandwidth_GBps']:.0f} GB/s"
                  + (f"; datasheet {spec['name']}: {spec['bandwidth'] / 1e9:.0f} GB/s" if spec else "") + ". "
                  "`GB/s`: the roofline model's minimum bytes (`fpet gpu-report --roofline`) over the fastest "
                  "backend's time, and that as a share of the copy; `bound`: the model's lower bound on this GPU "
                  "(no model for the backward of the single ops).", "",
                  "| model | B | dtype | op | mode | " + " | ".join(f"{b} ms" for b in backends)
                  + " | fastest | GB/s | of copy | bound us |",
                  "|" + "---|" * (9 + len(backends))]
        for key in dict.fromkeys(k[:5] for k in keyed):
            cells = [keyed.get((*key, b), {}) for b in backends]
            timed = [(c["ms"], b, c) for c, b in zip(cells, backends) if "ms" in c]
            ms, fastest, best = min(timed, key=lambda t: t[0]) if timed else (None, "-", {})
            lines.append("| " + " | ".join(str(k) for k in key) + " | "
                         + " | ".join(_fmt(c.get("ms")) if "ms" in c else c.get("error", "-")[:60] for c in cells)
                         + f" | {fastest} | {_fmt(best.get('achieved_GBps'), 4)} | "
                         + (f"{100 * best['of_copy_bandwidth']:.3g}%" if "of_copy_bandwidth" in best else "-")
                         + f" | {_fmt(best.get('bound_us'))} |")
        lines.append(f"\n{len(timing['rows'])} timings, {timing.get('errors')} errors, {timing.get('cut_for_time')} "
                     f"cut for time; skipped backends: {timing.get('skipped') or 'none'}")
    model = (parts.get("model") or {}).get("result") or {}
    if model.get("eval"):
        lines += ["", "## Model", "", f"timm VisionTransformer {model['config']} in {model['dtype']}, random init.",
                  "", "| variant | merge backend | img/s | speedup | batch-1 p50 ms | p90 ms |",
                  "|---|---|---|---|---|---|"]
        for name, e in model["eval"].items():
            lines.append(f"| {name} | {e.get('merge_backend', '-')} | {_fmt(e.get('img_per_s'), 4)} | "
                         f"{_fmt(e.get('speedup'))} | {_fmt(e.get('latency_p50_ms'))} | "
                         f"{_fmt(e.get('latency_p90_ms'))} |")
        lines += ["", "| training step | batch | trainable params | ms | max memory allocated GB |",
                  "|---|---|---|---|---|"]
        for name, e in model.get("train", {}).items():
            if isinstance(e, dict):
                lines.append(f"| {name} | {e['batch']} | {e['trainable_params']} | {_fmt(e.get('step_ms'))} | "
                             f"{_fmt(e.get('max_memory_allocated_GB'))} |")
            else:
                lines.append(f"| {name} | {e} | | | |")
        if model.get("skipped"):
            lines.append(f"\nskipped: {model['skipped']}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, cpp and interpreted Triton")
    parser.add_argument("--parts", type=lambda text: [p.strip() for p in text.split(",")], default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (GPU; default 480)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.out = os.path.abspath(args.out)
    return run_part(args) if args.part else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
