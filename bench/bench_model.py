"""Eval throughput of FPET+LoRA vs the plain backbone on this CPU (issue: >= 1.33x for ViT-S/16, batch 16).

Models are timed alternately in one process (docs/design.md §7). A "free halving" row gives the ceiling of any merge
at this block: the same network with half the patch tokens simply dropped at the merge point (no matching, no
merge), so the distance between it and FPET+LoRA is what the merge itself costs.

    python bench/bench_model.py                      # ViT-S/16, batch 16, 2 threads, 11 runs
    python bench/bench_model.py --json out.json      # also save the raw timings
"""
from __future__ import annotations

import argparse
import copy
import json

import timm
import torch

import fpet_kernels as fk
from fpet_kernels.tools import benchmark
from fpet_kernels.tools.model_bench import free_halving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="auto", choices=fk.BACKENDS)
    parser.add_argument("--json", default=None, help="write the raw timings here")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = timm.create_model(args.model).eval()
    layer = len(backbone.blocks) // 2
    models = {
        "backbone": backbone,
        "LoRA": fk.add_pet(copy.deepcopy(backbone), "lora"),
        "FPET+LoRA": fk.apply_fpet(fk.add_pet(copy.deepcopy(backbone), "lora"), backend=args.backend),
        "free halving": free_halving(backbone, layer),
    }
    images = torch.randn(args.batch_size, 3, *backbone.patch_embed.img_size)
    times = benchmark.measure_throughput(models, images, runs=args.runs, warmup=args.warmup, threads=args.threads)
    base = benchmark.median(times["backbone"])
    print(f"{args.model}, batch {args.batch_size}; {benchmark.machine_description(args.threads)}")
    print(f"median of {args.runs} alternated runs after {args.warmup} warm-up rounds, torch.inference_mode()")
    print(f"{'model':<14} {'median s':>9} {'img/s':>8} {'vs backbone':>12}")
    for name, values in times.items():
        seconds = benchmark.median(values)
        print(f"{name:<14} {seconds:>9.4f} {args.batch_size / seconds:>8.1f} {base / seconds:>11.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
