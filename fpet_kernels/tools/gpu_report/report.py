"""The report: every Triton kernel compiled and every CUDA C++ kernel of the built extension read, in one process
pool; and ``fpet gpu-report`` itself (:func:`main`; its options are declared once, in :mod:`fpet_kernels.cli`)."""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .cubin import DEFAULT_BLOCK_THREADS, built_cuda_archs, cuda_rows, embedded_archs, extension_library
from .launches import (PACKAGE_LAUNCHER, compile_triton, defined_kernels, kernel_name, record_launches,
                       triton_compile_unavailable, triton_jobs)
from .roofline import format_roofline, roofline
from .rows import KernelRow, check, format_rows

TRITON_ARCHS = (80, 90)


@dataclasses.dataclass
class Report:
    """``defined_kernels``: the Triton kernels of the package (only for the package's launcher); ``unavailable``:
    builds asked for that do not exist (a CUDA arch the extension was not built for), a problem like those of
    :func:`check`; ``notes``: what was skipped and why."""

    rows: List[KernelRow]
    defined_kernels: List[str]
    launched_kernels: List[str]
    notes: List[str]
    unavailable: List[str] = dataclasses.field(default_factory=list)

    def problems(self) -> List[str]:
        """The verdict on the whole report: :func:`check` on the rows, every defined kernel that no op launches
        (so it was not compiled), and what was asked for but is not there."""
        unlaunched = sorted(set(self.defined_kernels) - set(self.launched_kernels))
        return (check(self.rows) + [f"{name}: defined but never launched by the ops, so not compiled"
                                    for name in unlaunched] + self.unavailable)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def build_report(launcher: Optional[str] = None, triton_archs: Optional[Sequence[int]] = None,
                 cuda_archs: Optional[Sequence[int]] = None, all_configs: bool = True, cuda: bool = True,
                 jobs: Optional[int] = None, dtypes: Optional[Sequence[str]] = None) -> Report:
    """Compile and read every kernel. ``launcher`` (``module:function``, default ``PACKAGE_LAUNCHER``: every op of
    the Triton backend) is run under :func:`record_launches` to find the Triton launches, compiled for
    ``triton_archs`` (default ``TRITON_ARCHS``); the CUDA C++ kernels are read from the built extension for
    ``cuda_archs`` (default: ``fpet_kernels/cuda_archs.txt``, the list the extension is built for). ``dtypes``
    (e.g. ``("bf16",)``) limits the Triton builds and the CUDA C++ rows to those dtypes (kernels without
    floating-point data always stay). Under ``TRITON_INTERPRET=1`` (where ``triton.jit`` makes interpreted
    functions, and launchers take interpreter-only branches) the work runs in a fresh
    ``python -m fpet_kernels gpu-report --json`` process without it."""
    launcher = launcher or PACKAGE_LAUNCHER
    triton_archs = list(triton_archs or TRITON_ARCHS)
    if _interpreting():
        return _report_in_subprocess(launcher, triton_archs, cuda_archs, all_configs, cuda, jobs, dtypes)
    notes: List[str] = []
    unavailable: List[str] = []
    module, function = launcher.split(":")
    with record_launches() as launches:
        getattr(importlib.import_module(module), function)()
    tjobs = triton_jobs(launches, triton_archs, all_configs, dtypes)
    library, cuda_work = _cuda_work(cuda_archs, notes, unavailable) if cuda else (None, [])
    rows: List[KernelRow] = []
    unbounded = set()
    workers = jobs or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        cuda_futures = [pool.submit(cuda_rows, str(library), arch) for arch in cuda_work]  # longest first
        triton_futures = [pool.submit(compile_triton, job) for job in tjobs]
        rows += [f.result() for f in triton_futures]
        for future in cuda_futures:
            arch_rows, arch_unbounded = future.result()
            rows += [row for row in arch_rows if dtypes is None or row.dtype in (*dtypes, "-")]
            unbounded.update(arch_unbounded)
    if unbounded:
        notes.append(f"CUDA C++ kernels without __launch_bounds__ (no EIATTR_MAX_THREADS in the cubin), counted at "
                     f"{DEFAULT_BLOCK_THREADS} threads per block: {', '.join(sorted(unbounded))}")
    rows.sort(key=lambda r: (r.backend != "triton", r.kernel, r.dtype, r.config, r.arch))
    launched = sorted({kernel_name(kernel) for kernel, _, _ in launches})
    defined = defined_kernels() if launcher == PACKAGE_LAUNCHER else []
    return Report(rows, defined, launched, notes, unavailable)


def _cuda_work(cuda_archs: Optional[Sequence[int]], notes: List[str],
               unavailable: List[str]) -> Tuple[Optional[Path], List[int]]:
    """The built extension and which of its archs to read: those of ``cuda_archs`` (default: cuda_archs.txt) that
    it was built for. What is skipped goes to ``notes``, an arch asked for but not built to ``unavailable``."""
    library = extension_library()
    if library is None:
        notes.append("CUDA C++ kernels skipped: the extension fpet_kernels._C is not built")
        return None, []
    built = embedded_archs(library)
    if not built:
        notes.append(f"CUDA C++ kernels skipped: {library} has no CUDA kernels (built without CUDA, e.g. "
                     f"FPET_SKIP_CUDA_BUILD=1)")
        return None, []
    if cuda_archs is None:
        cuda_archs = built_cuda_archs()
        if cuda_archs is None:
            notes.append("fpet_kernels/cuda_archs.txt not found: CUDA C++ kernels read for every arch the extension "
                         "was built for")
            cuda_archs = built
    unavailable += [f"cuda sm_{arch}: not in the built extension {library} (built for "
                    f"{', '.join(f'sm_{a}' for a in built)})" for arch in cuda_archs if arch not in built]
    return library, [arch for arch in cuda_archs if arch in built]


def _report_in_subprocess(launcher, triton_archs, cuda_archs, all_configs, cuda, jobs, dtypes) -> Report:
    """:func:`build_report` in ``python -m fpet_kernels gpu-report --json`` without TRITON_INTERPRET."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-m", "fpet_kernels", "gpu-report", "--json", "--launcher", launcher,
               "--triton-archs", ",".join(map(str, triton_archs))]
    if cuda_archs is not None:
        command += ["--cuda-archs", ",".join(map(str, cuda_archs))]
    if not all_configs:
        command.append("--first-config")
    if not cuda:
        command.append("--no-cuda")
    if jobs:
        command += ["--jobs", str(jobs)]
    if dtypes:
        command += ["--dtypes", ",".join(dtypes)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    try:  # exit status 1 is a report with problems
        data = json.loads(result.stdout) if result.returncode in (0, 1) else None
    except json.JSONDecodeError:
        data = None
    if data is None:
        raise RuntimeError(f"{' '.join(command)} failed (exit status {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    data.pop("problems")  # Report.problems() again
    data["rows"] = [KernelRow(**row) for row in data["rows"]]
    return Report(**data)


def main(args: argparse.Namespace) -> int:
    """``fpet gpu-report``: print the resource table, the notes and the problems (or with ``--json`` the report as
    JSON; with ``--roofline`` the roofline model instead). Exit status 1 when :meth:`Report.problems` finds one."""
    if args.roofline:
        model = roofline()
        print(json.dumps([dataclasses.asdict(r) for r in model]) if args.json else format_roofline(model))
        return 0
    reason = triton_compile_unavailable()
    if reason is not None:
        print(f"fpet gpu-report: {reason}", file=sys.stderr)
        return 2
    report = build_report(args.launcher, args.triton_archs, args.cuda_archs, not args.first_config,
                          not args.no_cuda, args.jobs, args.dtypes)
    problems = report.problems()
    if args.json:
        json.dump(dict(dataclasses.asdict(report), problems=problems), sys.stdout)
        return 1 if problems else 0
    print(format_rows(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    print(f"\n{len(report.rows)} kernel builds; {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0
