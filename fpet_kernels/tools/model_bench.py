"""``fpet bench``: the model-level benchmark (README "Performance"; docs/design.md §7).

For each timm ViT (random init; nothing is downloaded) it builds the variants a user chooses between:

* ``backbone``; ``LoRA``, ``AdaptFormer`` (fpet_kernels.pet defaults); ``FPET+LoRA``, ``FPET+AdaptFormer`` (merge
  block ``depth // 2``);
* ``ToMe r=R`` (fpet_kernels.tome): ``R`` the number of tokens merged per block whose GFLOPs are closest to
  FPET+LoRA's, and two more (``R // 2`` and ``R + R // 2``), on the plain backbone (an inference-only method);
* ``free halving``: the backbone with half the patch tokens simply dropped where FPET merges (no matching, no merge):
  the ceiling of any merge at that block.

and measures, in one process, every variant alternately (round-robin, so machine noise hits all alike). The eval
figures (throughput, latency, GFLOPs) of the LoRA variants are those of the model as deployed, LoRA folded into qkv
(:func:`~fpet_kernels.fold_pet`; ``fold_lora=False`` / ``fpet bench --unfolded-lora`` times the unfolded LoRA, which
adds two low-rank products per block); the training step and the parameters are those of the model as trained:

* eval throughput (img/s) at ``batch`` images: median of ``rounds`` timed rounds after ``warmup``, and the spread
  (min and max over the rounds);
* batch-1 latency p50 / p90 over ``latency_rounds`` rounds;
* GFLOPs per image (``FlopCounterMode``, attention included: :func:`~fpet_kernels.tools.benchmark.count_gflops`);
* parameters, total and trainable (:func:`~fpet_kernels.mark_trainable`; the backbone's "trainable" is full
  fine-tuning, every parameter; ToMe and free halving are inference-only and train nothing);
* the training step (forward, backward, AdamW step over the trainable parameters, cross-entropy on random labels)
  at ``train_batch``: median seconds over ``train_rounds`` alternated rounds, for the PET variants;
* the FPET merge backend that ran (``auto`` resolved: ``cpp`` on CPU with the extension built);
* the training step's peak memory: each PET variant in a **fresh process** (``python -m
  fpet_kernels.tools.model_bench --memory-worker``) builds the model and the optimizer, then runs one training step;
  reported are the peak RSS of that process during the step (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``; fpet_kernels.train.PeakRSS) and the step's part of it, the peak minus the RSS just
  before the step (activations, gradients, optimizer state). The same method for every variant.

Outputs: a markdown table per model, a JSON file with every raw timing, and PNG plots (throughput against GFLOPs,
training time and memory) in ``out``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import benchmark

__all__ = ["VARIANTS", "PET_VARIANTS", "free_halving", "matched_tome_r", "build_variants", "run", "markdown"]

PET_VARIANTS = ("LoRA", "AdaptFormer", "FPET+LoRA", "FPET+AdaptFormer")
VARIANTS = ("backbone",) + PET_VARIANTS + ("ToMe", "free halving")
"""Variant families; ``ToMe`` stands for its three values of r."""


def free_halving(model: nn.Module, layer: int) -> nn.Module:
    """A copy that drops half the patch tokens between block ``layer``'s attention and MLP, where FPET merges."""
    model = copy.deepcopy(model)
    grid = model.patch_embed.grid_size
    keep = model.num_prefix_tokens + grid[0] * grid[1] // 2
    block = model.blocks[layer]

    def forward(x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x[:, :keep].contiguous()  # a fresh tensor, as a merge produces
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    block.forward = forward
    return model


def _pet(backbone: nn.Module, method: str, fpet: bool, backend: str) -> nn.Module:
    from .. import add_pet, apply_fpet, mark_trainable

    model = add_pet(copy.deepcopy(backbone), method)
    if fpet:
        apply_fpet(model, backend=backend)
    mark_trainable(model)
    return model.eval()


def _deployed(model: nn.Module) -> nn.Module:
    """A copy of a LoRA model with LoRA folded into qkv, as deployed (:func:`~fpet_kernels.fold_pet`)."""
    from .. import fold_pet

    return fold_pet(copy.deepcopy(model)).eval()


def matched_tome_r(backbone: nn.Module, target_gflops: float, images: torch.Tensor) -> int:
    """The ToMe ``r`` whose GFLOPs per image are closest to ``target_gflops`` (bisection on the monotone count)."""
    from ..tome import apply_tome

    tokens = backbone.patch_embed.num_patches
    low, high = 1, max(1, tokens // 2)

    def gflops(r: int) -> float:
        model = apply_tome(copy.deepcopy(backbone), r)
        return benchmark.count_gflops(model, images)

    while low < high:  # the smallest r with gflops(r) <= target
        mid = (low + high) // 2
        if gflops(mid) <= target_gflops:
            high = mid
        else:
            low = mid + 1
    if low > 1 and abs(gflops(low - 1) - target_gflops) < abs(gflops(low) - target_gflops):
        return low - 1
    return low


def build_variants(name: str, *, img_size: Optional[int] = None, backend: str = "auto",
                   tome_r: Optional[Sequence[int]] = None) -> Dict[str, nn.Module]:
    """Every variant of the module docstring for the timm model ``name`` (random init, eval mode)."""
    from ..models import create_model
    from ..tome import apply_tome

    torch.manual_seed(0)
    backbone = create_model(name, 1000, img_size=img_size)
    variants: Dict[str, nn.Module] = {"backbone": backbone}
    for variant in PET_VARIANTS:
        fpet = variant.startswith("FPET+")
        method = variant.split("+")[-1].lower()
        variants[variant] = _pet(backbone, method, fpet, backend)
    side = backbone.patch_embed.img_size
    one = torch.randn(1, 3, *side)
    if tome_r is None:
        r = matched_tome_r(backbone, benchmark.count_gflops(variants["FPET+LoRA"], one), one)
        tome_r = sorted({max(1, r // 2), r, r + max(1, r // 2)})
    for r in tome_r:
        variants[f"ToMe r={r}"] = apply_tome(copy.deepcopy(backbone), r)
    variants["free halving"] = free_halving(backbone, len(backbone.blocks) // 2).eval()
    return variants


def _parameters(name: str, model: nn.Module) -> Dict[str, Optional[int]]:
    total = sum(p.numel() for p in model.parameters())
    if name == "backbone":
        trainable: Optional[int] = total  # full fine-tuning
    elif name.startswith("ToMe") or name == "free halving":
        trainable = None  # inference-only
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def _training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)


def time_training(models: Dict[str, nn.Module], batch: int, rounds: int, threads: int) -> Dict[str, List[float]]:
    """Seconds per training step of each model, ``rounds`` timings each, round-robin after one warm-up round."""
    side = next(iter(models.values())).patch_embed.img_size
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *side)
    labels = torch.randint(0, 1000, (batch,))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    states = {name: (copy.deepcopy(model).train(), None) for name, model in models.items()}
    states = {name: (model, _optimizer(model)) for name, (model, _) in states.items()}
    times: Dict[str, List[float]] = {name: [] for name in models}
    try:
        for index in range(rounds + 1):
            for name, (model, optimizer) in states.items():
                start = time.perf_counter()
                _training_step(model, optimizer, images, labels)
                if index:
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return times


def _memory_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: build one PET variant and its optimizer, then the peak RSS of one training step."""
    from ..models import create_model
    from ..train import PeakRSS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    backbone = create_model(spec["model"], 1000, img_size=spec["img_size"])
    variant = spec["variant"]
    model = _pet(backbone, variant.split("+")[-1].lower(), variant.startswith("FPET+"), spec["backend"]).train()
    del backbone
    optimizer = _optimizer(model)
    side = model.patch_embed.img_size
    images = torch.randn(spec["batch"], 3, *side)
    labels = torch.randint(0, 1000, (spec["batch"],))
    memory = PeakRSS()
    memory.reset()
    before = memory.current_mib()
    _training_step(model, optimizer, images, labels)
    peak = memory.peak_mib()
    return {"peak_rss_mib": peak, "before_mib": before, "step_mib": None if before is None else peak - before,
            "method": memory.method}


def measure_memory(model_name: str, variant: str, *, img_size: Optional[int], batch: int, threads: int,
                   backend: str) -> Dict[str, Any]:
    """:func:`_memory_worker` for one variant, in a fresh Python process."""
    spec = {"model": model_name, "variant": variant, "img_size": img_size, "batch": batch, "threads": threads,
            "backend": backend}
    result = subprocess.run(
        [sys.executable, "-m", "fpet_kernels.tools.model_bench", "--memory-worker", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement of {variant} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(
    models: Sequence[str],
    *,
    batch: int = 16,
    threads: int = 2,
    rounds: int = 11,
    warmup: int = 2,
    latency_rounds: int = 21,
    train_batch: int = 32,
    train_rounds: int = 5,
    img_size: Optional[int] = None,
    backend: str = "auto",
    tome_r: Optional[Sequence[int]] = None,
    train: bool = True,
    fold_lora: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> Dict[str, Any]:
    """Benchmark every variant of every model (module docstring); returns the JSON report."""
    report: Dict[str, Any] = {
        "settings": {"batch": batch, "threads": threads, "rounds": rounds, "warmup": warmup,
                     "latency_rounds": latency_rounds, "train_batch": train_batch, "train_rounds": train_rounds,
                     "img_size": img_size, "backend": backend, "train": train, "fold_lora": fold_lora},
        "machine": benchmark.machine_description(threads),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "models": {},
    }
    for model_name in models:
        progress(f"{model_name}: building the variants")
        variants = build_variants(model_name, img_size=img_size, backend=backend, tome_r=tome_r)
        side = variants["backbone"].patch_embed.img_size
        torch.manual_seed(0)
        images = torch.randn(batch, 3, *side)
        deployed = {name: _deployed(model) if fold_lora and "LoRA" in name else model
                    for name, model in variants.items()}
        progress(f"{model_name}: GFLOPs")
        gflops = {name: benchmark.count_gflops(model, images[:1]) for name, model in deployed.items()}
        progress(f"{model_name}: eval throughput, batch {batch}, {rounds} rounds")
        times = benchmark.measure_throughput(deployed, images, runs=rounds, warmup=warmup, threads=threads)
        progress(f"{model_name}: batch-1 latency, {latency_rounds} rounds")
        latency = benchmark.measure_throughput(deployed, images[:1], runs=latency_rounds, warmup=warmup,
                                               threads=threads)
        del deployed
        rows: Dict[str, Dict[str, Any]] = {}
        base = batch / benchmark.median(times["backbone"])
        for name, model in variants.items():
            rate = batch / benchmark.median(times[name])
            rows[name] = {
                "img_per_s": rate, "img_per_s_min": batch / max(times[name]), "img_per_s_max": batch / min(times[name]),
                "vs_backbone": rate / base,
                "latency_p50_ms": 1e3 * _percentile(latency[name], 0.5),
                "latency_p90_ms": 1e3 * _percentile(latency[name], 0.9),
                "gflops": gflops[name], "params": _parameters(name, model),
                "eval_seconds": times[name], "latency_seconds": latency[name],
            }
        if train:
            progress(f"{model_name}: training steps, batch {train_batch}, {train_rounds} rounds")
            steps = time_training({name: variants[name] for name in PET_VARIANTS}, train_batch, train_rounds, threads)
            for name in PET_VARIANTS:
                progress(f"{model_name}: training memory of {name} (a fresh process)")
                rows[name]["train_step_s"] = benchmark.median(steps[name])
                rows[name]["train_step_seconds"] = steps[name]
                rows[name]["train_memory"] = measure_memory(model_name, name, img_size=img_size, batch=train_batch,
                                                            threads=threads, backend=backend)
        from ..train import _merge_backend

        report["models"][model_name] = {"img_size": list(side), "variants": rows,
                                        "merge_backend": _merge_backend(variants["FPET+LoRA"])}
        del variants
    return report


def markdown(report: Dict[str, Any]) -> str:
    """One table per model: every variant's throughput, spread, latency, GFLOPs, parameters and training step."""
    out = []
    for model_name, entry in report["models"].items():
        rows = entry["variants"]
        backend = f", merge backend {entry['merge_backend']}" if entry.get("merge_backend") else ""
        backend += "; eval with LoRA folded" if report["settings"].get("fold_lora") else "; eval with LoRA unfolded"
        out.append(f"**{model_name}** ({entry['img_size'][0]}x{entry['img_size'][1]}, eval batch "
                   f"{report['settings']['batch']}, train batch {report['settings']['train_batch']}{backend}; "
                   f"{report['machine']})\n")
        out.append("| variant | img/s | (min-max) | vs backbone | batch-1 p50 / p90 ms | GFLOPs | params | trainable "
                   "| train step s | step memory MiB (peak RSS) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            trainable = row["params"]["trainable"]
            step = f"{row['train_step_s']:.3f}" if "train_step_s" in row else "-"
            memory = row.get("train_memory")
            mem = (f"{memory['step_mib']:.0f} ({memory['peak_rss_mib']:.0f})"
                   if memory and memory.get("step_mib") is not None else "-")
            out.append(
                f"| {name} | {row['img_per_s']:.1f} | {row['img_per_s_min']:.1f}-{row['img_per_s_max']:.1f} | "
                f"{row['vs_backbone']:.3f}x | {row['latency_p50_ms']:.1f} / {row['latency_p90_ms']:.1f} | "
                f"{row['gflops']:.3f} | {row['params']['total'] / 1e6:.2f} M | "
                f"{'-' if trainable is None else f'{trainable:,}'} | {step} | {mem} |"
            )
        out.append("")
    return "\n".join(out)


def plots(report: Dict[str, Any], out: str) -> List[str]:
    """``throughput_vs_gflops.png`` and ``training.png`` in ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(report["models"])
    names: List[str] = []
    for model_name in models:
        names += [n for n in report["models"][model_name]["variants"] if n not in names]
    colours = plt.get_cmap("tab10")
    style = {name: (colours(i % 10), "s" if name.startswith("ToMe") else "^" if name == "free halving" else "o")
             for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 5.0), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        for name, row in report["models"][model_name]["variants"].items():
            colour, marker = style[name]
            ax.errorbar(row["gflops"], row["img_per_s"],
                        yerr=[[row["img_per_s"] - row["img_per_s_min"]], [row["img_per_s_max"] - row["img_per_s"]]],
                        fmt=marker, color=colour, capsize=3, label=name)
        ax.set_xlabel("GFLOPs per image")
        ax.set_ylabel(f"img/s (batch {report['settings']['batch']}; bars: min-max)")
        ax.set_title(model_name, fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=style[n][0], marker=style[n][1], linestyle="") for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths.append(os.path.join(out, "throughput_vs_gflops.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if report["settings"]["train"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        width = 0.8 / len(models)
        for k, model_name in enumerate(models):
            rows = report["models"][model_name]["variants"]
            xs = [i + k * width for i in range(len(PET_VARIANTS))]
            axes[0].bar(xs, [rows[v]["train_step_s"] for v in PET_VARIANTS], width, label=model_name)
            axes[1].bar(xs, [rows[v]["train_memory"]["step_mib"] or 0 for v in PET_VARIANTS], width, label=model_name)
        for ax, label in zip(axes, ("training step, s", "training step memory, MiB")):
            ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(PET_VARIANTS))])
            ax.set_xticklabels(PET_VARIANTS, fontsize=8)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(os.path.join(out, "training.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


if __name__ == "__main__":  # the memory worker (measure_memory)
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(_memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m fpet_kernels.tools.model_bench --memory-worker JSON (used by fpet bench)")
