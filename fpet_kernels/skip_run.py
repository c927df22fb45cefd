"""``fpet skip``: SKIP end to end on a data set (docs/design.md §10), on the engine of ``fpet train``.

:func:`run_skip` tunes a PET method (default VPT-shallow) with :func:`fpet_kernels.train.train`, attributes the FFN
neurons once (:func:`fpet_kernels.skip.attribute_ffn`), and for each keep ratio prunes a copy
(:func:`fpet_kernels.skip.skip_prune`), re-tunes it (:func:`fpet_kernels.train.fit`), saves it and scores it; then
it times the backbone, the tuned model and every pruned one alternately and writes a report.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import read_pet_checkpoint, save_pet
from .pet import mark_trainable
from .skip import SELECTIONS, attribute_ffn, check_keep_ratio, ffn_parameters, skip_prune
from .train import (
    ConfigError, TrainConfig, _build_backbone, _datasets, _first_images, _loader, _parse_data, _prepare_out,
    _square_side, _Threads, _write_json, accuracy, fit, load_trained, train,
)

__all__ = ["SkipConfig", "run_skip", "skip_markdown"]


@dataclasses.dataclass
class SkipConfig:
    """One ``fpet skip`` job (:func:`run_skip`); every field has the ``fpet skip`` flag of the same name.

    Attributes:
        train: the prompt-tuning run (:class:`~fpet_kernels.train.TrainConfig`: data, model, PET method, default
            ``vpt-shallow``, FPET on / off, recipe, seed, threads). Its ``out`` is this job's folder.
        keep_ratios: the keep ratios to prune to, each from the same tuned model and attribution.
        selection: ``"layer"`` (top share per layer) or ``"global"`` (one ranking, ``min_keep_ratio`` per layer).
        min_keep_ratio: the global ranking's per-layer minimum.
        fold_bias: fold the removed neurons' mean activation into ``fc2.bias``.
        retune_epochs: epochs of re-tuning the prompts and head after pruning (None: ``train.epochs``).
        attribution_batches: training batches the attribution uses (None: the whole training split).
        tuned: a PET checkpoint of an already tuned model (``fpet train``'s ``pet.safetensors``, on the backbone
            ``train.model`` / ``train.checkpoint`` / ``train.seed``) to prune instead of tuning one (step 1 is
            skipped; ``train.pet`` and ``train.fpet`` are then read from the checkpoint).
    """

    train: Any
    keep_ratios: Tuple[float, ...] = (0.5,)
    selection: str = "layer"
    min_keep_ratio: float = 0.1
    fold_bias: bool = True
    retune_epochs: Optional[int] = None
    attribution_batches: Optional[int] = None
    tuned: Optional[str] = None

    def validate(self) -> None:
        """Every field checked; a bad one is a :class:`~fpet_kernels.train.ConfigError` naming it."""
        if not isinstance(self.train, TrainConfig):
            raise ConfigError("train", f"expected a TrainConfig, got {type(self.train).__name__}")
        self.train.validate()
        if not isinstance(self.keep_ratios, (tuple, list)) or not self.keep_ratios:
            raise ConfigError("keep_ratios", f"expected one or more ratios in (0, 1], got {self.keep_ratios!r}")
        for ratio in self.keep_ratios:
            try:
                check_keep_ratio(ratio)
            except ValueError as error:
                raise ConfigError("keep_ratios", str(error).replace("keep_ratio ", "each ratio ")) from None
        if len(set(float(r) for r in self.keep_ratios)) != len(self.keep_ratios):
            raise ConfigError("keep_ratios", f"ratios repeat: {list(self.keep_ratios)}")
        if self.selection not in SELECTIONS:
            raise ConfigError("selection", f"expected one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        try:
            check_keep_ratio(self.min_keep_ratio, "min_keep_ratio")
        except ValueError as error:
            raise ConfigError("min_keep_ratio", str(error)) from None
        if self.selection == "global" and self.min_keep_ratio > min(self.keep_ratios):
            raise ConfigError("min_keep_ratio", f"expected at most the smallest keep ratio ({min(self.keep_ratios)}), "
                                                f"got {self.min_keep_ratio}")
        if not isinstance(self.fold_bias, bool):
            raise ConfigError("fold_bias", f"expected a bool, got {self.fold_bias!r}")
        if self.tuned is not None and (not isinstance(self.tuned, str) or not os.path.isfile(self.tuned)):
            raise ConfigError("tuned", f"expected the path of a PET checkpoint file, got {self.tuned!r}")
        for name in ("retune_epochs", "attribution_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"expected an int >= 1 or None, got {value!r}")


def _ratio_name(ratio: float) -> str:
    return f"keep{ratio:g}"


def run_skip(config: SkipConfig, log=print) -> Dict[str, Any]:
    """Run SKIP end to end (module docstring, steps 1-5) and return the ``results.json`` object.

    In ``config.train.out`` (default ``runs/skip-<task>-<model>[-fpet]-s<seed>``): ``tuned/`` (the prompt-tuning
    run of :func:`fpet_kernels.train.train`: config, log, ``pet.safetensors``, results; not with ``tuned``), one folder per keep ratio
    (``keep0.5/``: ``log.jsonl`` of the re-tuning and the pruned model's ``pet.safetensors``, which
    :func:`~fpet_kernels.load_pet` rebuilds on a fresh backbone), ``attribution.pt`` (scores and mean activations),
    ``results.json`` and ``report.md``. Throughput: the backbone (no PET, no FPET), the tuned model and every pruned
    one timed alternately in one process (eval mode, inference mode, the first test batch, the configured threads,
    ``train.throughput_runs`` timed runs after 2 warm-up runs; at least 5). Accuracies are test-split fractions."""
    from .tools import benchmark

    started = time.perf_counter()
    config.validate()
    base = config.train
    spec = _parse_data("data", base.data)
    target = spec.target if spec.kind == "pocket-vtab" else os.path.basename(os.path.normpath(spec.target))
    out = base.out or os.path.join("runs", f"skip-{target}-{base.model}{'-fpet' if base.fpet else ''}-s{base.seed}")
    if os.path.exists(os.path.join(out, "results.json")) and not base.overwrite:
        raise ConfigError("out", f"{out!r} already holds a SKIP run; pass overwrite (--overwrite) or another out")
    os.makedirs(out, exist_ok=True)
    threads = base.threads if base.threads is not None else torch.get_num_threads()
    if config.tuned is None:
        tuned_dir = os.path.join(out, "tuned")
        log(f"step 1: tuning {base.pet} on {spec} -> {tuned_dir}/")
        tuned_results = train(dataclasses.replace(base, out=tuned_dir, threads=threads), log=log)
        tuned_path = os.path.join(tuned_dir, "pet.safetensors")
    else:
        tuned_results, tuned_path = None, config.tuned
        try:
            meta = read_pet_checkpoint(config.tuned)
        except ValueError as error:
            raise ConfigError("tuned", str(error)) from None
        base = dataclasses.replace(base, pet="+".join(r["method"] for r in meta["pet"]) or "linear",
                                   fpet=meta["fpet"] is not None)
        log(f"step 1: the tuned model of {config.tuned} ({base.pet}{' + FPET' if base.fpet else ''})")
    try:
        model = load_trained(tuned_path, model=base.model, checkpoint=base.checkpoint, seed=base.seed,
                             backend=base.backend)
    except ConfigError as error:
        raise ConfigError("tuned" if config.tuned else error.field, error.message) from None
    side = _square_side(model, "model")
    split = "trainval" if base.final else "train"
    splits = _datasets(spec, [split, "test"] + ([] if base.final else ["val"]), side, "data", False)
    attribution_loader = _loader(splits[split], base.batch_size, shuffle=False)
    test_loader = _loader(splits["test"], base.batch_size, shuffle=False)
    val_loader = None if base.final else _loader(splits["val"], base.batch_size, shuffle=False)
    if tuned_results is None:  # what train() would have reported of the tuned model
        with _Threads(threads):
            correct, total = accuracy(model, test_loader, progress=base.progress, desc="test")
            val = None if val_loader is None else accuracy(model, val_loader, progress=base.progress, desc="val")
        tuned_results = {
            "test_acc": correct / total, "val_acc": None if val is None else val[0] / val[1],
            "total_params": sum(p.numel() for p in model.parameters()), "num_classes": model.num_classes,
            "gflops_per_image": benchmark.count_gflops(model.eval(), _first_images(splits["test"], 1)),
        }

    with _Threads(threads):
        log(f"step 2: attribution over {'all' if config.attribution_batches is None else config.attribution_batches}"
            f" training batches")
        attribution = attribute_ffn(model, attribution_loader, max_batches=config.attribution_batches,
                                    progress=base.progress)
        torch.save({"scores": attribution.scores, "mean_activation": attribution.mean_activation,
                    "widths": attribution.widths, "num_examples": attribution.num_examples},
                   os.path.join(out, "attribution.pt"))
        runs: Dict[str, Dict[str, Any]] = {}
        pruned_models: Dict[str, nn.Module] = {}
        for ratio in config.keep_ratios:
            name = _ratio_name(float(ratio))
            run_dir = os.path.join(out, name)
            _prepare_out(run_dir, True)
            pruned = copy.deepcopy(model)
            report = skip_prune(pruned, keep_ratio=ratio, selection=config.selection,
                                min_keep_ratio=config.min_keep_ratio, fold_bias=config.fold_bias,
                                attribution=attribution)
            correct, total = accuracy(pruned, test_loader, progress=base.progress, desc="test")
            after_prune = correct / total
            log(f"step 3-4: keep {ratio:g} ({config.selection}): FFN {sum(report.widths)} -> {sum(report.kept)} "
                f"neurons, parameters {report.params_before:,} -> {report.params_after:,}; test acc after pruning "
                f"{100 * after_prune:.2f}%")
            mark_trainable(pruned)
            torch.manual_seed(base.seed)
            retune_loader = _loader(splits[split], base.batch_size, shuffle=True, seed=base.seed)
            epochs = config.retune_epochs or base.epochs
            logs, _ = fit(pruned, retune_loader, epochs=epochs, lr=base.lr, weight_decay=base.weight_decay,
                          warmup_epochs=min(base.warmup_epochs, epochs), label_smoothing=base.label_smoothing,
                          val_loader=val_loader, progress=base.progress, log=log,
                          log_path=os.path.join(run_dir, "log.jsonl"), desc=f"re-tune keep {ratio:g}")
            correct, total = accuracy(pruned, test_loader, progress=base.progress, desc="test")
            save_pet(pruned, os.path.join(run_dir, "pet.safetensors"))
            images = _first_images(splits["test"], base.batch_size)
            runs[name] = {
                "keep_ratio": float(ratio),
                "kept": report.kept,
                "widths": report.widths,
                "params_before": report.params_before,
                "params_after": report.params_after,
                "ffn_params_before": report.ffn_params_before,
                "ffn_params_after": report.ffn_params_after,
                "removed_share_of_all": report.removed_share_of_all,
                "removed_share_of_ffn": report.removed_share_of_ffn,
                "gflops_per_image": benchmark.count_gflops(pruned.eval(), images[:1]),
                "test_acc_after_pruning": after_prune,
                "test_acc_after_retuning": correct / total,
                "val_acc_after_retuning": logs[-1]["val_acc"],
                "retune_epochs": epochs,
                "retune_seconds": sum(entry["seconds"] for entry in logs),
            }
            pruned_models[name] = pruned.eval()
            log(f"step 5: keep {ratio:g}: test acc after re-tuning {100 * correct / total:.2f}%")

    images = _first_images(splits["test"], base.batch_size)
    backbone = _build_backbone(base.model, tuned_results["num_classes"], base.checkpoint, [side, side], base.seed)
    timed = {"backbone": backbone.eval(), "tuned": model.eval(), **pruned_models}
    times = benchmark.measure_throughput(timed, images, runs=max(5, base.throughput_runs), warmup=2, threads=threads)
    rates = {name: images.shape[0] / benchmark.median(values) for name, values in times.items()}
    for name, entry in runs.items():
        entry["eval_img_per_s"] = rates[name]
        entry["speedup_vs_tuned"] = rates[name] / rates["tuned"]
        entry["speedup_vs_backbone"] = rates[name] / rates["backbone"]
    results = {
        "data": str(spec), "model": base.model, "pet": base.pet, "fpet": base.fpet, "selection": config.selection,
        "min_keep_ratio": config.min_keep_ratio if config.selection == "global" else None,
        "fold_bias": config.fold_bias, "attribution_examples": attribution.num_examples,
        "tuned": {
            "test_acc": tuned_results["test_acc"], "val_acc": tuned_results["val_acc"],
            "params": tuned_results["total_params"], "ffn_params": ffn_parameters(model),
            "gflops_per_image": tuned_results["gflops_per_image"], "eval_img_per_s": rates["tuned"],
            "speedup_vs_backbone": rates["tuned"] / rates["backbone"],
            "epochs": base.epochs if config.tuned is None else None, "checkpoint": tuned_path,
        },
        "backbone": {"eval_img_per_s": rates["backbone"],
                     "gflops_per_image": benchmark.count_gflops(backbone, images[:1])},
        "runs": runs, "eval_batch": int(images.shape[0]), "threads": threads,
        "eval_seconds": {name: values for name, values in times.items()},
        "total_seconds": time.perf_counter() - started, "machine": benchmark.machine_description(threads),
    }
    _write_json(os.path.join(out, "results.json"), results)
    text = skip_markdown(results)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    log(text)
    log(f"wrote {out}/ in {results['total_seconds']:.0f} s")
    return results


def skip_markdown(results: Dict[str, Any]) -> str:
    """The report of one :func:`run_skip` job as a markdown table: one row for the tuned model, one per keep ratio."""
    tuned = results["tuned"]
    lines = [
        f"SKIP on {results['data']}, {results['model']} + {results['pet']}{' + FPET' if results['fpet'] else ''}, "
        f"{results['selection']} selection, bias fold {'on' if results['fold_bias'] else 'off'}; throughput at batch "
        f"{results['eval_batch']}, {results['threads']} threads ({results['machine']})",
        "",
        "| model | FFN neurons kept | params | removed (% of all / % of FFN) | GFLOPs | img/s | vs tuned | vs backbone "
        "| test acc: tuned / pruned / re-tuned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| tuned | 100% | {tuned['params']:,} | - | {tuned['gflops_per_image']:.4f} | {tuned['eval_img_per_s']:.1f} "
        f"| 1.00x | {tuned['speedup_vs_backbone']:.2f}x | {100 * tuned['test_acc']:.2f} |",
    ]
    for name, run in results["runs"].items():
        lines.append(
            f"| {name} | {100 * sum(run['kept']) / sum(run['widths']):.0f}% | {run['params_after']:,} | "
            f"{100 * run['removed_share_of_all']:.1f}% / {100 * run['removed_share_of_ffn']:.1f}% | "
            f"{run['gflops_per_image']:.4f} | {run['eval_img_per_s']:.1f} | {run['speedup_vs_tuned']:.2f}x | "
            f"{run['speedup_vs_backbone']:.2f}x | {100 * tuned['test_acc']:.2f} / "
            f"{100 * run['test_acc_after_pruning']:.2f} / {100 * run['test_acc_after_retuning']:.2f} |"
        )
    return "\n".join(lines)
