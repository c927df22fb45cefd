"""The ``fpet`` command (also ``python -m fpet_kernels``)."""
from __future__ import annotations

import argparse
import copy
import sys
from typing import List, Optional, Sequence

import torch

from .backends import BACKENDS, resolve_backend
from .pet import add_pet
from .tools import benchmark
from .vit_patch import apply_fpet, get_fpet_patch


def _format_tokens(counts: List[int]) -> str:
    """``[197]*6 + [99]*6`` -> ``197x6, 99x6``."""
    runs: List[List[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count}x{repeat}" for count, repeat in runs)


def _build_backbone(args: argparse.Namespace) -> torch.nn.Module:
    import timm
    from timm.models import load_checkpoint

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, strict=True)
    return model.eval()


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    backbone = _build_backbone(args)
    lora = add_pet(copy.deepcopy(backbone), "lora")
    fpet_lora = apply_fpet(add_pet(copy.deepcopy(backbone), "lora"), args.layer, backend=args.backend)
    models = {"backbone": backbone, "LoRA": lora, "FPET+LoRA": fpet_lora}
    images = torch.randn(args.batch_size, 3, args.img_size[0], args.img_size[1])
    weights = "random init" if not args.checkpoint else args.checkpoint
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


def run_gpu_report(args: argparse.Namespace) -> int:
    """Compile every Triton kernel for real GPU targets and read the CUDA C++ kernels of the built extension (no
    GPU needed); print the resource table, or the roofline model with --roofline. Exit status 1 when the check finds
    a problem (spills, shared memory, tensor cores, a kernel never launched, a CUDA arch missing from the build)."""
    from .tools import gpu_report  # a developer tool: imported only when this command runs

    return gpu_report.main(args)


def _archs(text: str) -> List[int]:
    archs = [int(a) for a in text.replace(";", ",").split(",") if a.strip()]
    if not archs:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 80,90, got {text!r}")
    return archs


def _img_size(text: str) -> List[int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpet", description="FPET token merging and PET for timm ViTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="compare backbone, LoRA and FPET+LoRA: tokens per block, GFLOPs and CPU eval throughput",
        description="Build a timm ViT (random init unless --checkpoint), add LoRA, and compare the plain backbone, "
        "LoRA and FPET+LoRA: tokens per block, GFLOPs per image (FlopCounterMode) and eval throughput on this CPU. "
        "Nothing is downloaded.",
    )
    demo.add_argument("--model", default="vit_small_patch16_224", help="timm VisionTransformer name")
    demo.add_argument("--checkpoint", default=None, help="local timm checkpoint (.pth/.safetensors) to load")
    demo.add_argument("--num-classes", type=int, default=1000, help="classifier size (must match --checkpoint)")
    demo.add_argument("--img-size", type=_img_size, default=[224, 224], help="input size: SIZE or HxW")
    demo.add_argument("--layer", type=int, default=None, help="merge block (default depth // 2)")
    demo.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend for the merge")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--runs", type=int, default=5, help="timed rounds (the median is reported)")
    demo.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    demo.add_argument("--threads", type=int, default=2, help="torch intra-op threads while timing")
    demo.set_defaults(func=run_demo)

    report = commands.add_parser(
        "gpu-report",
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
    report.add_argument("--dtypes", type=lambda text: text.split(","), default=None,
                        help="only these dtypes, e.g. bf16,fp16 (default: fp32, bf16, fp16; CUDA C++ also fp64)")
    report.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    report.add_argument("--roofline", action="store_true",
                        help="print the roofline model of each op at ViT-B/16 shapes (a model, not a measurement)")
    report.add_argument("--json", action="store_true",
                        help="print the report (rows, kernels, notes, problems) or the roofline rows as JSON")
    report.add_argument("--launcher", default=None,
                        help="module:function whose Triton kernel launches are compiled (default: every op of the "
                        "triton backend, forward and backward)")
    report.set_defaults(func=run_gpu_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
