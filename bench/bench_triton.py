"""GPU benchmark of the FPET ops: triton vs cuda vs reference, per op and for merge_tokens forward and
forward+backward, over batch sizes, at ViT-B/16 and ViT-L/16 (224 px) shapes. Uses triton.testing.do_bench
(median of repeated timed runs after warm-up, CUDA events).

    python bench/bench_triton.py [--dtype bfloat16] [--batches 1 8 32 64 128 256] [--out bench/results]

Prints a table (milliseconds) and saves ``<out>/bench_triton.csv`` and, when matplotlib is installed, a plot
``<out>/bench_triton.png``. Needs a CUDA device; on a CPU-only machine it says so and exits.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Callable, Dict, List

import torch

MODELS = {  # name: (grid H, grid W, prefix tokens, channels C, head dim Dh)
    "vit_b16": (14, 14, 1, 768, 64),
    "vit_l16": (16, 16, 1, 1024, 64),
}
OPS = ("checkerboard_similarity", "ste_match", "scatter_mean_merge", "merge_tokens fwd", "merge_tokens fwd+bwd")


def backends() -> Dict[str, object]:
    """Implementations to time, from the backend registry: triton, cuda, reference (those available here)."""
    from fpet_kernels.backends import get_backend

    found = {}
    for name in ("triton", "cuda", "reference"):
        backend = get_backend(name)
        if backend.available:
            found[name] = backend.implementation()
        else:
            print(f"{name} backend skipped: {backend.unavailable_reason()}")
    return found


def op_closures(impl, model: str, batch: int, dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    height, width, prefix, channels, head_dim = MODELS[model]
    tokens = prefix + height * width
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, tokens, channels, device="cuda", dtype=dtype, generator=gen)
    metric = torch.randn(batch, tokens, head_dim, device="cuda", dtype=dtype, generator=gen)
    size = torch.rand(batch, tokens, device="cuda", generator=gen) + 0.5
    grid = (height, width)
    scores = impl.checkerboard_similarity(metric, grid, prefix)
    index = scores.argmax(-1)
    kwargs = dict(grid_size=grid, num_prefix_tokens=prefix)
    x_grad, metric_grad, size_grad = (t.detach().clone().requires_grad_() for t in (x, metric, size))

    def forward_backward():
        merged, merged_size = impl.merge_tokens(x_grad, metric_grad, size_grad, **kwargs)
        torch.autograd.backward((merged, merged_size), (torch.ones_like(merged), torch.ones_like(merged_size)))

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    return {
        "checkerboard_similarity": no_grad(lambda: impl.checkerboard_similarity(metric, grid, prefix)),
        "ste_match": no_grad(lambda: impl.ste_match(scores)),
        "scatter_mean_merge": no_grad(lambda: impl.scatter_mean_merge(x, size, index, grid, prefix)),
        "merge_tokens fwd": no_grad(lambda: impl.merge_tokens(x, metric, size, **kwargs)),
        "merge_tokens fwd+bwd": forward_backward,
    }


def run(batches: List[int], dtype: torch.dtype) -> List[dict]:
    import triton.testing

    rows = []
    impls = backends()
    for model in MODELS:
        for batch in batches:
            for backend, impl in impls.items():
                for op, fn in op_closures(impl, model, batch, dtype).items():
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    rows.append(dict(model=model, batch=batch, op=op, backend=backend, ms=ms))
                    print(f"{model:8s} B={batch:<4d} {op:24s} {backend:10s} {ms:9.4f} ms", flush=True)
    return rows


def print_table(rows: List[dict]) -> None:
    names = list(dict.fromkeys(r["backend"] for r in rows))
    print(f"\n{'model':8s} {'batch':>5s} {'op':24s} " + " ".join(f"{n:>11s}" for n in names)
          + "  (ms, median; speedup of triton vs reference)")
    keyed = {(r["model"], r["batch"], r["op"], r["backend"]): r["ms"] for r in rows}
    for model, batch, op in dict.fromkeys((r["model"], r["batch"], r["op"]) for r in rows):
        times = [keyed.get((model, batch, op, n)) for n in names]
        cells = " ".join(f"{t:11.4f}" if t is not None else f"{'-':>11s}" for t in times)
        speedup = ""
        if "triton" in names and "reference" in names:
            speedup = f"  x{keyed[(model, batch, op, 'reference')] / keyed[(model, batch, op, 'triton')]:.1f}"
        print(f"{model:8s} {batch:5d} {op:24s} {cells}{speedup}")


def save(rows: List[dict], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_triton.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib); the CSV is saved")
        return
    fig, axes = plt.subplots(len(MODELS), len(OPS), figsize=(4 * len(OPS), 3.5 * len(MODELS)), squeeze=False)
    for i, model in enumerate(MODELS):
        for k, op in enumerate(OPS):
            ax = axes[i][k]
            for backend in dict.fromkeys(r["backend"] for r in rows):
                points = [(r["batch"], r["ms"]) for r in rows
                          if (r["model"], r["op"], r["backend"]) == (model, op, backend)]
                ax.plot(*zip(*points), marker="o", label=backend)
            ax.set(title=f"{model}: {op}", xlabel="batch", ylabel="ms", xscale="log", yscale="log")
            ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "bench_triton.png")
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_triton.py times GPU kernels and needs a CUDA device; none is available here "
                 "(for CPU timings see bench/bench_ops_cpu.py).")
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, torch {torch.__version__}")
    rows = run(args.batches, getattr(torch, args.dtype))
    print_table(rows)
    save(rows, args.out)


if __name__ == "__main__":
    main()
