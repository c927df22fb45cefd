"""GPU readiness without a GPU: compile every kernel for real NVIDIA targets and read what the compiler produced.

``fpet gpu-report`` builds (no GPU, no driver needed):

* every Triton kernel of :mod:`fpet_kernels.triton`, for every autotune config, at the exact signatures the
  launchers use: the public ops run on small CPU tensors (ViT-B/16 shapes) with every kernel launch intercepted
  before it runs (:func:`record_launches`), and each recorded launch is bound by Triton's own specialisation code
  (argument types, ``tt.divisibility``, constexprs), so the report cannot drift from the launch sites;
* every ``__global__`` kernel of ``csrc/cuda/*.cu``, with nvcc for the arch list of ``setup.py``.

Each cubin is read with ``cuobjdump`` (shipped with Triton): registers per thread, stack bytes (spills), shared
memory, and the SASS (HMMA = tensor cores on sm_80, HGMMA = wgmma on sm_90). :func:`check` turns the rows into the
CI verdict. :func:`roofline` is a bandwidth/FLOP *model* of each op at ViT-B/16 shapes, not a measurement.

Occupancy estimate (resident warps per SM, one kernel alone on the SM), with ``L`` the arch's limits in
``ARCH_LIMITS``, ``w`` warps per block, ``r`` registers per thread, ``s`` shared bytes per block::

    regs_per_warp   = ceil(r * 32 / 256) * 256                  (allocation granularity: 256 registers per warp)
    blocks_by_regs  = floor(floor(L.registers / regs_per_warp) / w)
    blocks_by_smem  = floor(L.shared_per_sm / (s + 1024))       (the driver reserves 1 KiB per block; inf if s == 0)
    blocks_by_warps = floor(L.max_warps / w)
    warps           = w * min(blocks_by_regs, blocks_by_smem, blocks_by_warps, L.max_blocks)

and 0 when ``s`` exceeds ``L.shared_per_block`` (the launch would fail).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_ARCHS = (80, 90)
PACKAGE_LAUNCHER = "fpet_kernels.gpu_report:launch_package_ops"


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (CUDA C Programming Guide, compute capabilities table)."""

    max_warps: int
    max_blocks: int
    registers: int
    shared_per_sm: int
    shared_per_block: int


ARCH_LIMITS = {
    80: ArchLimits(max_warps=64, max_blocks=32, registers=65536, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    86: ArchLimits(max_warps=48, max_blocks=16, registers=65536, shared_per_sm=100 * 1024, shared_per_block=99 * 1024),
    89: ArchLimits(max_warps=48, max_blocks=24, registers=65536, shared_per_sm=100 * 1024, shared_per_block=99 * 1024),
    90: ArchLimits(max_warps=64, max_blocks=32, registers=65536, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}


@dataclasses.dataclass
class KernelRow:
    """One compiled kernel: ``backend`` is "triton" or "cuda"; ``dot_16bit`` counts dot products with 16-bit
    operands (Triton ``tt.dot``; unknown = 0 for CUDA C++), ``mma`` the tensor-core instructions in the SASS."""

    backend: str
    kernel: str
    config: str
    dtype: str
    arch: int
    registers: int
    stack_bytes: int
    shared_bytes: int
    warps_per_block: int
    occupancy_warps: int
    dots: int
    dot_16bit: int
    mma: int
    tensor_cores: str
    signature: str = ""


def occupancy_warps(arch: int, registers: int, shared_bytes: int, warps_per_block: int) -> int:
    """Resident warps per SM from registers and shared memory (formula in the module docstring)."""
    limits = ARCH_LIMITS[arch]
    if shared_bytes > limits.shared_per_block:
        return 0
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks_by_regs = (limits.registers // regs_per_warp) // warps_per_block
    blocks_by_smem = limits.shared_per_sm // (shared_bytes + 1024) if shared_bytes else limits.max_blocks
    blocks_by_warps = limits.max_warps // warps_per_block
    return warps_per_block * min(blocks_by_regs, blocks_by_smem, blocks_by_warps, limits.max_blocks)


def check(rows: Iterable[KernelRow]) -> List[str]:
    """The CI verdict: one line per problem (empty = ready). No stack use (spills), shared memory within the arch's
    per-block limit, at least one resident block, and every dot with 16-bit operands on tensor cores."""
    problems = []
    for row in rows:
        name = f"{row.backend} {row.kernel} [{row.config}] {row.dtype} sm_{row.arch}"
        if row.stack_bytes:
            problems.append(f"{name}: {row.stack_bytes} bytes of stack (register spills / local memory)")
        if row.shared_bytes > ARCH_LIMITS[row.arch].shared_per_block:
            problems.append(f"{name}: {row.shared_bytes} bytes of shared memory > "
                            f"{ARCH_LIMITS[row.arch].shared_per_block} per block")
        elif row.occupancy_warps == 0:
            problems.append(f"{name}: not even one block fits on an SM")
        if row.dot_16bit and not row.mma:
            problems.append(f"{name}: {row.dot_16bit} 16-bit dot product(s) but no HMMA/HGMMA in the SASS")
    return problems


# ------------------------------------------------------------------------------------------------ cubin reading
def nvidia_tool(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm`` / ``ptxas`` as shipped in Triton's NVIDIA backend (no toolkit needed)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (install triton, or put a CUDA toolkit's bin/ on PATH)")
    return found


def resource_usage(cubin: Path) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: mangled function name -> {"REG", "STACK", "SHARED", "LOCAL", ...}."""
    text = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                          check=True, capture_output=True, text=True).stdout
    usage: Dict[str, Dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):\s*$", line)
        if match:
            name = match.group(1)
        elif name is not None and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return usage


def sass_counts(cubin: Path) -> Dict[str, Counter]:
    """Per mangled function: counts of HMMA (mma.sync), HGMMA (wgmma), FFMA and local-memory (STL/LDL) opcodes."""
    text = subprocess.run([nvidia_tool("cuobjdump"), "-sass", str(cubin)],
                          check=True, capture_output=True, text=True).stdout
    counts: Dict[str, Counter] = {}
    current: Optional[Counter] = None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = counts.setdefault(match.group(1), Counter())
        elif current is not None:
            opcode = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if opcode:
                current[opcode.group(1)] += 1
    return counts


def tensor_core_label(mma: Counter, dot_kinds: Sequence[str]) -> Tuple[int, str]:
    """-> (number of tensor-core instructions, label). ``dot_kinds``: one entry per dot product of the kernel, e.g.
    "bf16" or "fp32 ieee" (operand type and input precision)."""
    kinds = ", ".join(sorted(set(dot_kinds)))
    hgmma, hmma = mma.get("HGMMA", 0), mma.get("HMMA", 0)
    if hgmma or hmma:
        instructions = f"HGMMA x{hgmma}" if hgmma else f"HMMA x{hmma}"
        return hgmma + hmma, f"yes: {instructions}" + (f" ({kinds} dot)" if kinds else "")
    if dot_kinds:
        return 0, f"no: {kinds} dot on FFMA"
    return 0, "no dot"


# ------------------------------------------------------------------------------------------------ Triton
@contextlib.contextmanager
def record_launches():
    """Within the block, every Triton kernel launch (``kernel[grid](...)``) is recorded as ``(kernel, args,
    kwargs)`` in the yielded list instead of running. The launchers only need the outputs' shapes, which torch
    allocates before the launch, so the ops run to completion (with garbage values) on CPU tensors."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: List[Tuple[Any, tuple, dict]] = []

    def run(self, *args, **kwargs):
        launches.append((self, args, kwargs))

    classes = (Autotuner, JITFunction, InterpretedFunction)
    saved = [cls.__dict__["run"] for cls in classes]
    for cls in classes:
        cls.run = run
    try:
        yield launches
    finally:
        for cls, original in zip(classes, saved):
            cls.run = original


# ViT-B/16 at 224x224 (SPEC section 2 defaults): the shapes the recorded launches specialise for.
VIT_B16 = dict(tokens=197, channels=768, head_dim=64, refine_dim=32, grid=(14, 14), prefix=1)


def launch_package_ops() -> None:
    """Every public Triton op forward and backward, and the no-grad paths, at ViT-B/16 shapes, batch 2, in every
    dtype of the backend (CPU tensors; meant to run under :func:`record_launches`)."""
    import torch

    from . import triton as ops
    from .triton._common import SUPPORTED_DTYPES

    s = VIT_B16
    batch, grid, prefix = 2, s["grid"], s["prefix"]
    num_a = (grid[0] * grid[1] + 1) // 2
    num_b = prefix + grid[0] * grid[1] // 2

    def leaf(*shape, dtype, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    def backward(*outputs):
        sum(out.float().sum() for out in outputs).backward()

    for dtype in SUPPORTED_DTYPES:
        x = leaf(batch, s["tokens"], s["channels"], dtype=dtype)
        metric = leaf(batch, s["tokens"], s["head_dim"], dtype=dtype)
        size = leaf(batch, s["tokens"], dtype=torch.float32)
        w_down = leaf(s["refine_dim"], s["head_dim"], dtype=dtype)
        w_up = leaf(s["head_dim"], s["refine_dim"], dtype=dtype)
        index = torch.randint(0, num_b, (batch, num_a))

        backward(ops.refine_keys(metric, w_down, w_up, 1.0, 0.1, training=True))
        backward(ops.checkerboard_similarity(metric, grid, prefix))
        backward(ops.ste_match(leaf(batch, num_a, num_b, dtype=dtype))[0])
        backward(*ops.scatter_mean_merge(x, size, index, grid, prefix))
        backward(*ops.scatter_mean_merge(x, size, leaf(batch, num_a, num_b, dtype=dtype), grid, prefix))
        backward(*ops.merge_tokens(x, metric, grid_size=grid, num_prefix_tokens=prefix))
        with torch.no_grad():
            ops.refine_keys(metric, w_down, w_up, 1.0, 0.1, training=False)
            ops.merge_tokens(x, metric, size, grid_size=grid, num_prefix_tokens=prefix)


def _jit_function(kernel):
    """The JITFunction (or InterpretedFunction) under any Autotuner / heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def defined_kernels(package: str = "fpet_kernels.triton") -> List[str]:
    """``module:name`` of every @triton.jit function of the package that no other jit function calls (a kernel,
    not a device helper)."""
    import importlib
    import pkgutil

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    root = importlib.import_module(package)
    functions: Dict[str, Any] = {}
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, value in vars(module).items():
            fn = _jit_function(value)
            if isinstance(fn, (JITFunction, InterpretedFunction)) and fn.fn.__module__ == module.__name__:
                functions[f"{module.__name__}:{name}"] = fn.fn
    called = set()
    for fn in functions.values():
        tree = ast.parse(_dedent_source(fn))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                target = _jit_function(fn.__globals__.get(node.func.id))
                if getattr(target, "fn", None) in functions.values():
                    called.add(target.fn)
    return sorted(key for key, fn in functions.items() if fn not in called)


def _dedent_source(fn) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(fn))


@dataclasses.dataclass
class TritonJob:
    """One Triton compile: the kernel by ``module:name`` and what Triton's binder made of a recorded launch."""

    kernel: str
    arch: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]
    config: str


def _kernel_name(kernel) -> str:
    fn = _jit_function(kernel).fn
    return f"{fn.__module__}:{fn.__name__}"


def triton_jobs(launches, archs: Sequence[int], all_configs: bool = True,
                dtypes: Optional[Sequence[str]] = None) -> List[TritonJob]:
    """Bind every recorded launch for every arch and autotune config with Triton's own specialisation (the code
    ``JITFunction.run`` calls), deduplicated; only builds whose :func:`job_dtype` is in ``dtypes`` if given."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jobs: Dict[str, TritonJob] = {}
    for kernel, args, kwargs in launches:
        fn = _jit_function(kernel)
        configs = list(getattr(kernel, "configs", None) or [None])
        if not all_configs:
            configs = configs[:1]
        launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for arch in archs:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            for config in configs:
                call_kwargs = dict(launch_kwargs, **(config.all_kwargs() if config is not None else {}))
                bound, specialization, options = binder(*args, **call_kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, call_kwargs, bound, specialization,
                                                                      options)
                names = list(signature)
                label = " ".join(f"{names[path[0]]}={int(v) if isinstance(v, bool) else v}"
                                 for path, v in constexprs.items() if names[path[0]].isupper())
                label += f" w{options.num_warps} s{options.num_stages}"
                job = TritonJob(_kernel_name(kernel), arch, signature, constexprs, attrs, dict(options.__dict__),
                                label)
                key = json.dumps([job.kernel, arch, signature, repr(constexprs), repr(attrs), repr(options)])
                if dtypes is None or job_dtype(signature) in (*dtypes, "-"):
                    jobs.setdefault(key, job)
    return list(jobs.values())


def _load_kernel(name: str):
    import importlib

    module, attr = name.split(":")
    return _jit_function(getattr(importlib.import_module(module), attr))


def job_dtype(signature: Dict[str, str]) -> str:
    """The dtype a kernel build is reported under: the 16-bit type it touches, else fp32 (scores, sizes and partial
    sums are fp32 whatever the op's dtype), else "-"."""
    types = set(signature.values())
    for dtype in ("bf16", "fp16", "fp32"):
        if f"*{dtype}" in types:
            return dtype
    return "-"


_MLIR_TYPES = {"bf16": "bf16", "f16": "fp16", "f32": "fp32", "f64": "fp64"}


def compile_triton(job: TritonJob) -> KernelRow:
    """Compile one job for its arch and read the cubin (runs in a worker process without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _load_kernel(job.kernel)
    compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                              target=GPUTarget("cuda", job.arch, 32), options=job.options)
    dot_kinds = []
    for line in compiled.asm["ttir"].splitlines():
        if "tt.dot " in line:
            operand = _MLIR_TYPES.get(re.search(r": tensor<[\dx]+x(\w+)>", line).group(1), "?")
            precision = re.search(r"inputPrecision = (\w+)", line)
            dot_kinds.append(f"{operand} {precision.group(1)}" if operand == "fp32" and precision else operand)
    dot_16bit = sum(1 for kind in dot_kinds if kind in ("bf16", "fp16"))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (usage,) = resource_usage(cubin).values()
        (sass,) = sass_counts(cubin).values()
    mma, label = tensor_core_label(sass, dot_kinds)
    shared = compiled.metadata.shared + usage.get("SHARED", 0)
    warps = compiled.metadata.num_warps
    sig = ", ".join(f"{k}: {v}" for k, v in job.signature.items() if v != "constexpr")
    return KernelRow("triton", job.kernel.split(":")[1], job.config, job_dtype(job.signature),
                     job.arch, usage["REG"], usage.get("STACK", 0) + usage.get("LOCAL", 0), shared, warps,
                     occupancy_warps(job.arch, usage["REG"], shared, warps), len(dot_kinds), dot_16bit, mma, label,
                     sig)


# ------------------------------------------------------------------------------------------------ CUDA C++
def setup_cuda_archs() -> List[int]:
    """The default arch list of setup.py (``DEFAULT_CUDA_ARCHS``), read from its source."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets):
            return [int(a) for a in node.value.value.split(";") if a.strip()]
    raise RuntimeError("setup.py has no DEFAULT_CUDA_ARCHS")


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_sources() -> List[Path]:
    return sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))


def _block_threads() -> Dict[str, int]:
    """Threads per block of each kernel, from its launch site: an integer literal, else ``kBlockThreads`` (the cap
    of ``threads_for_channels``, reached at C >= 256)."""
    header = (REPO_ROOT / "csrc" / "cuda" / "cuda_common.cuh").read_text()
    constants = {k: int(v) for k, v in re.findall(r"constexpr int (kWarp|kWarpsPerBlock) = (\d+);", header)}
    default = constants["kWarp"] * constants["kWarpsPerBlock"]
    threads = {}
    for source in cuda_sources():
        text = source.read_text()
        for name, block in re.findall(r"(\w+_kernel)(?:<[^<>]*>)?\s*<<<[^,]+,\s*([^,]+),", text):
            threads[name] = int(block) if block.strip().isdigit() else default
    return threads


_CUDA_DTYPES = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def _demangle(names: Sequence[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def compile_cuda(source: str, arch: int) -> List[KernelRow]:
    """nvcc one ``.cu`` of csrc/cuda to a cubin for ``sm_<arch>`` (the flags setup.py and torch's BuildExtension
    give it) and read every kernel in it."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        includes = [f"-I{p}" for p in include_paths()] + [f"-I{REPO_ROOT / 'csrc'}"]
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-DFPET_WITH_CUDA", "-std=c++20",
                        *COMMON_NVCC_FLAGS, *includes, "-o", str(cubin), source],
                       check=True, capture_output=True, text=True)
        usage = resource_usage(cubin)
        sass = sass_counts(cubin)
    threads = _block_threads()
    rows = []
    for mangled, pretty in zip(usage, _demangle(list(usage))):
        match = re.search(r"(\w+_kernel)(?:<(.*)>)?\(", pretty)
        name, template = (match.group(1), match.group(2) or "") if match else (pretty, "")
        parts = [p.strip() for p in re.split(r",\s*(?![^<>]*>)", template) if p.strip()]
        dtype = _CUDA_DTYPES.get(parts[0], "-") if parts else "-"
        config = ", ".join(p.replace("fpet::", "") for p in parts[1:]) or "-"
        warps = max(1, math.ceil(threads.get(name, 256) / 32))
        regs, shared = usage[mangled]["REG"], usage[mangled].get("SHARED", 0)
        mma, label = tensor_core_label(sass.get(mangled, Counter()), [])
        stack = usage[mangled].get("STACK", 0) + usage[mangled].get("LOCAL", 0)
        rows.append(KernelRow("cuda", name, config, dtype, arch, regs, stack, shared, warps,
                              occupancy_warps(arch, regs, shared, warps), 0, 0, mma,
                              label if mma else "no: scalar code (FFMA), no MMA"))
    return rows


# ------------------------------------------------------------------------------------------------ the report
@dataclasses.dataclass
class Report:
    rows: List[KernelRow]
    defined_kernels: List[str]
    launched_kernels: List[str]
    notes: List[str]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def build_report(launcher: str = PACKAGE_LAUNCHER, triton_archs: Sequence[int] = TRITON_ARCHS,
                 cuda_archs: Optional[Sequence[int]] = None, all_configs: bool = True, cuda: bool = True,
                 jobs: Optional[int] = None, dtypes: Optional[Sequence[str]] = None) -> Report:
    """Compile and read every kernel. ``launcher`` (``module:function``) is run under :func:`record_launches` to
    find the Triton launches; ``cuda_archs`` defaults to setup.py's list; ``dtypes`` (e.g. ``("bf16",)``) limits
    the Triton builds and the CUDA C++ rows to those dtypes (kernels without floating-point data always stay).
    Under ``TRITON_INTERPRET=1`` (where ``triton.jit`` makes interpreted functions, and launchers take
    interpreter-only branches) the work runs in a fresh ``python -m fpet_kernels.gpu_report`` process without it."""
    if _interpreting():
        return _report_in_subprocess(launcher, triton_archs, cuda_archs, all_configs, cuda, jobs, dtypes)
    import importlib

    notes = []
    module, function = launcher.split(":")
    with record_launches() as launches:
        getattr(importlib.import_module(module), function)()
    tjobs = triton_jobs(launches, triton_archs, all_configs, dtypes)
    cuda_work: List[Tuple[str, int]] = []
    if cuda:
        if find_nvcc() is None:
            notes.append("CUDA C++ kernels skipped: nvcc not found")
        elif not cuda_sources():
            notes.append(f"CUDA C++ kernels skipped: no csrc/cuda/*.cu under {REPO_ROOT}")
        else:
            archs = list(cuda_archs) if cuda_archs is not None else setup_cuda_archs()
            cuda_work = [(str(src), arch) for src in cuda_sources() for arch in archs]
    rows: List[KernelRow] = []
    workers = jobs or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        cuda_futures = [pool.submit(compile_cuda, src, arch) for src, arch in cuda_work]  # longest first
        triton_futures = [pool.submit(compile_triton, job) for job in tjobs]
        rows += [f.result() for f in triton_futures]
        for future in cuda_futures:
            rows += [row for row in future.result() if dtypes is None or row.dtype in (*dtypes, "-")]
    rows.sort(key=lambda r: (r.backend != "triton", r.kernel, r.dtype, r.config, r.arch))
    launched = sorted({_kernel_name(kernel) for kernel, _, _ in launches})
    package = module.rsplit(".", 1)[0] if launcher == PACKAGE_LAUNCHER else None
    defined = defined_kernels() if package else []
    return Report(rows, defined, launched, notes)


def _report_in_subprocess(launcher, triton_archs, cuda_archs, all_configs, cuda, jobs, dtypes) -> Report:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-m", "fpet_kernels.gpu_report", "--json", "--launcher", launcher,
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
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    data = json.loads(result.stdout)
    return Report([KernelRow(**row) for row in data["rows"]], data["defined_kernels"], data["launched_kernels"],
                  data["notes"])


def format_rows(rows: Sequence[KernelRow]) -> str:
    """A markdown table of the rows."""
    header = ("| backend | kernel | config | dtype | arch | regs | stack B | smem B | warps/blk | warps/SM "
              "| tensor cores |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.backend} | {r.kernel} | {r.config} | {r.dtype} | sm_{r.arch} | {r.registers} "
                     f"| {r.stack_bytes} | {r.shared_bytes} | {r.warps_per_block} | {r.occupancy_warps} "
                     f"| {r.tensor_cores} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ roofline model
H100_SXM = dict(name="H100 SXM", bandwidth=3.35e12, tensor_flops=989e12, fp32_flops=67e12)


@dataclasses.dataclass
class RooflineRow:
    """One op at one batch size. ``bytes``: minimum DRAM traffic (each input read once, each output written
    once); FLOPs split into tensor-core FLOPs (16-bit GEMMs) and CUDA-core fp32 FLOPs; ``ref_bytes`` and
    ``ref_launches``: the pure-PyTorch reference's (:func:`reference_traffic`); times in microseconds."""

    op: str
    batch: int
    bytes: int
    tensor_flops: int
    fp32_flops: int
    bound_us: float
    ref_bytes: int
    ref_launches: int
    ref_bound_us: float


def _bound_us(nbytes: float, tensor_flops: float, fp32_flops: float, gpu=H100_SXM) -> float:
    """max(bytes / bandwidth, tensor FLOPs / tensor peak, fp32 FLOPs / fp32 peak), in microseconds."""
    return 1e6 * max(nbytes / gpu["bandwidth"], tensor_flops / gpu["tensor_flops"], fp32_flops / gpu["fp32_flops"])


def minimum_traffic(op: str, batch: int, element: int = 2) -> Tuple[int, int, int]:
    """(bytes, tensor-core FLOPs, fp32 FLOPs) an ideal fused kernel of ``op`` needs at ViT-B/16 shapes, ``element``
    bytes per x/metric element; sizes, scores and thresholds float32, indices int64 (as the Triton backend)."""
    s = VIT_B16
    n, c, dh, d = s["tokens"], s["channels"], s["head_dim"], s["refine_dim"]
    cells = s["grid"][0] * s["grid"][1]
    na, nb = (cells + 1) // 2, s["prefix"] + cells // 2
    x, merged, metric = batch * n * c * element, batch * nb * c * element, batch * n * dh * element
    scores = batch * na * nb * 4
    match_state = batch * na * (8 + 4 + 4)  # index, top2, threshold: what the fused backward keeps
    sim_flops = 2 * batch * na * nb * dh + 3 * batch * n * dh  # cosine GEMM + norms
    merge_flops = 2 * batch * n * c + batch * nb * c  # size-weighted sums + division
    if op == "refine_keys":
        return 2 * metric + 2 * d * dh * element, 0, 4 * batch * n * dh * d + 3 * batch * n * d
    if op == "checkerboard_similarity":
        return metric + scores, 0, sim_flops
    if op == "ste_match":
        return scores + scores + batch * na * 8, 0, 6 * batch * na * nb
    if op == "scatter_mean_merge":
        return x + batch * na * 8 + merged + batch * nb * 4, 0, merge_flops
    if op in ("merge_tokens fwd", "merge_tokens no-grad"):
        state = match_state if op == "merge_tokens fwd" else 0
        return x + metric + merged + batch * nb * 4 + state, 0, sim_flops + merge_flops
    if op == "merge_tokens fwd+bwd":
        forward, _, forward_flops = minimum_traffic("merge_tokens fwd", batch, element)
        # backward reads g, h, x, metric and the match state; writes dL/dx and dL/dmetric.
        backward = merged + batch * nb * 4 + x + metric + match_state + x + metric
        gemm = 2 * batch * na * nb * c  # X_A G^T: 16-bit operands on tensor cores
        backward_flops = 3 * sim_flops + 4 * batch * n * c + 12 * batch * na * nb
        tensor = gemm if element == 2 else 0
        return forward + backward, tensor, forward_flops + backward_flops + (gemm - tensor)
    raise ValueError(f"unknown op {op!r}")


ROOFLINE_OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "merge_tokens fwd",
                "merge_tokens fwd+bwd", "merge_tokens no-grad")


@dataclasses.dataclass
class _Call:
    """One dispatcher call recorded while the reference ran: its schema, its tensor arguments (``inputs``, schema
    order, tensor lists flattened) and results (``outputs``) as ``(tensor id, storage id, bytes, dims)`` with
    ``bytes = numel * element size``, and the calls it made (``calls``)."""

    schema: str
    inputs: List[Tuple[int, int, int, int]]
    outputs: List[Tuple[int, int, int, int]]
    calls: List["_Call"] = dataclasses.field(default_factory=list)


# Calls that run no kernel although their schema does not declare an alias: allocations, metadata-only and
# in-place view ops, host syncs and constants lifted into the graph.
_NO_KERNEL_OPS = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
                  "_unsafe_view", "_reshape_alias", "as_strided_", "resize_", "set_", "detach_", "alias", "detach",
                  "lift_fresh", "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride"}


_OP_INFO: Dict[str, Tuple[str, bool, bool, Tuple[bool, ...]]] = {}


def _op_info(schema: str) -> Tuple[str, bool, bool, Tuple[bool, ...]]:
    """``(name, may_launch, own_kernel, fresh_returns)`` of the op with this schema string. ``may_launch``: not a
    view or alias of an input (all returns alias an input, not written), not in ``_NO_KERNEL_OPS``, not
    CompositeImplicitAutograd (those are decompositions: only the ops they call run). ``own_kernel``: a CPU
    kernel is registered for the op itself (not a CompositeExplicitAutograd body that only calls other ops).
    ``fresh_returns``: per return, whether it is a new tensor (else it aliases an argument)."""
    import torch

    if schema in _OP_INFO:
        return _OP_INFO[schema]
    parsed = torch._C.parse_schema(schema)
    name = parsed.name + (f".{parsed.overload_name}" if parsed.overload_name else "")
    returns = parsed.returns
    aliasing = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    may_launch = not (aliasing or parsed.name.split("::")[-1] in _NO_KERNEL_OPS
                      or has_kernel(name, "CompositeImplicitAutograd"))
    info = name, may_launch, has_kernel(name, "CPU"), tuple(r.alias_info is None for r in returns)
    _OP_INFO[schema] = info
    return info


def kernel_launches(calls: Sequence[_Call]) -> List[Tuple[str, int]]:
    """The kernel launches of a recorded call tree, in order, as ``(op, bytes)``; ``bytes`` sums ``numel * element
    size`` of the op's tensor arguments and of its new results (a result that aliases an argument, as in ``add_``,
    is counted once; 0-dim tensors count nothing: a Python scalar operand is a kernel argument on a GPU).

    A call launches a kernel when it may launch (:func:`_op_info`: not a view, allocation, metadata op or
    CompositeImplicitAutograd decomposition), it is not nested inside another launch, and either it has a kernel
    of its own or nothing under it may launch (``copy_`` under ``_to_copy``, ``zero_`` under ``zeros``). What a
    launching op calls is its kernel's business, and on CPU that includes work a GPU does not do: casting a Python
    scalar operand (a kernel argument on a GPU), a CPU reduction's output initialisation, ``fill_(Tensor)``'s
    ``copy_``. One exception: a ``copy_`` of one of its inputs into its new result (a functional clone-then-update
    op such as ``scatter_add``) is a launch of its own: the shared structured kernel does it on every device."""
    launches: List[Tuple[str, int]] = []

    def nbytes(tensors: Sequence[Tuple[int, int, int, int]]) -> int:
        return sum(t[2] for t in tensors if t[3] > 0)

    def new_storages(call: _Call) -> set:
        return {t[1] for t, new in zip(call.outputs, _op_info(call.schema)[3]) if new}

    def may_launch_below(call: _Call) -> bool:
        return any(_op_info(c.schema)[1] or may_launch_below(c) for c in call.calls)

    def visit(call: _Call, enclosing: Optional[_Call]) -> None:
        name, may_launch, own_kernel, fresh = _op_info(call.schema)
        if enclosing is not None:
            if name == "aten::copy_" and len(call.inputs) == 2 \
                    and call.inputs[1][0] in {t[0] for t in enclosing.inputs} \
                    and call.inputs[0][1] in new_storages(enclosing):
                launches.append((name, nbytes(call.inputs)))
        elif may_launch and (own_kernel or not may_launch_below(call)):
            launches.append((name, nbytes(call.inputs) + nbytes([t for t, new in zip(call.outputs, fresh) if new])))
            enclosing = call
        for child in call.calls:
            visit(child, enclosing)

    for call in calls:
        visit(call, None)
    return launches


def _trace_tensors(value: Any, shape: Any, kind: str) -> List[Tuple[int, int, int, int]]:
    """The tensors of one execution-trace argument: a tensor is recorded as ``[tensor id, storage id, offset,
    numel, element size, device]`` with its shape alongside; a tensor list as lists of those."""
    if "Tensor" not in kind or not isinstance(value, list):
        return []
    if len(value) == 6 and all(isinstance(v, int) for v in value[:5]) and isinstance(value[5], str):
        return [(value[0], value[1], value[3] * value[4], len(shape))]
    return [t for item, dims in zip(value, shape) for t in _trace_tensors(item, dims, kind)]


def execution_trace_calls(nodes: Sequence[Dict[str, Any]]) -> List[_Call]:
    """The call tree of the operator nodes of a PyTorch execution trace (``ExecutionTraceObserver``): nodes without
    an op schema (threads, autograd engine functions, ``record_function`` ranges) are left out, their calls
    attached to the nearest recorded ancestor. Node ids follow call order."""
    by_id = {node["id"]: node for node in nodes}
    calls: Dict[int, _Call] = {}
    for node in sorted(nodes, key=lambda n: n["id"]):
        schema = next((a["value"] for a in node.get("attrs", ()) if a["name"] == "op_schema"), "")
        if schema:
            tensors = {side: [t for args in [node[side]] for value, shape, kind in
                              zip(args["values"], args["shapes"], args["types"])
                              for t in _trace_tensors(value, shape, kind)] for side in ("inputs", "outputs")}
            calls[node["id"]] = _Call(schema, tensors["inputs"], tensors["outputs"])
    roots: List[_Call] = []
    for node_id in sorted(calls):
        parent = by_id[node_id].get("ctrl_deps")
        while parent in by_id and parent not in calls and by_id[parent].get("ctrl_deps") != parent:
            parent = by_id[parent].get("ctrl_deps")
        (calls[parent].calls if parent in calls else roots).append(calls[node_id])
    return roots


def reference_workload(op: str, batch: int, dtype=None):
    """A zero-argument function running the pure-PyTorch reference of ``op`` (one of ``ROOFLINE_OPS``) once at
    ViT-B/16 shapes on CPU tensors, grad mode included; its inputs (and the backward's output gradients) are made
    here, outside it, and so are the cached checkerboard index tensors."""
    import torch

    from . import reference as ref

    dtype = dtype or torch.bfloat16
    s = VIT_B16
    grid, prefix = s["grid"], s["prefix"]
    cells = grid[0] * grid[1]
    na, nb = (cells + 1) // 2, prefix + cells // 2
    gen = torch.Generator().manual_seed(0)
    grad = op in ("merge_tokens fwd", "merge_tokens fwd+bwd")
    x = torch.randn(batch, s["tokens"], s["channels"], generator=gen, dtype=dtype).requires_grad_(grad)
    metric = torch.randn(batch, s["tokens"], s["head_dim"], generator=gen, dtype=dtype).requires_grad_(grad)
    ref.checkerboard_indices(grid, prefix)

    def merge():
        return ref.merge_tokens(x, metric, grid_size=grid, num_prefix_tokens=prefix)

    if op == "refine_keys":
        w_down = torch.randn(s["refine_dim"], s["head_dim"], generator=gen, dtype=dtype)
        w_up = torch.randn(s["head_dim"], s["refine_dim"], generator=gen, dtype=dtype)
        return lambda: ref.refine_keys(metric, w_down, w_up)
    if op == "checkerboard_similarity":
        return lambda: ref.checkerboard_similarity(metric, grid, prefix)
    if op == "ste_match":
        scores = torch.randn(batch, na, nb, generator=gen)
        return lambda: ref.ste_match(scores)
    if op == "scatter_mean_merge":
        index = torch.randint(0, nb, (batch, na), generator=gen)
        return lambda: ref.scatter_mean_merge(x, None, index, grid, prefix)
    if op == "merge_tokens fwd":
        return merge
    if op == "merge_tokens fwd+bwd":
        grads = [torch.randn(batch, nb, s["channels"], generator=gen, dtype=dtype),
                 torch.randn(batch, nb, generator=gen)]
        return lambda: torch.autograd.backward(merge(), grads)
    if op == "merge_tokens no-grad":
        return torch.no_grad()(merge)
    raise ValueError(f"unknown op {op!r}")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what the profiler's C++ side prints on file descriptor 2 (observer on/off notices, no-GPU errors
    of the Kineto backend); shown again if the body raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def profile_calls(run) -> List[_Call]:
    """Call ``run()`` once under ``torch.profiler.profile`` with an ``ExecutionTraceObserver``, which records every
    dispatcher call with its input and output tensors (ids, numel, element size) and its nesting, and return the
    call tree (:func:`execution_trace_calls`)."""
    from torch.profiler import ExecutionTraceObserver, ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "execution_trace.json")
        observer = ExecutionTraceObserver().register_callback(path)
        try:
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], execution_trace_observer=observer):
                run()
        finally:
            observer.unregister_callback()
        with open(path) as f:
            nodes = json.load(f)["nodes"]
    return execution_trace_calls(nodes)


def profile_reference(op: str, batch: int, dtype=None) -> List[_Call]:
    """The profiled call tree (:func:`profile_calls`) of one run of :func:`reference_workload`."""
    return profile_calls(reference_workload(op, batch, dtype))


def reference_traffic(op: str, batch: int, dtype=None) -> Tuple[int, int]:
    """(kernel launches, bytes of their inputs + outputs) of the pure-PyTorch reference of ``op`` at ViT-B/16
    shapes, counted from a ``torch.profiler`` execution trace of one CPU run (:func:`profile_reference`,
    :func:`kernel_launches`): eager PyTorch's launches and traffic, op by op, with nothing fused."""
    launches = kernel_launches(profile_reference(op, batch, dtype))
    return len(launches), sum(nbytes for _, nbytes in launches)


def roofline(batches: Sequence[int] = (1, 64, 256)) -> List[RooflineRow]:
    """The bf16 roofline model of every op (ROOFLINE_OPS) at ViT-B/16 shapes on an H100 SXM: a lower bound, not a
    measurement. The reference's bytes and launches are counted from a profiled CPU run (:func:`reference_traffic`);
    its FLOPs are taken as the ideal ones (it does at least that work)."""
    rows = []
    for op in ROOFLINE_OPS:
        for batch in batches:
            nbytes, tensor, fp32 = minimum_traffic(op, batch)
            launches, ref_bytes = reference_traffic(op, batch)
            rows.append(RooflineRow(op, batch, nbytes, tensor, fp32, _bound_us(nbytes, tensor, fp32),
                                    ref_bytes, launches, _bound_us(ref_bytes, tensor, fp32)))
    return rows


def format_roofline(rows: Sequence[RooflineRow]) -> str:
    gpu = H100_SXM
    lines = [
        f"Roofline MODEL (not a measurement): bf16, ViT-B/16 shapes (N=197, C=768, Dh=64, d=32, 14x14 grid, P=1), "
        f"{gpu['name']}: {gpu['bandwidth'] / 1e12:.2f} TB/s, {gpu['tensor_flops'] / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{gpu['fp32_flops'] / 1e12:.0f} TFLOP/s fp32. Lower bound = max(bytes / bandwidth, FLOPs / peak).",
        "",
        "| op | B | min MB | GFLOP (TC + fp32) | fused lower bound us | reference MB | reference launches "
        "| reference lower bound us |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.op} | {r.batch} | {r.bytes / 1e6:.3f} | {r.tensor_flops / 1e9:.3f} + "
                     f"{r.fp32_flops / 1e9:.3f} | {r.bound_us:.2f} | {r.ref_bytes / 1e6:.3f} | {r.ref_launches} "
                     f"| {r.ref_bound_us:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point
def _archs(text: str) -> List[int]:
    return [int(a) for a in text.replace(";", ",").split(",") if a.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fpet_kernels.gpu_report --json ...``: the report as JSON (what :func:`build_report` runs in a
    subprocess under TRITON_INTERPRET=1). ``fpet gpu-report`` is the user-facing command."""
    parser = argparse.ArgumentParser(prog="python -m fpet_kernels.gpu_report")
    parser.add_argument("--json", action="store_true", required=True)
    parser.add_argument("--launcher", default=PACKAGE_LAUNCHER)
    parser.add_argument("--triton-archs", type=_archs, default=list(TRITON_ARCHS))
    parser.add_argument("--cuda-archs", type=_archs, default=None)
    parser.add_argument("--first-config", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--dtypes", type=lambda text: text.split(","), default=None)
    args = parser.parse_args(argv)
    report = build_report(args.launcher, args.triton_archs, args.cuda_archs, not args.first_config,
                          not args.no_cuda, args.jobs, args.dtypes)
    json.dump({"rows": [dataclasses.asdict(r) for r in report.rows], "defined_kernels": report.defined_kernels,
               "launched_kernels": report.launched_kernels, "notes": report.notes}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
