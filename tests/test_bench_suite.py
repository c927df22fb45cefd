"""The kernel benchmark suite (bench/test_bench_ops.py) collects and runs: every case once, untimed
(``--benchmark-disable``), on the smallest shape; and its summary table."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_kernel_suite_runs_untimed():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         os.path.join("bench", "test_bench_ops.py"), "-k", "vit_t16 and 1]"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_summary_table_ratios():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        from test_bench_ops import summary_table
    finally:
        sys.path.pop(0)
    rows = [({"op": "merge_tokens", "mode": "no-grad", "shape": "vit_b16", "batch": 64, "backend": b}, t)
            for b, t in (("reference", 4e-3), ("cpp", 1e-3), ("copy", 5e-4))]
    rows.append(({"op": "merge_tokens", "mode": "forward", "shape": "vit_b16", "batch": 64, "backend": "cpp"}, 2e-3))
    table = summary_table(rows).splitlines()
    assert table[0].startswith("| op | mode | shape | B | reference us | cpp us | ref / cpp | copy floor us")
    assert "| merge_tokens | forward | vit_b16 | 64 | - | 2000.0 | - | - | - |" in table
    assert "| merge_tokens | no-grad | vit_b16 | 64 | 4000.0 | 1000.0 | 4.00x | 500.0 | 2.00x |" in table
