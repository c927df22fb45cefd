"""What `import fpet_kernels` adds to `import torch, timm` (target: at most 0.3 s), and what it must not import.

Each variant runs in a fresh interpreter, alternately, and the median of the runs is reported.

    python bench/bench_import.py [--runs 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_TIMED = (
    "import time; start = time.perf_counter(); import torch, timm{extra}; elapsed = time.perf_counter() - start; "
    "import sys; heavy = [m for m in ('triton', 'fpet_kernels._C', 'fpet_kernels.tools') if m in sys.modules]; "
    "print(elapsed, ','.join(heavy))"
)
_ALONE = "import sys, torch, fpet_kernels; print(','.join(m for m in ('triton', 'timm', 'fpet_kernels._C') if m in sys.modules))"


def timed(extra: str) -> float:
    out = subprocess.run([sys.executable, "-c", _TIMED.format(extra=extra)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base, with_fpet = [], []
    for _ in range(args.runs):
        base.append(timed(""))
        with_fpet.append(timed(", fpet_kernels"))
    b, f = statistics.median(base), statistics.median(with_fpet)
    print(f"import torch, timm:               {b:.3f} s (median of {args.runs} fresh processes)")
    print(f"import torch, timm, fpet_kernels: {f:.3f} s  -> fpet_kernels adds {f - b:+.3f} s")
    alone = subprocess.run([sys.executable, "-c", _ALONE], capture_output=True, text=True, check=True).stdout.strip()
    print(f"import torch, fpet_kernels loads: {alone or 'none of triton, timm, fpet_kernels._C'}")


if __name__ == "__main__":
    main()
