"""FPET in deployment: export a timm ViT with LoRA, with and without FPET, to ONNX and time both in onnxruntime.

The two models are the same (one random-init backbone, one LoRA, LoRA folded into qkv by the export); the FPET one
merges at block depth // 2. Both exports are checked in onnxruntime against PyTorch (fpet_kernels.export), their
matrix-multiply GFLOPs counted from the graphs, and both timed alternately in one process at each batch size.
Writes ``OUT/onnx.json`` and ``OUT/onnx.md``; ``--checkpoint`` loads real timm weights from a local file.

    python python/onnx_speed.py --model vit_small_patch16_224 --threads 1 --out docs/results
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import torch

import fpet_kernels as fk
from fpet_kernels.export import export_onnx, time_onnx
from fpet_kernels.models import create_model
from fpet_kernels.tools.benchmark import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT name (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None, help="local timm weights for --model")
    parser.add_argument("--batches", default="16,1", help="batch sizes to time (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and batch (default: %(default)s)")
    parser.add_argument("--out", default="docs/results", help="folder for onnx.json / onnx.md (default: %(default)s)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    start = time.time()
    torch.manual_seed(0)
    lora = fk.add_pet(create_model(args.model, 1000, checkpoint=args.checkpoint), "lora")
    with torch.no_grad():  # a trained-looking LoRA (B starts at zero) and refinement adapter
        for name, parameter in lora.named_parameters():
            if ".lora_b_" in name:
                parameter.normal_(0, 0.02)
    fpet = fk.apply_fpet(copy.deepcopy(lora)).eval()
    lora.eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        exports = {name: export_onnx(model, os.path.join(folder, f"{name}.onnx"))
                   for name, model in (("LoRA", lora), ("FPET+LoRA", fpet))}
        side = exports["LoRA"].input_shape[2:]
        for batch in batches:
            images = torch.randn(batch, 3, *side, generator=torch.Generator().manual_seed(batch))
            plain, merged = time_onnx([exports["LoRA"].path, exports["FPET+LoRA"].path], images, runs=args.runs,
                                      threads=args.threads)
            rows.append({"batch": batch, "LoRA": plain, "FPET+LoRA": merged,
                         "speedup": plain["median_ms"] / merged["median_ms"]})
    report = {
        "model": args.model, "checkpoint": args.checkpoint, "threads": args.threads, "runs": args.runs,
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "python": platform.python_version(),
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "exports": {name: e.as_dict() for name, e in exports.items()}, "timing": rows,
        "seconds": round(time.time() - start, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "onnx.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")
    with open(os.path.join(args.out, "onnx.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(report) + "\n")
    print(markdown(report))


def markdown(report) -> str:
    exports = report["exports"]
    lines = [
        f"{report['model']} in onnxruntime {report['onnxruntime']} ({report['cpu']}, {report['threads']} thread(s), "
        f"{report['runs']} alternating runs, {report['date']}); LoRA folded into qkv in both exports; max |onnx - "
        f"torch| {exports['LoRA']['max_abs_diff']:.1e} (LoRA), {exports['FPET+LoRA']['max_abs_diff']:.1e} "
        f"(FPET+LoRA) at batches 1 and 3",
        "",
        "| batch | LoRA GFLOPs/img | FPET+LoRA GFLOPs/img | LoRA ms (p10-p90) | FPET+LoRA ms (p10-p90) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["timing"]:
        plain, merged = row["LoRA"], row["FPET+LoRA"]
        lines.append(
            f"| {row['batch']} | {exports['LoRA']['gflops']:.2f} | {exports['FPET+LoRA']['gflops']:.2f} | "
            f"{plain['median_ms']:.1f} ({plain['p10_ms']:.1f}-{plain['p90_ms']:.1f}) | {merged['median_ms']:.1f} "
            f"({merged['p10_ms']:.1f}-{merged['p90_ms']:.1f}) | {row['speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
