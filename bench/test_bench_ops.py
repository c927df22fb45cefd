"""Kernel benchmarks (pytest-benchmark): every op and ``merge_tokens``, per backend, forward / forward+backward /
no-grad, at ViT-T/16, ViT-S/16 and ViT-B/16 shapes (197 tokens: a 14x14 grid and the class token; C = 192, 384, 768;
Dh = 64) and batch 1, 16, 64.

    pytest bench/test_bench_ops.py --benchmark-only --benchmark-json=bench_ops.json
    pytest bench/ --benchmark-only -k "merge_tokens and no-grad"        # a subset

Backends: ``reference`` and ``cpp`` on CPU (float32, ``torch.set_num_threads(THREADS)``); with a GPU, ``reference``,
``cuda`` and ``triton`` on it (bfloat16). The workloads are fpet_kernels.tools.workloads (the GPU check's): inputs
made once, outside the timing, and 3 untimed calls first; ``backward`` times the forward plus every input's gradient. For every shape and batch
the suite also times a plain streaming copy of the bytes an ideal no-grad kernel must move
(fpet_kernels.tools.gpu_report.roofline.minimum_traffic): the floor of a memory-bound op. At the end
(bench/conftest.py) a table gives each case's median over the reference's and, for no-grad, over the copy's.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import pytest
import torch

from fpet_kernels.backends import get_backend
from fpet_kernels.tools.gpu_report.roofline import minimum_traffic
from fpet_kernels.tools.gpu_report.shapes import VIT_B16, VIT_S16, VIT_T16
from fpet_kernels.tools.workloads import MODES, OPS, op_call, op_tensors, timed_call

THREADS = 2
SHAPES = {"vit_t16": VIT_T16, "vit_s16": VIT_S16, "vit_b16": VIT_B16}
BATCHES = (1, 16, 64)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BACKENDS = ("reference", "cuda", "triton") if DEVICE == "cuda" else ("reference", "cpp")
WARMUP = 3  # untimed calls before pytest-benchmark's rounds
ROOFLINE_NAME = {"merge_tokens": "merge_tokens no-grad"}


def _available(name: str) -> Tuple[bool, str]:
    entry = get_backend(name)
    return bool(entry.available), "" if entry.available else str(entry.unavailable_reason())


@pytest.fixture(autouse=True)
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _synchronised(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def floor_bytes(op: str, shape: str, batch: int) -> int:
    """The bytes an ideal no-grad kernel of ``op`` reads and writes (the roofline model)."""
    element = torch.empty((), dtype=DTYPE).element_size()
    return minimum_traffic(ROOFLINE_NAME.get(op, op), batch, element, SHAPES[shape])[0]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op(benchmark, backend, op, mode, shape, batch):
    ok, reason = _available(backend)
    if not ok:
        pytest.skip(reason)
    impl = get_backend(backend).implementation()
    tensors = op_tensors(SHAPES[shape], batch, DTYPE, DEVICE)
    call, names = op_call(op, SHAPES[shape], tensors)
    benchmark.group = f"{op} {mode} {shape} B={batch}"
    benchmark.extra_info.update(kind="op", op=op, mode=mode, shape=shape, batch=batch, backend=backend,
                                device=DEVICE, dtype=str(DTYPE).replace("torch.", ""))
    run = _synchronised(timed_call(impl, call, names, tensors, mode))
    for _ in range(WARMUP):  # first calls pay one-time costs (allocator growth, lazy index tables, autotuning)
        run()
    benchmark(run)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_streaming_copy(benchmark, op, shape, batch):
    """A copy of half the op's no-grad bytes into a fresh buffer (read + write = the bytes): the floor."""
    nbytes = floor_bytes(op, shape, batch)
    src = torch.randn(max(1, nbytes // 8), device=DEVICE)  # float32: nbytes / 2 read, nbytes / 2 written
    dst = torch.empty_like(src)
    benchmark.group = f"{op} no-grad {shape} B={batch}"
    benchmark.extra_info.update(kind="copy", op=op, mode="no-grad", shape=shape, batch=batch, backend="copy",
                                bytes=2 * src.numel() * 4, device=DEVICE)
    run = _synchronised(lambda: dst.copy_(src))
    for _ in range(WARMUP):
        run()
    benchmark(run)


def summary_table(rows: Sequence[Tuple[Dict[str, Any], float]]) -> str:
    """Markdown: per (op, mode, shape, batch) each backend's median (us) and its ratio to the reference's
    (reference / backend: > 1 is faster), and for no-grad the copy floor and backend / floor."""
    cases: Dict[Tuple, Dict[str, float]] = {}
    for info, median in rows:
        key = (info["op"], info["mode"], info["shape"], info["batch"])
        cases.setdefault(key, {})[info["backend"]] = median
    seen = {b for v in cases.values() for b in v} - {"reference", "copy"}
    backends = sorted(seen, key=lambda b: (("cpp", "cuda", "triton") + (b,)).index(b))
    if not backends:
        return ""
    head = ["op", "mode", "shape", "B", "reference us"] + [f"{b} us" for b in backends]
    head += [f"ref / {b}" for b in backends] + ["copy floor us"] + [f"{b} / floor" for b in backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    op_cases = {k: v for k, v in cases.items() if "reference" in v or any(b in v for b in backends)}
    for (op, mode, shape, batch), medians in sorted(op_cases.items(), key=lambda kv: (
            OPS.index(kv[0][0]), MODES.index(kv[0][1]), list(SHAPES).index(kv[0][2]), kv[0][3])):
        ref = medians.get("reference")
        floor = medians.get("copy") if mode == "no-grad" else None
        cells = [op, mode, shape, str(batch), _us(ref)] + [_us(medians.get(b)) for b in backends]
        cells += [_ratio(ref, medians.get(b)) for b in backends] + [_us(floor)]
        cells += [_ratio(medians.get(b), floor) for b in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"
