"""Model-level measurements shared by ``fpet demo`` and ``bench/``: tokens per block, FLOPs, CPU throughput.

Timing follows docs/design.md §7: a fixed thread count, ``torch.inference_mode()``, warm-up runs, the median of
several runs, and the models measured alternately in one process (round-robin) so that machine noise hits all alike.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..vit import find_vision_transformer

__all__ = ["tokens_per_block", "attention_flop_formulas", "count_gflops", "measure_throughput", "median", "machine_description"]


def tokens_per_block(model: nn.Module, images: torch.Tensor) -> List[int]:
    """Number of tokens entering each transformer block for one forward pass of ``images``."""
    counts: List[int] = []
    handles = [
        block.register_forward_pre_hook(lambda module, args: counts.append(int(args[0].shape[1])))
        for block in find_vision_transformer(model, allow_eva=True).blocks
    ]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def attention_flop_formulas() -> Dict[Any, Any]:
    """FLOP formulas for the CPU flash-attention kernels that ``FlopCounterMode`` has none for (torch 2.14 counts
    ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward as 0): torch's own SDPA formulas, the
    ones it registers for the CUDA kernels (``4 B H N M Dh`` forward). Ops torch already knows are left alone."""
    from torch.utils import flop_counter

    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", getattr(flop_counter, "sdpa_flop", None)),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", getattr(flop_counter, "sdpa_backward_flop", None)),
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and formula is not None and op not in flop_counter.flop_registry:
            # the module-level formulas are already shape-wrapped; FlopCounterMode wraps custom ones itself
            formulas[op] = getattr(formula, "__wrapped__", formula)
    return formulas


def count_gflops(model: nn.Module, images: torch.Tensor) -> float:
    """GFLOPs of one forward pass of ``images`` (``torch.utils.flop_counter.FlopCounterMode``, attention included
    through :func:`attention_flop_formulas`; a multiply-add counts as 2 FLOPs). One uncounted forward runs first, so
    one-time work of a first call (LoRA folding its weight into qkv for no-grad use) is not counted."""
    with torch.inference_mode():
        model(images)
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    with torch.inference_mode(), counter:
        model(images)
    return counter.get_total_flops() / 1e9


def measure_throughput(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    *,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 2,
) -> Dict[str, List[float]]:
    """Seconds per forward pass of ``images`` for each model: ``runs`` timings each, taken round-robin (model A,
    model B, ..., A, B, ...) after ``warmup`` untimed rounds, with ``threads`` intra-op threads."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: Dict[str, List[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for round_index in range(warmup + runs):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(images)
                    elapsed = time.perf_counter() - start
                    if round_index >= warmup:
                        times[name].append(elapsed)
    finally:
        torch.set_num_threads(previous_threads)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description(threads: int) -> str:
    """One line naming the CPU, the thread count and the torch version, to print beside timings."""
    return f"{cpu_name()}; {threads} thread(s); torch {torch.__version__}"
