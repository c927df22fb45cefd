"""pytest hooks of the kernel benchmarks (bench/test_bench_ops.py): after the run, a summary of every case's median
as a ratio to the reference's, and of the no-grad cases to the streaming-copy floor measured in the same run."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from test_bench_ops import summary_table  # the suite's own module, next to this file

    rows = [(bench.extra_info, bench.stats.median) for bench in session.benchmarks if bench.stats and bench.extra_info]
    table = summary_table(rows)
    if table:
        terminalreporter.write_sep("=", "fpet kernel benchmarks: ratios in this run")
        terminalreporter.write_line(table)
