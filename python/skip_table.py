"""The SKIP experiment: prompt tuning vs SKIP vs FPET+VPT vs FPET+SKIP on pocket-VTAB with the shipped pocket ViT.

    python python/skip_table.py                          # the README's table (about 40 minutes on 2 CPU cores)
    python python/skip_table.py --quick --out /tmp/skip  # 1 task, 1 epoch, keep 0.5 (about a minute), for testing

For every pocket-VTAB task, two :func:`fpet_kernels.skip_run.run_skip` jobs (the engine behind ``fpet skip``) on the
shipped backbone: VPT-shallow (10 prompts + head, backbone frozen) without and with FPET (merge block 4 of 8), each
tuned for ``--epochs`` on ``train800val200`` and scored once on ``test``; then, from that tuned model and one
attribution over its training images, one pruned model per keep ratio (``--keep-ratios``; ``--selection``,
default ``global``: one ranking over all layers with at least ``--min-keep-ratio`` of each; bias fold on), each
re-tuned for ``--retune-epochs`` and scored on ``test`` again. The same seed and recipe for every run (AdamW,
lr 1e-3, weight decay 1e-4, batch 64, one warm-up epoch then a cosine decay).

Throughput is measured once at the end, in one process: the plain backbone and every method's model of the first
task (rebuilt from their checkpoints; the same keep ratio keeps the same number of FFN neurons in every task, so
nearly the same GFLOPs; with ``global`` selection their split over the layers differs by task) timed round-robin
(fpet_kernels.tools.benchmark) on a batch of ``--batch-size`` test images with ``--threads`` threads, the median
of ``--timing-runs`` rounds after warm-up. GFLOPs per image from
torch's ``FlopCounterMode``.

Outputs in ``--out`` (default ``docs/results``): ``skip_table.json`` (every job's results.json, the timing, the
settings, the machine, the wall time) and ``skip_table.md`` (the tables the README quotes); the jobs themselves in
``--runs`` (default a temporary folder; ``--resume`` reuses a job whose results.json is there with the same
settings).
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

QUICK_TASKS = ("digits",)


def _job(task: str, fpet: bool, args: argparse.Namespace, runs_dir: str) -> Dict[str, Any]:
    """One ``run_skip`` job (reused with ``--resume`` when its results.json exists with the same settings)."""
    from fpet_kernels.skip_run import SkipConfig, run_skip
    from fpet_kernels.train import TrainConfig

    out = os.path.join(runs_dir, task, "fpet-vpt" if fpet else "vpt")
    config = SkipConfig(
        train=TrainConfig(data=f"pocket-vtab:{task}", model=args.model, pet="vpt-shallow", fpet=fpet,
                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                          threads=args.threads, out=out, overwrite=True, final=True, progress=False,
                          throughput_runs=0),
        keep_ratios=tuple(args.keep_ratios), retune_epochs=args.retune_epochs, selection=args.selection,
        min_keep_ratio=args.min_keep_ratio,
    )
    settings = {"train": dataclasses.asdict(config.train), **{k: v for k, v in dataclasses.asdict(config).items()
                                                                if k != "train"}}
    settings["keep_ratios"] = list(settings["keep_ratios"])
    results_path = os.path.join(out, "results.json")
    settings_path = os.path.join(out, "skip_table_settings.json")
    if args.resume and os.path.isfile(results_path) and os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                with open(results_path, encoding="utf-8") as handle:
                    return json.load(handle)
    tuned = os.path.join(out, "tuned", "pet.safetensors")
    if args.reuse_tuned and os.path.isfile(tuned) and os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            if json.load(handle)["train"] == settings["train"]:  # the same tuning: prune that model again
                moved = os.path.join(out, "tuned.reused.safetensors")
                os.replace(tuned, moved)
                config = dataclasses.replace(config, tuned=moved)
    results = run_skip(config, log=lambda line: None)
    if config.tuned is not None:
        os.replace(config.tuned, tuned)
        results["tuned"]["checkpoint"] = tuned
        results["tuned"]["epochs"] = args.epochs
        results["tuned_reused"] = True
        with open(results_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, sort_keys=True)
            handle.write("\n")
    with open(settings_path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)
    return results


def _rows(keep_ratios: List[float]) -> List[Dict[str, Any]]:
    """Table rows: (name, fpet, keep-ratio run name or None for the tuned model)."""
    rows = [{"name": "prompt tuning (VPT)", "fpet": False, "run": None}]
    rows += [{"name": f"SKIP keep {r:g}", "fpet": False, "run": f"keep{r:g}"} for r in keep_ratios]
    rows += [{"name": "FPET+VPT", "fpet": True, "run": None}]
    rows += [{"name": f"FPET+SKIP keep {r:g}", "fpet": True, "run": f"keep{r:g}"} for r in keep_ratios]
    return rows


def measure_speed(task: str, rows: List[Dict[str, Any]], args: argparse.Namespace, runs_dir: str
                  ) -> Dict[str, Dict[str, float]]:
    """Eval img/s (round-robin median) and GFLOPs per image of the backbone and every row's model of ``task``."""
    import torch

    from fpet_kernels.data import default_transform, parse_data_spec
    from fpet_kernels.models import create_model
    from fpet_kernels.tools import benchmark
    from fpet_kernels.train import load_trained

    models = {}
    for row in rows:
        job = os.path.join(runs_dir, task, "fpet-vpt" if row["fpet"] else "vpt")
        path = os.path.join(job, "tuned" if row["run"] is None else row["run"], "pet.safetensors")
        models[row["name"]] = load_trained(path, model=args.model, seed=args.seed)
    torch.manual_seed(args.seed)
    num_classes = next(iter(models.values())).num_classes
    models = {"backbone": create_model(args.model, num_classes).eval(), **models}
    side = models["backbone"].patch_embed.img_size[0]
    test = parse_data_spec(f"pocket-vtab:{task}").dataset("test", default_transform(side))
    images = torch.stack([test[i][0] for i in range(min(args.batch_size, len(test)))])
    gflops = {name: benchmark.count_gflops(model, images[:1]) for name, model in models.items()}
    times = benchmark.measure_throughput(models, images, runs=args.timing_runs, warmup=2, threads=args.threads)
    speed = {}
    for name in models:
        rate = images.shape[0] / benchmark.median(times[name])
        speed[name] = {"img_per_s": rate, "gflops_per_image": gflops[name],
                       "spread_img_per_s": [images.shape[0] / max(times[name]), images.shape[0] / min(times[name])]}
    for entry in speed.values():
        entry["vs_backbone"] = entry["img_per_s"] / speed["backbone"]["img_per_s"]
        entry["vs_prompt_tuning"] = entry["img_per_s"] / speed["prompt tuning (VPT)"]["img_per_s"]
    return speed


def markdown(report: Dict[str, Any]) -> str:
    """The accuracy / speed table, the pruning detail and the goals."""
    tasks, rows, speed = report["tasks"], report["rows"], report["speed"]
    head = ["method"] + tasks + ["**mean**", "mean before re-tuning", "FFN params", "GFLOPs", "img/s",
                                 "vs VPT", "vs backbone"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        name = row["name"]
        acc = report["accuracy"][name]
        pruned = report["accuracy_after_pruning"].get(name)
        cells = [name] + [f"{acc[t]:.1f}" for t in tasks] + [f"**{report['mean'][name]:.1f}**"]
        cells += ["-" if pruned is None else f"{sum(pruned.values()) / len(pruned):.1f}"]
        cells += [f"{report['ffn_params'][name]:,}", f"{speed[name]['gflops_per_image']:.4f}",
                  f"{speed[name]['img_per_s']:.0f}", f"{speed[name]['vs_prompt_tuning']:.2f}x",
                  f"{speed[name]['vs_backbone']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    base = speed["backbone"]
    lines.append("| backbone (no training) | " + " | ".join([""] * (len(tasks) + 3))
                 + f" | {base['gflops_per_image']:.4f} | {base['img_per_s']:.0f} | "
                 f"{base['vs_prompt_tuning']:.2f}x | 1.00x |")
    lines += ["", "| goal | best candidate | measured | met? |", "|---|---|---|---|"]
    for goal in report["goals"]:
        met = "met" if goal["met"] else "missed"
        lines.append(f"| {goal['goal']} | {goal['candidate']} | {goal['measured']} | {met} |")
    return "\n".join(lines)


def goals(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's two goals, judged on the measured table."""
    vpt = report["mean"]["prompt tuning (VPT)"]
    speed = report["speed"]
    skip_rows = [r["name"] for r in report["rows"] if r["run"] is not None and not r["fpet"]]
    ok = [n for n in skip_rows if report["mean"][n] >= vpt - 1.0]
    if ok:
        best = max(ok, key=lambda n: speed[n]["vs_prompt_tuning"])
    else:
        best = max(skip_rows, key=lambda n: report["mean"][n])
    first = {
        "goal": "SKIP >= 1.5x eval throughput (vs prompt tuning) with <= 1 point mean accuracy loss",
        "candidate": best,
        "measured": f"{speed[best]['vs_prompt_tuning']:.2f}x, {report['mean'][best] - vpt:+.1f} points",
        "met": bool(best in ok and speed[best]["vs_prompt_tuning"] >= 1.5),
    }
    fpet_rows = [r["name"] for r in report["rows"] if r["run"] is not None and r["fpet"]]
    fastest = max(fpet_rows, key=lambda n: speed[n]["vs_backbone"])
    second = {
        "goal": "FPET+SKIP >= 2x the backbone's eval throughput",
        "candidate": fastest,
        "measured": f"{speed[fastest]['vs_backbone']:.2f}x ({report['mean'][fastest] - vpt:+.1f} points vs VPT)",
        "met": bool(speed[fastest]["vs_backbone"] >= 2.0),
    }
    return [first, second]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"),
                        help="folder of skip_table.json / .md (default: docs/results)")
    parser.add_argument("--runs", dest="runs_dir", default=None, help="folder of the jobs (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="reuse jobs already in --runs with the same settings")
    parser.add_argument("--model", default="pocket-vit", help="backbone (default: the shipped pocket-vit)")
    parser.add_argument("--tasks", default=None, help="comma-separated pocket-VTAB tasks (default: all)")
    parser.add_argument("--keep-ratios", default="0.5,0.35,0.25", help="keep ratios (default: 0.5,0.35,0.25)")
    parser.add_argument("--epochs", type=int, default=10, help="prompt-tuning epochs (default 10)")
    parser.add_argument("--retune-epochs", type=int, default=5, help="re-tuning epochs after pruning (default 5)")
    parser.add_argument("--selection", default="global", choices=("layer", "global"),
                        help="neuron selection (default global: one ranking over all layers)")
    parser.add_argument("--min-keep-ratio", type=float, default=0.1,
                        help="global selection: the per-layer minimum share kept (default 0.1)")
    parser.add_argument("--reuse-tuned", action="store_true",
                        help="prune the tuned models already in --runs (same tuning settings) again instead of "
                        "re-tuning them (e.g. for another --selection)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-runs", type=int, default=20, help="round-robin timing rounds (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help=f"task {','.join(QUICK_TASKS)}, keep 0.5, 1 epoch each, 3 timing rounds (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = args.tasks or ",".join(QUICK_TASKS)
        args.keep_ratios = "0.5"
        args.epochs, args.retune_epochs, args.timing_runs = 1, 1, 3
    args.keep_ratios = [float(r) for r in args.keep_ratios.split(",")]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from fpet_kernels.data import get_task, list_tasks
    from fpet_kernels.tools import benchmark

    tasks = [get_task(t.strip()).name for t in args.tasks.split(",")] if args.tasks else [t.name for t in list_tasks()]
    rows = _rows(args.keep_ratios)
    os.makedirs(args.out, exist_ok=True)
    temporary = None
    runs_dir = args.runs_dir
    if runs_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="fpet-skip-")
        runs_dir = temporary.name
    start = time.perf_counter()
    jobs: Dict[str, Dict[str, Any]] = {"vpt": {}, "fpet-vpt": {}}
    bar = tqdm([(t, f) for t in tasks for f in (False, True)], desc="jobs", unit="job")
    for task, fpet in bar:
        bar.set_postfix_str(f"{task} / {'FPET+' if fpet else ''}VPT")
        result = _job(task, fpet, args, runs_dir)
        jobs["fpet-vpt" if fpet else "vpt"][task] = result
        accs = ", ".join(f"{name} {100 * run['test_acc_after_retuning']:.1f}" for name, run in result["runs"].items())
        tqdm.write(f"{task:12s} {'FPET+' if fpet else '     '}VPT {100 * result['tuned']['test_acc']:5.1f}%; {accs} "
                   f"({result['total_seconds']:.0f} s)")
    jobs_seconds = sum(job["total_seconds"] for group in jobs.values() for job in group.values())
    print(f"timing {len(rows) + 1} models round-robin ({args.timing_runs} rounds, batch {args.batch_size}, "
          f"{args.threads} threads) ...", flush=True)
    speed = measure_speed(tasks[0], rows, args, runs_dir)

    accuracy: Dict[str, Dict[str, float]] = {}
    after_pruning: Dict[str, Dict[str, float]] = {}
    ffn_params: Dict[str, int] = {}
    for row in rows:
        group = jobs["fpet-vpt" if row["fpet"] else "vpt"]
        if row["run"] is None:
            accuracy[row["name"]] = {t: 100 * group[t]["tuned"]["test_acc"] for t in tasks}
            ffn_params[row["name"]] = group[tasks[0]]["tuned"]["ffn_params"]
        else:
            accuracy[row["name"]] = {t: 100 * group[t]["runs"][row["run"]]["test_acc_after_retuning"] for t in tasks}
            after_pruning[row["name"]] = {t: 100 * group[t]["runs"][row["run"]]["test_acc_after_pruning"]
                                          for t in tasks}
            ffn_params[row["name"]] = group[tasks[0]]["runs"][row["run"]]["ffn_params_after"]
    report = {
        "tasks": tasks,
        "rows": rows,
        "accuracy": accuracy,
        "accuracy_after_pruning": after_pruning,
        "mean": {name: sum(values.values()) / len(values) for name, values in accuracy.items()},
        "ffn_params": ffn_params,
        "speed": speed,
        "settings": {"model": args.model, "epochs": args.epochs, "retune_epochs": args.retune_epochs,
                     "keep_ratios": args.keep_ratios, "selection": args.selection,
                     "min_keep_ratio": args.min_keep_ratio if args.selection == "global" else None,
                     "fold_bias": True, "lr": args.lr,
                     "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
                     "timing_rounds": args.timing_runs, "timing_task": tasks[0],
                     "protocol": "tune on train800val200, attribute on it, prune, re-tune on it, score test (500)"},
        "machine": benchmark.machine_description(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "jobs_seconds": round(jobs_seconds, 1),
        "jobs": jobs,
    }
    report["goals"] = goals(report)
    table = markdown(report)
    reuses = sum(bool(job.get("tuned_reused")) for group in jobs.values() for job in group.values())
    reused = (f" ({reuses} of them pruned a tuned model of an earlier run with the same tuning settings; "
               "that tuning's time is not counted)"
              if reuses else "")
    with open(os.path.join(args.out, "skip_table.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")
    with open(os.path.join(args.out, "skip_table.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Test accuracy (%) on pocket-VTAB, {args.model} + VPT-shallow (10 prompts), {args.epochs} tuning "
                     f"epochs, {args.retune_epochs} re-tuning epochs after pruning, {args.selection} selection"
                     f"{f' (at least {args.min_keep_ratio:g} per layer)' if args.selection == 'global' else ''}, "
                     f"seed {args.seed}; eval img/s at "
                     f"batch {args.batch_size}, {report['machine']}; the {2 * len(tasks)} jobs took "
                     f"{jobs_seconds / 60:.1f} min{reused}; {report['date']}.\n\n{table}\n")
    print("\n" + table)
    print(f"\nwrote {args.out}/skip_table.json and skip_table.md ({report['wall_seconds'] / 60:.1f} min; the jobs "
          f"took {jobs_seconds / 60:.1f} min)")
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
