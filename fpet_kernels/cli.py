"""The ``fpet`` command (also ``python -m fpet_kernels``)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .backends import BACKENDS, resolve_backend
from .pet import add_pet
from .tools import benchmark
from .vit import find_vision_transformer
from .vit_patch import apply_fpet, get_fpet_patch, remove_fpet


def _model_flag(error: BaseException, checkpoint: Optional[str], model_flag: str = "--model") -> str:
    """The flag a ``models.create_model`` error is about: --checkpoint, --img-size, --num-classes or the model's."""
    text = str(error)
    if checkpoint is not None and str(checkpoint) in text:
        return "--checkpoint"
    if "img_size" in text:
        return "--img-size"
    if "num_classes" in text:
        return "--num-classes"
    return model_flag


def _grid_mistake(model, name: str) -> Optional[str]:
    """Why ``model``'s input size does not fit its patch grid (a side not a multiple of the patch side), or None."""
    embed = find_vision_transformer(model).patch_embed
    size, patch = tuple(int(s) for s in embed.img_size), tuple(int(p) for p in embed.patch_size)
    if any(side % step for side, step in zip(size, patch)):
        return (f"{name} has {patch[0]}x{patch[1]} patches, so the input sides must be multiples of them, "
                f"got {size[0]}x{size[1]}")
    return None


def _format_tokens(counts: List[int]) -> str:
    """``[197]*6 + [99]*6`` -> ``197x6, 99x6``."""
    runs: List[List[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count}x{repeat}" for count, repeat in runs)


def _run_timing_demo(args: argparse.Namespace) -> int:
    """The timing-only demo (a timm ViT at random init or with --checkpoint, or the untrained pocket ViT)."""
    from .models import POCKET_VIT_NAME, create_model

    torch.manual_seed(0)
    try:
        backbone = create_model(args.model, args.num_classes, checkpoint=args.checkpoint, img_size=args.img_size)
    except (ValueError, FileNotFoundError) as error:  # an unknown or non-ViT model, a bad size or checkpoint
        return _usage_error("fpet demo", f"argument {_model_flag(error, args.checkpoint)}: {error}", error)
    mistake = _grid_mistake(backbone, args.model)
    if mistake:
        return _usage_error("fpet demo", f"argument --img-size: {mistake}")
    depth = len(find_vision_transformer(backbone).blocks)
    if args.layer is not None and not 0 <= args.layer < depth:
        return _usage_error("fpet demo", f"argument --layer: expected a merge block in [0, {depth}) for {args.model} "
                            f"({depth} blocks), got {args.layer}")
    lora = add_pet(copy.deepcopy(backbone), "lora")
    fpet_lora = apply_fpet(add_pet(copy.deepcopy(backbone), "lora"), args.layer, backend=args.backend)
    models = {"backbone": backbone, "LoRA": lora, "FPET+LoRA": fpet_lora}
    images = torch.randn(args.batch_size, 3, args.img_size[0], args.img_size[1])
    weights = "random init" if not args.checkpoint else args.checkpoint
    if args.model == POCKET_VIT_NAME:
        weights = "shipped pretrained weights, untrained head"
    print(f"{args.model} ({weights}), input {args.img_size[0]}x{args.img_size[1]}, batch {args.batch_size}")
    print(f"machine: {benchmark.machine_description(args.threads)}")
    print(f"timing: median of {args.runs} runs after {args.warmup} warm-up rounds, models alternated, eval mode\n")

    tokens = {name: benchmark.tokens_per_block(model, images[:1]) for name, model in models.items()}
    gflops = {name: benchmark.count_gflops(model, images[:1]) for name, model in models.items()}
    times = benchmark.measure_throughput(models, images, runs=args.runs, warmup=args.warmup, threads=args.threads)
    base_rate = args.batch_size / benchmark.median(times["backbone"])
    patch = get_fpet_patch(fpet_lora)
    merge_backend = resolve_backend(patch.vit.blocks[patch.layer].token_merger.backend, images.device).name

    header = f"{'model':<11} {'tokens per block':<20} {'GFLOPs/img':>10} {'img/s':>8} {'speedup':>8}  backend"
    print(header)
    print("-" * len(header))
    for name, model in models.items():
        rate = args.batch_size / benchmark.median(times[name])
        backend = merge_backend if name == "FPET+LoRA" else "-"
        print(
            f"{name:<11} {_format_tokens(tokens[name]):<20} {gflops[name]:>10.2f} {rate:>8.1f} "
            f"{rate / base_rate:>7.2f}x  {backend}"
        )
    return 0


DEMO_METHODS = (("LoRA", False), ("FPET+LoRA", True))
DEMO_EPOCHS = 8


def _run_finetune_demo(args: argparse.Namespace) -> int:
    """The main demo: fine-tune LoRA and FPET+LoRA on the shipped pocket ViT on one pocket-VTAB task (the
    fine-tuning engine of ``fpet train``, ``final`` protocol), then compare them and the plain backbone: test
    accuracy, trainable parameters, tokens per block, GFLOPs per image and eval throughput (round-robin)."""
    import os
    import tempfile

    from .data import default_transform, get_task, load_pocket_vtab
    from .models import POCKET_VIT, POCKET_VIT_NAME, create_model
    from .train import ConfigError, TrainConfig, load_trained, train

    try:  # both mistakes are reported before the first of the two runs, not after it
        get_task(args.task)
    except ValueError as error:
        return _usage_error("fpet demo", f"argument --task: {error}", error)
    depth = POCKET_VIT["depth"]
    if args.layer is not None and not 0 <= args.layer < depth:
        return _usage_error("fpet demo", f"argument --layer: expected a merge block in [0, {depth}) for "
                            f"{POCKET_VIT_NAME} ({depth} blocks), got {args.layer}")
    with tempfile.TemporaryDirectory(prefix="fpet-demo-") as scratch:
        out = args.out or scratch
        results, folders = {}, {}
        for index, (name, fpet) in enumerate(DEMO_METHODS, 1):
            folders[name] = os.path.join(out, name.lower().replace("+", "-"))
            print(f"[{index}/{len(DEMO_METHODS)}] fine-tuning {name} ...", flush=True)
            config = TrainConfig(
                data=f"pocket-vtab:{args.task}", model=POCKET_VIT_NAME, pet="lora", fpet=fpet, layer=args.layer,
                backend=args.backend, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                threads=args.threads, out=folders[name], overwrite=True,
                final=True, progress=not args.no_progress, throughput_runs=0,
            )
            try:
                results[name] = train(config, log=lambda line: print("    " + line, flush=True))
            except ConfigError as error:
                if error.field == "data":  # the demo's data set is --task
                    error = ConfigError("task", error.message)
                return _config_error("fpet demo", error)
        torch.manual_seed(args.seed)
        models = {"backbone": create_model(POCKET_VIT_NAME, results["LoRA"]["num_classes"])}
        for name, _ in DEMO_METHODS:  # rebuilt from the saved PET checkpoints, as a user deploys them
            models[name] = load_trained(os.path.join(folders[name], "pet.safetensors"), backend=args.backend)
    side = results["LoRA"]["img_size"]
    test = load_pocket_vtab(args.task, "test", default_transform(side), progress=False)
    images = torch.stack([test[i][0] for i in range(min(args.batch_size, len(test)))])
    tokens = {name: benchmark.tokens_per_block(model, images[:1]) for name, model in models.items()}
    gflops = {name: benchmark.count_gflops(model, images[:1]) for name, model in models.items()}
    times = benchmark.measure_throughput(models, images, runs=args.runs, warmup=args.warmup, threads=args.threads)
    base_rate = images.shape[0] / benchmark.median(times["backbone"])
    first = results["LoRA"]
    print(f"\n{POCKET_VIT_NAME} (shipped pretrained backbone) fine-tuned on pocket-vtab:{args.task} "
          f"({first['num_classes']} classes, {first['train_images']} training / {first['test_images']} test images, "
          f"{side}x{side}), {args.epochs} epochs, seed {args.seed}")
    print(f"machine: {benchmark.machine_description(args.threads)}")
    print(f"timing: batch {images.shape[0]}, median of {args.runs} runs after {args.warmup} warm-up rounds, models "
          f"alternated, eval mode\n")
    header = (f"{'model':<10} {'test acc':>8} {'trainable':>10} {'train s':>8} {'tokens per block':<16} "
              f"{'GFLOPs/img':>10} {'img/s':>8} {'speedup':>8}  backend")
    print(header)
    print("-" * len(header))
    for name in models:
        rate = images.shape[0] / benchmark.median(times[name])
        result = results.get(name)
        acc = f"{100 * result['test_acc']:.1f}%" if result else "-"
        trainable = f"{result['trainable_params']:,}" if result else "-"
        seconds = f"{result['train_seconds']:.0f}" if result else "-"
        backend = (result or {}).get("merge_backend") or "-"
        print(f"{name:<10} {acc:>8} {trainable:>10} {seconds:>8} {_format_tokens(tokens[name]):<16} "
              f"{gflops[name]:>10.3f} {rate:>8.1f} {rate / base_rate:>7.2f}x  {backend}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`fpet demo`: the fine-tuning demo on the shipped pocket ViT, or the timing-only demo of a timm ViT."""
    from .models import POCKET_VIT_NAME

    fine_tune = args.model == POCKET_VIT_NAME and not args.timing_only
    if args.batch_size is None:
        args.batch_size = 64 if fine_tune else 16
    if args.runs is None:
        args.runs = 10 if fine_tune else 5
    if fine_tune:
        return _run_finetune_demo(args)
    if args.img_size is None:
        args.img_size = [64, 64] if args.model == POCKET_VIT_NAME else [224, 224]
    return _run_timing_demo(args)


BENCH_MODELS = "vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224"


def run_bench(args: argparse.Namespace) -> int:
    """`fpet bench`: the model-level benchmark (fpet_kernels.tools.model_bench); table, JSON and plots in --out."""
    import os

    from tqdm import tqdm

    from .tools import model_bench

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        print("fpet bench: error: --models: expected comma-separated timm ViT names", file=sys.stderr)
        return 2
    from .models import create_model

    for name in models:  # a bad name is one error line, before anything is timed
        try:
            mistake = _grid_mistake(create_model(name, 0, img_size=args.img_size), name)
        except (ValueError, FileNotFoundError) as error:
            return _usage_error("fpet bench", f"argument {_model_flag(error, None, '--models')}: {error}", error)
        if mistake:
            return _usage_error("fpet bench", f"argument --img-size: {mistake}")
    stages = 4 + (1 + len(model_bench.PET_VARIANTS) if not args.no_train else 0)
    bar = tqdm(total=stages * len(models), desc="bench", unit="stage", disable=args.no_progress)

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    report = model_bench.run(
        models, batch=args.batch_size, threads=args.threads, rounds=args.rounds, warmup=args.warmup,
        latency_rounds=args.latency_rounds, train_batch=args.train_batch, train_rounds=args.train_rounds,
        img_size=args.img_size, backend=args.backend, tome_r=args.tome_r, train=not args.no_train,
        fold_lora=not args.unfolded_lora, progress=progress,
    )
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    table = model_bench.markdown(report)
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")
    with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    written = ["bench.json", "bench.md"]
    if not args.no_plots:
        written += [os.path.basename(p) for p in model_bench.plots(report, args.out)]
    print(table)
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def run_gpu_report(args: argparse.Namespace) -> int:
    """Compile every Triton kernel for real GPU targets and read the CUDA C++ kernels of the built extension (no
    GPU needed); print the resource table, or the roofline model with --roofline. Exit status 1 when the check finds
    a problem (spills, shared memory, tensor cores, a kernel never launched, a CUDA arch missing from the build)."""
    import importlib

    from .tools import gpu_report  # a developer tool: imported only when this command runs

    if args.launcher is not None:
        module, _, function = args.launcher.partition(":")
        try:
            found = callable(getattr(importlib.import_module(module), function, None)) if module and function else None
        except ImportError as error:
            return _usage_error("fpet gpu-report", f"argument --launcher: cannot import {module!r}: {error}", error)
        if not found:
            what = "expected module:function" if found is None else f"{module} has no function {function!r}"
            return _usage_error("fpet gpu-report", f"argument --launcher: {what}, got {args.launcher!r}")
    return gpu_report.main(args)


GPU_REPORT_DTYPES = ("fp32", "bf16", "fp16", "fp64")


def _dtypes(text: str) -> List[str]:
    """An argparse type: comma-separated dtypes of ``fpet gpu-report`` (GPU_REPORT_DTYPES)."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    if not dtypes or any(d not in GPU_REPORT_DTYPES for d in dtypes):
        raise argparse.ArgumentTypeError(f"expected comma-separated dtypes from {', '.join(GPU_REPORT_DTYPES)}, "
                                         f"got {text!r}")
    return dtypes


def _archs(text: str) -> List[int]:
    try:
        archs = [int(a) for a in text.replace(";", ",").split(",") if a.strip()]
    except ValueError:
        archs = []
    if not archs or min(archs) < 10:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 80,90, got {text!r}")
    return archs


def _img_size(text: str) -> List[int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")
    return parts


# ---------------------------------------------------------------------------------------------- train / eval / data
def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else an error naming ``what`` was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} (an int >= {minimum}), got {text!r}")
        return value

    return parse


def _float_in(low: float, high: Optional[float], what: str, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the given range, else an error naming ``what`` was expected."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        ok = value is not None and value == value and value not in (float("inf"), float("-inf"))
        ok = ok and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _sizes(text: str) -> List[int]:
    """An argparse type: ``TRAIN,VAL,TEST`` image counts of a pocket-VTAB task."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected three positive image counts TRAIN800,VAL200,TEST like 800,200,500, got {text!r}"
        )
    return sizes


def _flag(field: str) -> str:
    """The command-line flag of a TrainConfig field or evaluate() parameter."""
    return "--" + field.replace("_", "-")


DEBUG_ENV = "FPET_DEBUG"
"""With ``FPET_DEBUG=1`` (any value but empty or 0) an error is raised with its Python traceback instead of being
printed as one line."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_error(prog: str, message: str, error: Optional[BaseException] = None) -> int:
    """Print the one line ``fpet <command>: error: message`` (a usage mistake) and return 2; with FPET_DEBUG set,
    raise ``error`` (the exception behind the message) instead."""
    if error is not None and _debug():
        raise error
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _config_error(prog: str, error) -> int:
    """Print a ConfigError as the one line ``fpet <command>: error: argument --flag: message``; return 2."""
    return _usage_error(prog, f"argument {_flag(error.field)}: {error.message}", error)


def run_train(args: argparse.Namespace) -> int:
    """`fpet train`: one fine-tuning run (fpet_kernels.train.train) from the parsed flags; 2 for a bad argument."""
    from .train import ConfigError, TrainConfig, train

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values["progress"] = not args.no_progress
    try:
        train(TrainConfig(**values))
    except ConfigError as error:
        return _config_error("fpet train", error)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`fpet eval`: accuracy and eval throughput of a PET checkpoint (fpet_kernels.train.evaluate), one line or
    --json; 2 for a bad argument."""
    from .train import ConfigError, evaluate

    try:
        result = evaluate(
            args.pet_checkpoint, args.data, model=args.model, checkpoint=args.checkpoint, split=args.split,
            batch_size=args.batch_size, seed=args.seed, threads=args.threads, backend=args.backend,
            throughput_runs=args.throughput_runs, progress=not args.no_progress,
        )
    except ConfigError as error:
        return _config_error("fpet eval", error)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    rate = result["eval_img_per_s"]
    rate_text = "" if rate is None else f"; eval {rate:.1f} img/s at batch {result['eval_batch']}, " \
        f"{result['threads']} thread(s)"
    print(
        f"{result['split']} accuracy {100 * result['accuracy']:.2f}% ({result['correct']}/{result['total']})"
        f"{rate_text}; {result['gflops_per_image']:.4f} GFLOPs/img; PET {'+'.join(result['pet']) or '-'}"
        f"{' + FPET (' + str(result['merge_backend']) + ')' if result['fpet'] else ''}"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`fpet export`: a PET checkpoint's model to ONNX (fpet_kernels.export.export_onnx), checked in onnxruntime;
    with --compare also the model without FPET, both timed in onnxruntime."""
    from .train import ConfigError, load_trained

    prog = "fpet export"
    if not args.onnx.endswith(".onnx"):
        print(f"{prog}: error: argument --onnx: expected a path ending in .onnx, got {args.onnx!r}", file=sys.stderr)
        return 2
    if not args.static_batch and args.batch_size < 2:
        print(f"{prog}: error: argument --batch-size: a dynamic batch is traced at a batch >= 2 (torch.export "
              "specialises 1); pass --static-batch to export batch 1", file=sys.stderr)
        return 2
    try:
        model = load_trained(args.pet_checkpoint, model=args.model, checkpoint=args.checkpoint, seed=args.seed)
    except ConfigError as error:
        return _config_error(prog, error)
    if args.compare and get_fpet_patch(model) is None:
        print(f"{prog}: error: argument --compare: {args.pet_checkpoint} was trained without FPET: there is no "
              "unmerged model to compare with", file=sys.stderr)
        return 2
    directory = os.path.dirname(os.path.abspath(args.onnx))
    os.makedirs(directory, exist_ok=True)
    options = dict(batch_size=args.batch_size, dynamic_batch=not args.static_batch, opset=args.opset,
                   fold=not args.no_fold, check=not args.no_check, atol=args.atol, rtol=args.rtol)
    try:
        return _export_and_report(args, model, options)
    except (ImportError, RuntimeError) as error:  # onnx missing, or the exporter failed: one line (FPET_DEBUG=1 raises)
        if _debug():
            raise
        print(f"{prog}: error: {_one_line(error)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


def _export_and_report(args: argparse.Namespace, model, options: Dict[str, Any]) -> int:
    from .export import export_onnx, time_onnx

    result = export_onnx(model, args.onnx, **options)
    report: Dict[str, Any] = {"export": result.as_dict()}
    if args.compare:
        plain = remove_fpet(copy.deepcopy(model))
        plain_path = args.onnx[: -len(".onnx")] + ".unmerged.onnx"
        report["unmerged"] = export_onnx(plain, plain_path, **options).as_dict()
        batch = args.batch_size if args.static_batch else args.time_batch
        side = result.input_shape[2:]
        images = torch.randn(batch, 3, *side, generator=torch.Generator().manual_seed(0))
        merged, unmerged = time_onnx([args.onnx, plain_path], images, runs=args.runs, threads=args.threads)
        report["onnxruntime"] = {"batch": batch, "threads": args.threads, "runs": args.runs, "fpet": merged,
                                 "unmerged": unmerged, "speedup": unmerged["median_ms"] / merged["median_ms"]}
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    checked = ("not checked in onnxruntime" if result.max_abs_diff is None else
               f"onnxruntime matches PyTorch (max |diff| {result.max_abs_diff:.2g} at batch "
               f"{', '.join(map(str, result.checked_batches))}; atol {result.atol:g}, rtol {result.rtol:g})")
    parts = [f"opset {result.opset}", "dynamic batch" if result.dynamic_batch else f"batch {result.input_shape[0]}"]
    if result.folded:
        parts.append(f"{'+'.join(result.folded)} folded")
    if result.fpet_layer is not None:
        parts.append(f"FPET merge at block {result.fpet_layer}")
    print(f"{result.path}: {', '.join(parts)}; {checked}; {result.gflops:.4f} GFLOPs/img")
    if args.compare:
        timing, plain_result = report["onnxruntime"], report["unmerged"]
        print(f"{plain_result['path']}: the same model without FPET, {plain_result['gflops']:.4f} GFLOPs/img; "
              f"onnxruntime median at batch {timing['batch']}, {args.threads or 'default'} thread(s), "
              f"{timing['runs']} alternating runs: FPET {timing['fpet']['median_ms']:.2f} ms vs "
              f"{timing['unmerged']['median_ms']:.2f} ms ({timing['speedup']:.2f}x)")
    return 0


def run_data(args: argparse.Namespace) -> int:
    """`fpet data`: the pocket-VTAB task table (--list) or generate tasks into the cache (--generate)."""
    from .data import get_task, list_tasks, pocket_vtab_dir

    if args.list:
        tasks = list_tasks()
        width = max(len(task.name) for task in tasks)
        header = f"{'task':<{width}}  {'group':<11}  {'classes':>7}  description"
        print(header)
        print("-" * len(header))
        for task in tasks:
            print(f"{task.name:<{width}}  {task.group:<11}  {task.num_classes:>7}  {task.description}")
        return 0
    if args.generate == "all":
        names = [task.name for task in list_tasks()]
    else:
        try:
            names = [get_task(args.generate).name]
        except ValueError as error:
            print(f"fpet data: error: argument --generate: {error} (or 'all')", file=sys.stderr)
            return 2
    for name in names:
        try:
            path = pocket_vtab_dir(name, root=args.root, seed=args.seed, sizes=args.sizes,
                                   progress=not args.no_progress)
        except (FileExistsError, OSError) as error:
            print(f"fpet data: error: {error}", file=sys.stderr)
            return 2
        print(f"{name}: {path}")
    return 0


def run_visualize(args: argparse.Namespace) -> int:
    """`fpet visualize`: the merge groups of one image drawn over it (fpet_kernels.visualize), for a trained model
    (--pet-checkpoint) or an untrained FPET one (the backbone patched with apply_fpet at --layer)."""
    import os

    from .train import ConfigError, _build_backbone, load_trained
    from .visualize import visualize

    if not os.path.isfile(args.image):
        print(f"fpet visualize: error: argument IMAGE: no image file {args.image!r}", file=sys.stderr)
        return 2
    try:
        if args.pet_checkpoint:
            model = load_trained(args.pet_checkpoint, model=args.model, checkpoint=args.checkpoint, seed=args.seed)
        else:
            model = _build_backbone(args.model, 0, args.checkpoint, args.img_size, args.seed)
            mistake = _grid_mistake(model, args.model)
            if mistake:
                raise ConfigError("img_size", mistake)
            depth = len(find_vision_transformer(model).blocks)
            if args.layer is not None and not 0 <= args.layer < depth:
                raise ConfigError("layer",
                                  f"expected a merge block in [0, {depth}) for {args.model}, got {args.layer}")
            apply_fpet(model, args.layer)
    except ConfigError as error:
        return _config_error("fpet visualize", error)
    if get_fpet_patch(model) is None:
        print(f"fpet visualize: error: argument --pet-checkpoint: {args.pet_checkpoint} was trained without FPET: "
              "there is no merge to draw", file=sys.stderr)
        return 2
    try:
        info = visualize(args.image, model.eval(), args.out)
    except OSError as error:  # an unreadable image, an unwritable output
        print(f"fpet visualize: error: {error}", file=sys.stderr)
        return 2
    before, after = info["tokens"]
    print(f"{args.out}: {info['output_size'][0]}x{info['output_size'][1]} px; {before} -> {after} tokens; "
          f"{info['merged_groups']} of {info['groups']} B patches received A patches, the largest group has "
          f"{info['largest_group']} patches")
    return 0


def _add_visualize_parser(commands) -> None:
    from .models import MODEL_HELP

    parser = commands.add_parser(
        "visualize",
        one_line_errors=True,
        help="draw the merge groups of an image: each B patch and the A patches merged into it share a colour",
        description="Run one image through an FPET model and save it with the merge groups drawn over it (each B patch "
        "and the A patches merged into it share one colour; thin lines between groups). The model is a trained one "
        "(--pet-checkpoint, as written by fpet train) or, without it, the backbone patched with FPET untrained.",
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file (resized to the model's input size)")
    parser.add_argument("--model", default="pocket-vit", help=MODEL_HELP)
    parser.add_argument("--checkpoint", default=None, help="local timm weights for --model")
    parser.add_argument("--pet-checkpoint", default=None,
                        help="a PET checkpoint written by fpet train (pet.safetensors)")
    parser.add_argument("--img-size", type=_img_size, default=None, help="input size for a timm --model (SIZE or HxW)")
    parser.add_argument("--layer", type=_int_at_least(0, "a block index"), default=None,
                        help="merge block without --pet-checkpoint (default depth // 2)")
    parser.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0,
                        help="seed of a random-init backbone (as in fpet train)")
    parser.add_argument("--out", default="merge.png", help="output PNG (default merge.png)")
    parser.set_defaults(func=run_visualize)


def _add_training_arguments(parser, pet_default: str, fpet_default: bool, out_default: str) -> None:
    """The data, model, PET / FPET, recipe and output flags of `fpet train` (and `fpet skip`), one per TrainConfig
    field; defaults are read from TrainConfig, so the help shows the real ones."""
    from .data.spec import SPEC_FORMS
    from .models import MODEL_HELP
    from .pet import PET_METHODS
    from .train import TrainConfig

    default = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    parser.add_argument("--data", required=True, metavar="SPEC", help=f"data set: {', '.join(SPEC_FORMS)}")
    parser.add_argument("--model", default=default["model"], help=f"backbone: {MODEL_HELP} (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="local timm weights for a timm --model (default: random init)")
    parser.add_argument("--img-size", type=_int_at_least(1, "an image side in pixels"), default=None, metavar="SIZE",
                        help="input side in pixels; images are resized to SIZExSIZE (default: the model's own)")
    parser.add_argument("--pet", default=pet_default, choices=list(PET_METHODS),
                        help="PET method with its default hyper-parameters; linear = linear probe, the head only "
                        "(default: %(default)s)")
    parser.add_argument("--fpet", action=argparse.BooleanOptionalAction, default=fpet_default,
                        help=f"FPET token merging (default: {'on' if fpet_default else 'off'})")
    parser.add_argument("--layer", type=_int_at_least(0, "a block index"), default=None,
                        help="FPET merge block (default: depth // 2)")
    parser.add_argument("--refine-dim", type=_int_at_least(0, "a width"), default=default["refine_dim"],
                        help="FPET key refinement width; 0 disables it (default: %(default)s)")
    parser.add_argument("--refine-bits", type=int, choices=(1, 32), default=default["refine_bits"],
                        help="FPET refinement weights: 1-bit or 32-bit (default: %(default)s)")
    parser.add_argument("--refine-scale", type=_float_in(float("-inf"), None, "a finite number"),
                        default=default["refine_scale"], help="FPET refinement scale (default: %(default)s)")
    parser.add_argument("--refine-dropout", type=_float_in(0.0, 1.0, "a probability in [0, 1)", high_open=True),
                        default=default["refine_dropout"], help="FPET refinement dropout (default: %(default)s)")
    parser.add_argument("--backend", default=default["backend"], choices=BACKENDS,
                        help="FPET kernel backend (default: %(default)s)")
    parser.add_argument("--epochs", type=_int_at_least(1, "an epoch count"), default=default["epochs"],
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=_float_in(0.0, None, "a learning rate > 0", low_open=True),
                        default=default["lr"], help="AdamW peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=_float_in(0.0, None, "a weight decay >= 0"),
                        default=default["weight_decay"], help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=_float_in(0.0, None, "a number of epochs >= 0"),
                        default=default["warmup_epochs"],
                        help="linear warm-up epochs before the cosine decay, at most --epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=_int_at_least(1, "a batch size"), default=default["batch_size"],
                        help="training and evaluation batch size (default: %(default)s)")
    parser.add_argument("--label-smoothing", type=_float_in(0.0, 1.0, "a value in [0, 1)", high_open=True),
                        default=default["label_smoothing"], help="cross-entropy label smoothing (default: %(default)s)")
    parser.add_argument("--seed", type=_int_at_least(0, "a seed"), default=default["seed"],
                        help="seeds the initialisation, dropout and data order (default: %(default)s)")
    parser.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=None,
                        help="torch intra-op threads for training and timing (default: torch's setting)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder (default: {out_default})")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a run already in --out")
    parser.add_argument("--final", action="store_true",
                        help="train on train800val200 (train + val), no validation; report the test accuracy")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--throughput-runs", type=_int_at_least(0, "a run count"), default=default["throughput_runs"],
                        help="timed runs of the final eval throughput, median reported; 0 skips it "
                        "(default: %(default)s)")


def _add_train_parser(commands) -> None:
    """The `fpet train` subcommand; flag defaults are read from TrainConfig, so the help shows the real ones."""
    from .train import TrainConfig

    default = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    train = commands.add_parser(
        "train",
        one_line_errors=True,
        help="fine-tune a ViT with a PET method (+ FPET) on a data set and write the PET checkpoint, a log and results",
        description="Fine-tune a ViT on CPU: only the PET parameters, the FPET refinement adapter and the classifier "
        "head train (the trainable-parameter count is printed). Trains on train800 and reports the val200 accuracy "
        "after every epoch (--final: trains on train800val200, no validation), then the test accuracy. Recipe: AdamW, "
        "cosine schedule after a linear warm-up, cross-entropy. Writes to --out: config.json, log.jsonl (one line "
        "per epoch: epoch, train_loss, train_acc, val_acc, lr, seconds, img_per_s, peak_rss_mib, start_rss_mib, "
        "val_seconds), pet.safetensors (for `fpet eval`) and results.json (accuracies, eval throughput, trainable "
        "parameters, GFLOPs per image, times, peak memory). The same arguments and thread count give the same "
        "pet.safetensors. Peak memory is the process's peak RSS during each epoch's training steps (VmHWM, reset "
        "per epoch through /proc/self/clear_refs).",
    )
    _add_training_arguments(train, default["pet"], default["fpet"], "runs/<data>-<model>-<pet>[-fpet]-s<seed>")
    train.set_defaults(func=run_train)


def _ratios(text: str) -> List[float]:
    """Comma-separated keep ratios, each in (0, 1]."""
    from .skip import check_keep_ratio

    try:
        values = [float(part) for part in text.split(",")]
        return [check_keep_ratio(value, "each ratio") for value in values]
    except ValueError as error:
        message = str(error) if "each ratio" in str(error) else f"expected numbers like 0.5,0.35,0.25, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def run_skip(args: argparse.Namespace) -> int:
    """`fpet skip`: SKIP end to end (fpet_kernels.skip.run_skip) from the parsed flags; 2 for a bad argument."""
    from .skip_run import SkipConfig, run_skip as run
    from .train import ConfigError, TrainConfig

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values["progress"] = not args.no_progress
    config = SkipConfig(
        train=TrainConfig(**values), keep_ratios=tuple(args.keep_ratios), selection=args.selection,
        min_keep_ratio=args.min_keep_ratio, fold_bias=args.fold_bias, retune_epochs=args.retune_epochs,
        attribution_batches=args.attribution_batches, tuned=args.tuned,
    )
    try:
        run(config)
    except ConfigError as error:
        return _config_error("fpet skip", error)
    return 0


def _add_skip_parser(commands) -> None:
    """The `fpet skip` subcommand: `fpet train`'s flags (prompt tuning by default) and SKIP's own."""
    from .skip import SELECTIONS

    skip = commands.add_parser(
        "skip",
        one_line_errors=True,
        help="SKIP: prompt-tune, find the FFN neurons the task uses, prune the rest, re-tune; report accuracy, "
        "parameters, GFLOPs and throughput",
        description="SKIP (skill-localized prompt tuning) for a ViT on CPU: (1) tune --pet (default vpt-shallow: "
        "prompts + head, backbone frozen; `fpet train`'s engine and flags), (2) attribute every FFN neuron "
        "(mean over training examples of the mean over tokens of |h * dz_y/dh| at mlp.act, z_y the gold logit; "
        "size-weighted over FPET's merged tokens), (3) keep the top share per layer (--selection layer) or by one "
        "global ranking with a per-layer minimum, (4) cut fc1 / fc2 down to the kept neurons (optionally folding "
        "the removed ones' mean activation into fc2.bias), (5) re-tune prompts and head. One pruned model per "
        "--keep-ratios value, from the same tuned model. Writes to --out: tuned/ (the tuning run), keep<R>/ "
        "(log.jsonl and the pruned model's pet.safetensors, loadable by `fpet eval`), attribution.pt, "
        "results.json and report.md (parameters before / after, GFLOPs, eval throughput vs the tuned model and the "
        "backbone timed alternately, test accuracy after tuning, pruning and re-tuning).",
    )
    _add_training_arguments(skip, "vpt-shallow", False, "runs/skip-<task>-<model>[-fpet]-s<seed>")
    skip.add_argument("--keep-ratios", type=_ratios, default=[0.5], metavar="R[,R...]",
                      help="share(s) of FFN neurons kept, each in (0, 1] (default: 0.5)")
    skip.add_argument("--selection", default="layer", choices=SELECTIONS,
                      help="layer: the top share of every layer; global: one ranking over all layers with at least "
                      "--min-keep-ratio per layer (default: %(default)s)")
    skip.add_argument("--min-keep-ratio", type=_float_in(0.0, 1.0, "a ratio in (0, 1]", low_open=True), default=0.1,
                      help="global selection: the per-layer minimum share kept (default: %(default)s)")
    skip.add_argument("--fold-bias", action=argparse.BooleanOptionalAction, default=True,
                      help="fold the removed neurons' mean activation into fc2.bias (default: on)")
    skip.add_argument("--retune-epochs", type=_int_at_least(1, "an epoch count"), default=None,
                      help="re-tuning epochs after pruning (default: --epochs)")
    skip.add_argument("--attribution-batches", type=_int_at_least(1, "a batch count"), default=None,
                      help="training batches of the attribution (default: the whole training split)")
    skip.add_argument("--tuned", default=None, metavar="PET_CHECKPOINT",
                      help="prune this already tuned model (a pet.safetensors of `fpet train` on the same --model, "
                      "--checkpoint and --seed) instead of tuning one; --pet / --fpet then come from it")
    skip.set_defaults(func=run_skip)


def _add_eval_parser(commands) -> None:
    """The `fpet eval` subcommand."""
    from .data.spec import SPEC_FORMS
    from .data.spec import SPLITS
    from .models import MODEL_HELP

    evaluate = commands.add_parser(
        "eval",
        one_line_errors=True,
        help="accuracy and eval throughput of a PET checkpoint from `fpet train` on one split of a data set",
        description="Build the backbone (--model, --checkpoint; seeded with --seed before it is built, so a "
        "random-init timm backbone equals the one trained with that seed) with the class count and input size "
        "stored in --pet-checkpoint, load the PET / FPET model onto it (the backbone weights must be those it was "
        "trained on: checked by SHA-256) and print the accuracy on --split and the eval throughput.",
    )
    evaluate.add_argument("--pet-checkpoint", required=True, metavar="PATH",
                          help="pet.safetensors written by `fpet train`")
    evaluate.add_argument("--data", required=True, metavar="SPEC", help=f"data set: {', '.join(SPEC_FORMS)}")
    evaluate.add_argument("--model", default="pocket-vit", help=f"backbone: {MODEL_HELP} (default: %(default)s)")
    evaluate.add_argument("--checkpoint", default=None, metavar="PATH", help="local timm weights for a timm --model")
    evaluate.add_argument("--split", default="test", choices=SPLITS,
                          help="train = train800, val = val200, trainval = both (default: %(default)s)")
    evaluate.add_argument("--batch-size", type=_int_at_least(1, "a batch size"), default=64,
                          help="evaluation batch size, also the throughput batch (default: %(default)s)")
    evaluate.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0,
                          help="torch seed before the backbone is built: the training --seed for a random-init "
                          "backbone (default: %(default)s)")
    evaluate.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=None,
                          help="torch intra-op threads (default: torch's setting)")
    evaluate.add_argument("--backend", default=None, choices=BACKENDS,
                          help="FPET kernel backend (default: the one stored in the checkpoint)")
    evaluate.add_argument("--throughput-runs", type=_int_at_least(0, "a run count"), default=5,
                          help="timed runs of the eval throughput, median reported; 0 skips it (default: %(default)s)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    evaluate.set_defaults(func=run_eval)


def _add_export_parser(commands) -> None:
    """The `fpet export` subcommand."""
    from .models import MODEL_HELP

    export = commands.add_parser(
        "export",
        one_line_errors=True,
        help="export a PET checkpoint's model to ONNX (LoRA folded, the FPET merge as plain ONNX ops), checked in "
        "onnxruntime",
        description="Build the model of --pet-checkpoint as `fpet eval` does (--model, --checkpoint, --seed), export "
        "it in eval mode with torch's dynamo exporter to --onnx (a dynamic batch dimension unless --static-batch; "
        "LoRA folded into qkv unless --no-fold; the FPET merge as MatMul / ArgMax / ScatterElements-add / Div) and "
        "check that onnxruntime gives PyTorch's outputs within --atol + --rtol * |output| at batches 1 and 3 (at "
        "--batch-size with --static-batch). "
        "--compare also exports the model without FPET to OUT.unmerged.onnx and times both in onnxruntime.",
    )
    export.add_argument("--pet-checkpoint", required=True, metavar="PATH",
                        help="pet.safetensors written by `fpet train`")
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument("--model", default="pocket-vit", help=f"backbone: {MODEL_HELP} (default: %(default)s)")
    export.add_argument("--checkpoint", default=None, metavar="PATH", help="local timm weights for a timm --model")
    export.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0,
                        help="torch seed before the backbone is built, as for `fpet eval` (default: %(default)s)")
    export.add_argument("--batch-size", type=_int_at_least(1, "a batch size"), default=2,
                        help="batch of the traced example (>= 2 for a dynamic batch) (default: %(default)s)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch dimension to --batch-size")
    export.add_argument("--opset", type=_int_at_least(18, "an ONNX opset"), default=18,
                        help="ONNX opset (default: %(default)s)")
    export.add_argument("--no-fold", action="store_true", help="keep LoRA as a branch instead of folding it")
    export.add_argument("--no-check", action="store_true", help="do not run the export in onnxruntime")
    tolerance = _float_in(0.0, None, "a finite tolerance >= 0")
    export.add_argument("--atol", type=tolerance, default=1e-4,
                        help="absolute tolerance of the check (default: %(default)s)")
    export.add_argument("--rtol", type=tolerance, default=1e-4,
                        help="relative tolerance of the check (default: %(default)s)")
    export.add_argument("--compare", action="store_true",
                        help="also export the model without FPET and time both in onnxruntime")
    export.add_argument("--time-batch", type=_int_at_least(1, "a batch size"), default=16,
                        help="batch of the --compare timing (default: %(default)s)")
    export.add_argument("--runs", type=_int_at_least(1, "a run count"), default=20,
                        help="timed runs per model for --compare, median reported (default: %(default)s)")
    export.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=None,
                        help="onnxruntime intra-op threads for --compare (default: onnxruntime's)")
    export.add_argument("--json", action="store_true", help="print the result as one JSON object")
    export.set_defaults(func=run_export)


def _add_data_parser(commands) -> None:
    """The `fpet data` subcommand."""
    data = commands.add_parser(
        "data",
        one_line_errors=True,
        help="list the pocket-VTAB tasks or generate them into the cache",
        description="--list prints the pocket-VTAB tasks (name, VTAB group, classes, description); --generate TASK "
        "or all writes tasks into the cache (--root, else $FPET_DATA_DIR, else ~/.cache/fpet_kernels/pocket_vtab) "
        "and prints each task's folder; a task already generated with the same seed and sizes is left as it is.",
    )
    what = data.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the table of pocket-VTAB tasks")
    what.add_argument("--generate", metavar="TASK", help="generate a pocket-VTAB task, or all of them")
    data.add_argument("--root", default=None, metavar="DIR", help="cache folder (default: $FPET_DATA_DIR or "
                      "~/.cache/fpet_kernels/pocket_vtab)")
    data.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0,
                      help="generation seed (default: %(default)s; train and eval read seed 0)")
    data.add_argument("--sizes", type=_sizes, default=None, metavar="TRAIN,VAL,TEST",
                      help="image counts of train800, val200, test (default: 800,200,500; train and eval read the "
                      "default)")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")
    data.set_defaults(func=run_data)


class _CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``one_line_errors=True`` parsers (``fpet`` and every command) report a usage mistake
    as the single line ``fpet <command>: error: ...`` (exit status 2), without the usage text; ``hint`` is appended
    to that line."""

    def __init__(self, *args, one_line_errors: bool = False, hint: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.one_line_errors = one_line_errors
        self.hint = hint

    def error(self, message: str):
        if not self.one_line_errors:
            super().error(message)
        self.exit(2, f"{self.prog}: error: {_one_line(message)}{self.hint}\n")


def version_line() -> str:
    """``fpet <version> (torch <version>, timm <version>)``: what ``fpet --version`` prints."""
    from importlib import metadata

    from .version import __version__

    try:
        timm_version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        timm_version = "not installed"
    return f"fpet {__version__} (torch {torch.__version__}, timm {timm_version})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_line` and exit 0 (computed only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_line())
        parser.exit(0)


EPILOG = (
    "Exit status: 0 on success, 2 for a usage mistake (one line 'fpet <command>: error: ...' on stderr), 1 for a "
    "run that failed (also one line; gpu-report: problems found), 130 when interrupted. Set FPET_DEBUG=1 to get "
    "the Python traceback of an error instead of the one line."
)


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandParser(prog="fpet", description="FPET token merging and PET for timm ViTs.", epilog=EPILOG,
                            one_line_errors=True, hint=" (fpet --help lists the commands)")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the fpet, torch and timm versions and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    demo = commands.add_parser(
        "demo",
        one_line_errors=True,
        help="fine-tune LoRA and FPET+LoRA on the shipped pocket ViT and compare accuracy, GFLOPs, tokens per block "
        "and CPU eval throughput (or, with a timm --model, a timing-only comparison)",
        description="The main demo (default --model pocket-vit): fine-tune LoRA and FPET+LoRA on the shipped "
        "pretrained pocket ViT on one pocket-VTAB task (generated on first use; the engine of `fpet train`, trained on "
        "train800val200, scored on test), then compare them with the plain backbone: test accuracy, trainable "
        "parameters, tokens per block, GFLOPs per image (FlopCounterMode) and eval throughput on this CPU, models "
        "alternated. With a timm VisionTransformer name as --model (random init unless --checkpoint), or "
        "--timing-only, nothing is trained: backbone, LoRA and FPET+LoRA are only timed. Nothing is downloaded.",
    )
    demo.add_argument("--model", default="pocket-vit",
                      help="pocket-vit (default: fine-tune) or a timm VisionTransformer name (timing only)")
    demo.add_argument("--task", default="digits", help="pocket-VTAB task of the fine-tuning demo (default: digits; "
                                                       "`fpet data --list` shows them)")
    demo.add_argument("--epochs", type=_int_at_least(1, "an epoch count"), default=DEMO_EPOCHS,
                      help="fine-tuning epochs per method (default: %(default)s)")
    demo.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0, help="training seed (default: 0)")
    demo.add_argument("--out", default=None, help="keep the two runs (config, log, PET checkpoint) in this folder "
                                                 "(default: a temporary folder)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--timing-only", action="store_true",
                      help="skip fine-tuning: time the untrained models only (implied by a timm --model)")
    demo.add_argument("--checkpoint", default=None, help="timing only: local timm checkpoint (.pth/.safetensors)")
    demo.add_argument("--num-classes", type=_int_at_least(0, "a class count"), default=1000,
                      help="timing only: classifier size (a --checkpoint head of another size is dropped)")
    demo.add_argument("--img-size", type=_img_size, default=None,
                      help="timing only: input size, SIZE or HxW (default: 224, 64 for pocket-vit)")
    demo.add_argument("--layer", type=_int_at_least(0, "a block index"), default=None,
                      help="merge block (default depth // 2)")
    demo.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend for the merge")
    demo.add_argument("--batch-size", type=_int_at_least(1, "a batch size"), default=None,
                      help="training and timing batch (default: 64 when fine-tuning, 16 timing only)")
    demo.add_argument("--runs", type=_int_at_least(1, "a run count"), default=None,
                      help="timed rounds, the median is reported (default: 10 when fine-tuning, 5 timing only)")
    demo.add_argument("--warmup", type=_int_at_least(0, "a round count"), default=2,
                      help="untimed rounds first (default: %(default)s)")
    demo.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=2,
                      help="torch intra-op threads for training and timing (default: %(default)s)")
    demo.set_defaults(func=run_demo)

    bench = commands.add_parser(
        "bench",
        help="model-level benchmark: backbone, LoRA, AdaptFormer, FPET+LoRA, FPET+AdaptFormer, ToMe at three r and "
        "the free-halving ceiling; throughput, latency, GFLOPs, parameters, training step time and memory",
        description="Benchmark timm ViTs (random init, nothing is downloaded) on this CPU: every variant timed "
        "alternately in one process (eval throughput: median and min-max over --rounds; batch-1 latency p50/p90), "
        "GFLOPs per image (attention included), parameters total/trainable, the training step (forward, backward, "
        "AdamW) of the PET variants and its peak memory (each in a fresh process: peak RSS during one step, "
        "VmHWM). ToMe's r: the one matching FPET+LoRA's GFLOPs and two more, unless --tome-r. Writes bench.md, "
        "bench.json and PNG plots in --out.",
        one_line_errors=True,
    )
    bench.add_argument("--models", default=BENCH_MODELS, help="comma-separated timm ViT names (default: %(default)s)")
    bench.add_argument("--batch-size", type=_int_at_least(1, "a batch size"), default=16,
                       help="eval batch (default: %(default)s)")
    bench.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=2,
                       help="torch intra-op threads (default: %(default)s)")
    bench.add_argument("--rounds", type=_int_at_least(1, "a round count"), default=11,
                       help="timed eval rounds (default: %(default)s)")
    bench.add_argument("--warmup", type=_int_at_least(0, "a round count"), default=2,
                       help="untimed rounds first (default: %(default)s)")
    bench.add_argument("--latency-rounds", type=_int_at_least(1, "a round count"), default=21,
                       help="timed batch-1 rounds (default: %(default)s)")
    bench.add_argument("--train-batch", type=_int_at_least(1, "a batch size"), default=32,
                       help="training-step batch (default: %(default)s)")
    bench.add_argument("--train-rounds", type=_int_at_least(1, "a round count"), default=5,
                       help="timed training steps per variant (default: %(default)s)")
    bench.add_argument("--img-size", type=_int_at_least(1, "an image side in pixels"), default=None,
                       help="input side (default: the model's)")
    bench.add_argument("--tome-r", type=_int_list, default=None,
                       help="ToMe tokens merged per block, comma-separated (default: matched to FPET's GFLOPs, and "
                            "half and 1.5x that)")
    bench.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend for the merge")
    bench.add_argument("--no-train", action="store_true", help="skip the training-step time and memory")
    bench.add_argument("--unfolded-lora", action="store_true",
                       help="time the LoRA variants unfolded (as trained) instead of with LoRA folded into qkv (as "
                       "deployed)")
    bench.add_argument("--no-plots", action="store_true", help="no PNG plots")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--out", default="bench_results", help="output folder (default: %(default)s)")
    bench.set_defaults(func=run_bench)

    report = commands.add_parser(
        "gpu-report",
        one_line_errors=True,
        help="compile every Triton kernel for sm_80/sm_90 and read the CUDA kernels of the built extension (no GPU); "
        "check registers, spills, shared memory and tensor-core use",
        description="Compile every Triton kernel of the package (every autotune config and dtype, at the signatures "
        "the ops launch them with), read every CUDA C++ kernel of the built extension fpet_kernels._C (the cubins "
        "embedded in it, for the arch list of fpet_kernels/cuda_archs.txt) with cuobjdump, and print registers, stack "
        "(spill) bytes, shared memory, an occupancy estimate and tensor-core use. No GPU, CUDA toolkit or source tree "
        "is needed. --roofline prints the bandwidth/FLOP model of each op instead.",
    )
    report.add_argument("--triton-archs", type=_archs, default=None,
                        help="compute capabilities for Triton (default: 80,90)")
    report.add_argument("--cuda-archs", type=_archs, default=None,
                        help="for the CUDA C++ kernels of the built extension (default: fpet_kernels/cuda_archs.txt); "
                        "an arch the extension was not built for is a problem")
    report.add_argument("--first-config", action="store_true", help="only the first autotune config (faster)")
    report.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    report.add_argument("--dtypes", type=_dtypes, default=None,
                        help="only these dtypes, e.g. bf16,fp16 (default: fp32, bf16, fp16; CUDA C++ also fp64)")
    report.add_argument("--jobs", type=_int_at_least(1, "a process count"), default=None,
                        help="parallel compile processes (default: CPU count)")
    report.add_argument("--roofline", action="store_true",
                        help="print the roofline model of each op at ViT-B/16 shapes (a model, not a measurement)")
    report.add_argument("--json", action="store_true",
                        help="print the report (rows, kernels, notes, problems) or the roofline rows as JSON")
    report.add_argument("--launcher", default=None,
                        help="module:function whose Triton kernel launches are compiled (default: every op of the "
                        "triton backend, forward and backward)")
    report.set_defaults(func=run_gpu_report)
    _add_train_parser(commands)
    _add_skip_parser(commands)
    _add_eval_parser(commands)
    _add_export_parser(commands)
    _add_data_parser(commands)
    _add_visualize_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fpet`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Usage mistakes are one line on stderr: argparse's (raises SystemExit(2)) and the commands' own checks (return
    2). Any other ValueError, TypeError or OSError out of a command (a run that failed, e.g. an unreadable file) is
    printed as the one line ``fpet <command>: error: <message>`` and returns 1 (a ConfigError: 2, naming its flag);
    Ctrl-C returns 130. With FPET_DEBUG=1 these are raised with their traceback instead. Other exceptions (bugs)
    always propagate with their traceback.
    """
    args = build_parser().parse_args(argv)
    prog = f"fpet {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as error:
        train = sys.modules.get(f"{__package__}.train")  # loaded if a ConfigError can have been raised
        if train is not None and isinstance(error, train.ConfigError):
            return _config_error(prog, error)
        if _debug():
            raise
        message = _one_line(error) or type(error).__name__
        print(f"{prog}: error: {message} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
