"""The accuracy experiment: PET with and without FPET on pocket-VTAB with the shipped pocket ViT, on the CPU.

    python python/accuracy_table.py                        # the README's table (about an hour on 2 CPU cores)
    python python/accuracy_table.py --quick --out /tmp/acc  # 2 tasks, 1 epoch, 3 methods (< 2 minutes), for testing

For every pocket-VTAB task (fpet_kernels.data; generated into its cache on first use) and every method below, one
fine-tuning run of :func:`fpet_kernels.train.train` (the engine behind ``fpet train``) on the shipped backbone
(``--model pocket-vit``): trained on ``train800val200`` (the VTAB-1k protocol: the final 1000 training images, no
model selection on the test split), scored once on ``test`` (500 images), the same seed, epochs and recipe for every
method (AdamW, lr 1e-3, weight decay 1e-4, batch 64, one warm-up epoch then a cosine decay; the FPET paper's recipe
with fewer epochs so that the CPU run fits).

Methods (``METHODS``): the linear probe (the head alone), LoRA and AdaptFormer (fpet_kernels.pet, default
hyper-parameters), the same two with FPET (merge block 4 of 8, 1-bit refinement adapter of width 32), and FPET+LoRA
without the refinement adapter (``refine_dim=0``: the keys are matched as they are).

Throughput is measured separately at the end, in one process, every method's model (10-class head, eval mode,
``torch.inference_mode``) and the plain backbone timed round-robin (fpet_kernels.tools.benchmark) on a batch of 64
images with ``--threads`` threads; the median of ``--timing-runs`` rounds after warm-up. GFLOPs per image come from
torch's ``FlopCounterMode``. Per-run accuracy does not depend on the timing.

Outputs in ``--out`` (default ``docs/results``): ``accuracy_table.json`` (every run's results.json, the timing, the
settings, the machine and the wall time) and ``accuracy_table.md`` (the tables the README quotes); the runs
themselves (config, log, PET checkpoint) in ``--runs`` (default a temporary folder; ``--resume`` reuses a run
whose results.json is already there with the same config).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS: Dict[str, Dict[str, Any]] = {
    "linear probe": {"pet": "linear", "fpet": False},
    "LoRA": {"pet": "lora", "fpet": False},
    "AdaptFormer": {"pet": "adaptformer", "fpet": False},
    "FPET+LoRA": {"pet": "lora", "fpet": True},
    "FPET+AdaptFormer": {"pet": "adaptformer", "fpet": True},
    "FPET+LoRA, no refinement": {"pet": "lora", "fpet": True, "refine_dim": 0},
}
"""Table rows: the :class:`~fpet_kernels.train.TrainConfig` fields that differ between methods."""

PAIRS = (("FPET+LoRA", "LoRA"), ("FPET+AdaptFormer", "AdaptFormer"), ("FPET+LoRA, no refinement", "LoRA"))
"""(FPET method, the same PET without FPET): the comparisons of the goal (within 0.5 point on the mean)."""

QUICK_TASKS = ("digits", "count")
QUICK_METHODS = ("linear probe", "LoRA", "FPET+LoRA")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_one(task: str, method: str, args: argparse.Namespace, runs_dir: str) -> Dict[str, Any]:
    """One fine-tuning run (reused with ``--resume`` when its results.json exists with the same config)."""
    from fpet_kernels.train import TrainConfig, train

    out = os.path.join(runs_dir, task, _slug(method))
    config = TrainConfig(
        data=f"pocket-vtab:{task}", model=args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, threads=args.threads, out=out, overwrite=True, final=True, progress=False,
        throughput_runs=0, **METHODS[method],
    )
    results_path = os.path.join(out, "results.json")
    if args.resume and os.path.isfile(results_path):
        with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
            stored = json.load(handle)
        wanted = dataclasses.asdict(config)
        if all(stored.get(k) == v for k, v in wanted.items() if k not in ("layer", "img_size", "overwrite")):
            with open(results_path, encoding="utf-8") as handle:
                return json.load(handle)
    return train(config, log=lambda line: None)


def measure_speed(methods: List[str], args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Eval img/s (median of round-robin rounds) and GFLOPs per image of every method's model and the backbone."""
    import torch

    from fpet_kernels import add_pet, apply_fpet
    from fpet_kernels.models import create_model
    from fpet_kernels.tools import benchmark

    torch.manual_seed(args.seed)
    backbone = create_model(args.model, 10)
    side = backbone.patch_embed.img_size[0]
    models = {"backbone": backbone}
    for method in methods:
        fields = METHODS[method]
        model = add_pet(create_model(args.model, 10), fields["pet"])
        if fields["fpet"]:
            apply_fpet(model, len(model.blocks) // 2, refine_dim=fields.get("refine_dim", 32))
        models[method] = model.eval()
    images = torch.randn(args.batch_size, 3, side, side)
    gflops = {name: benchmark.count_gflops(model, images[:1]) for name, model in models.items()}
    times = benchmark.measure_throughput(models, images, runs=args.timing_runs, warmup=2, threads=args.threads)
    speed = {}
    for name in models:
        rate = args.batch_size / benchmark.median(times[name])
        speed[name] = {"img_per_s": rate, "gflops_per_image": gflops[name],
                       "spread_img_per_s": [args.batch_size / max(times[name]), args.batch_size / min(times[name])]}
    base = speed["backbone"]["img_per_s"]
    for entry in speed.values():
        entry["speedup"] = entry["img_per_s"] / base
    return speed


def markdown(report: Dict[str, Any]) -> str:
    """The accuracy table (per task, group means, mean, trainable parameters, GFLOPs, img/s) and the FPET deltas."""
    tasks, groups = report["tasks"], report["groups"]
    acc = report["accuracy"]
    speed = report["speed"]
    group_names = [g for g in ("natural", "specialized", "structured") if g in groups.values()]
    head = ["method"] + tasks + [f"*{g}*" for g in group_names] + ["**mean**", "trainable params", "GFLOPs",
                                                                    "img/s", "vs backbone"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in report["methods"]:
        row = [method] + [f"{acc[method][t]:.1f}" for t in tasks]
        row += [f"{report['group_mean'][method][g]:.1f}" for g in group_names]
        row += [f"**{report['mean'][method]:.1f}**", f"{report['trainable_params'][method]:,}",
                f"{speed[method]['gflops_per_image']:.3f}", f"{speed[method]['img_per_s']:.0f}",
                f"{speed[method]['speedup']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    base = speed["backbone"]
    lines.append("| backbone (no training) | " + " | ".join([""] * (len(tasks) + len(group_names) + 2))
                 + f" | {base['gflops_per_image']:.3f} | {base['img_per_s']:.0f} | 1.00x |")
    lines += ["", "| FPET method | PET alone | mean (FPET) | mean (PET) | difference | goal (within 0.5) |",
              "|---|---|---:|---:|---:|---|"]
    for fpet_method, pet_method in report["pairs"]:
        diff = report["mean"][fpet_method] - report["mean"][pet_method]
        lines.append(f"| {fpet_method} | {pet_method} | {report['mean'][fpet_method]:.1f} | "
                     f"{report['mean'][pet_method]:.1f} | {diff:+.1f} | {'met' if diff >= -0.5 else 'missed'} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"),
                        help="folder of accuracy_table.json / .md (default: docs/results)")
    parser.add_argument("--runs", dest="runs_dir", default=None,
                        help="folder of the individual runs (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="reuse runs already in --runs with the same config")
    parser.add_argument("--model", default="pocket-vit", help="backbone (default: the shipped pocket-vit)")
    parser.add_argument("--tasks", default=None, help="comma-separated pocket-VTAB tasks (default: all)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default: all of {', '.join(METHODS)})")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-runs", type=int, default=20,
                        help="round-robin timing rounds for throughput (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tasks {','.join(QUICK_TASKS)}, methods {','.join(QUICK_METHODS)}, 1 epoch, 3 timing "
                             "rounds (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = args.tasks or ",".join(QUICK_TASKS)
        args.methods = args.methods or ",".join(QUICK_METHODS)
        args.epochs, args.timing_runs = 1, 3
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import numpy as np
    from tqdm import tqdm

    from fpet_kernels.data import get_task, list_tasks
    from fpet_kernels.tools import benchmark

    tasks = [get_task(t.strip()).name for t in args.tasks.split(",")] if args.tasks else [t.name for t in list_tasks()]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"accuracy_table.py: error: unknown --methods {unknown}; expected some of {list(METHODS)}")
    groups = {t: get_task(t).group for t in tasks}
    os.makedirs(args.out, exist_ok=True)
    temporary = None
    runs_dir = args.runs_dir
    if runs_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="fpet-accuracy-")
        runs_dir = temporary.name
    start = time.perf_counter()
    runs: Dict[str, Dict[str, Any]] = {m: {} for m in methods}
    bar = tqdm([(t, m) for t in tasks for m in methods], desc="runs", unit="run")
    for task, method in bar:
        bar.set_postfix_str(f"{task} / {method}")
        result = run_one(task, method, args, runs_dir)
        runs[method][task] = result
        tqdm.write(f"{task:12s} {method:26s} test {100 * result['test_acc']:5.1f}%  "
                   f"({result['train_seconds']:.0f} s training)")
    train_seconds = time.perf_counter() - start
    print(f"timing {len(methods) + 1} models round-robin ({args.timing_runs} rounds, batch {args.batch_size}, "
          f"{args.threads} threads) ...", flush=True)
    speed = measure_speed(methods, args)

    accuracy = {m: {t: 100.0 * runs[m][t]["test_acc"] for t in tasks} for m in methods}
    group_mean = {m: {g: float(np.mean([accuracy[m][t] for t in tasks if groups[t] == g]))
                      for g in set(groups.values())} for m in methods}
    report = {
        "tasks": tasks,
        "groups": groups,
        "methods": methods,
        "pairs": [p for p in PAIRS if p[0] in methods and p[1] in methods],
        "accuracy": accuracy,
        "mean": {m: float(np.mean(list(accuracy[m].values()))) for m in methods},
        "group_mean": group_mean,
        "trainable_params": {m: runs[m][tasks[0]]["trainable_params"] for m in methods},
        "speed": speed,
        "settings": {"model": args.model, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "seed": args.seed, "threads": args.threads, "timing_rounds": args.timing_runs,
                     "protocol": "fit train800val200, score test (500 images), one run per task and method"},
        "machine": benchmark.machine_description(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "train_wall_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        # what the runs themselves took when they were trained (the same with --resume, which only re-times)
        "runs_seconds": round(sum(runs[m][t]["total_seconds"] for m in methods for t in tasks), 1),
        "runs": runs,
    }
    table = markdown(report)
    with open(os.path.join(args.out, "accuracy_table.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")
    with open(os.path.join(args.out, "accuracy_table.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Test accuracy (%) on pocket-VTAB, {args.model}, {args.epochs} epochs, seed {args.seed}; "
                     f"eval img/s at batch {args.batch_size}, {report['machine']}; the {len(tasks) * len(methods)} "
                     f"runs took {report['runs_seconds'] / 60:.1f} min; {report['date']}.\n\n{table}\n")
    print("\n" + table)
    print(f"\nwrote {args.out}/accuracy_table.json and accuracy_table.md ({report['wall_seconds'] / 60:.1f} min; the "
          f"runs took {report['runs_seconds'] / 60:.1f} min)")
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
