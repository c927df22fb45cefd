"""Triton kernels: capture the launches the ops really make, then compile each one for real NVIDIA targets.

The public ops of :mod:`fpet_kernels.backends.triton_backend` run on small CPU tensors (ViT-B/16 shapes) with every
kernel launch intercepted before it runs (:func:`record_launches`); each recorded launch is bound for each arch and
autotune config by Triton's own specialisation code (argument types, ``tt.divisibility``, constexprs,
:func:`triton_jobs`), so the compiled signatures cannot drift from the launch sites, and compiled with
``triton.compile`` (:func:`compile_triton`; no GPU, no driver). :func:`defined_kernels` lists every kernel of the
package, so that one no op launches is reported.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .cubin import resource_usage, sass_counts, tensor_core_label
from .rows import KernelRow, occupancy_warps
from .shapes import VIT_B16

TRITON_PACKAGE = "fpet_kernels.backends.triton_backend"
PACKAGE_LAUNCHER = f"{__name__}:launch_package_ops"


@contextlib.contextmanager
def record_launches():
    """Within the block, every Triton kernel launch (``kernel[grid](...)``) is recorded as ``(kernel, args,
    kwargs)`` in the yielded list instead of running. The launchers only need the outputs' shapes, which torch
    allocates before the launch, so the ops run to completion (with garbage values) on CPU tensors."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: List[Tuple[Any, tuple, dict]] = []

    def run(self, *args, **kwargs):
        launches.append((self, args, kwargs))

    # Heuristics: the stand-in for an Autotuner where triton < 3.4 has no GPU driver (triton_backend._common.autotune)
    classes = (Autotuner, Heuristics, JITFunction, InterpretedFunction)
    saved = [cls.__dict__.get("run") for cls in classes]  # None: inherited (e.g. triton 3.3's InterpretedFunction)
    for cls in classes:
        cls.run = run
    try:
        yield launches
    finally:
        for cls, original in zip(classes, saved):
            if original is None:
                del cls.run
            else:
                cls.run = original


def launch_package_ops() -> None:
    """Every public Triton op forward and backward, and the no-grad paths, at ViT-B/16 shapes, batch 2, in every
    dtype of the backend (CPU tensors; meant to run under :func:`record_launches`)."""
    import importlib

    import torch

    ops = importlib.import_module(TRITON_PACKAGE)
    s = VIT_B16
    batch, grid = 2, s.grid
    grid_size, prefix = grid.size, grid.prefix

    def leaf(*shape, dtype, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    def backward(*outputs):
        sum(out.float().sum() for out in outputs).backward()

    for dtype in ops.SUPPORTED_DTYPES:
        x = leaf(batch, s.tokens, s.channels, dtype=dtype)
        metric = leaf(batch, s.tokens, s.head_dim, dtype=dtype)
        size = leaf(batch, s.tokens, dtype=torch.float32)
        w_down = leaf(s.refine_dim, s.head_dim, dtype=dtype)
        w_up = leaf(s.head_dim, s.refine_dim, dtype=dtype)
        index = torch.randint(0, grid.num_b, (batch, grid.num_a))
        matching = leaf(batch, grid.num_a, grid.num_b, dtype=dtype)

        backward(ops.refine_keys(metric, w_down, w_up, 1.0, 0.1, training=True))
        backward(ops.checkerboard_similarity(metric, grid_size, prefix))
        backward(ops.ste_match(leaf(batch, grid.num_a, grid.num_b, dtype=dtype))[0])
        backward(*ops.scatter_mean_merge(x, size, index, grid_size, prefix))
        backward(*ops.scatter_mean_merge_dense(x, size, matching, grid_size, prefix))
        backward(*ops.merge_tokens(x, metric, grid_size=grid_size, num_prefix_tokens=prefix))
        with torch.no_grad():
            ops.refine_keys(metric, w_down, w_up, 1.0, 0.1, training=False)
            ops.merge_tokens(x, metric, size, grid_size=grid_size, num_prefix_tokens=prefix)


def _jit_function(kernel):
    """The JITFunction (or InterpretedFunction) under any Autotuner / heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def defined_kernels(package: str = TRITON_PACKAGE) -> List[str]:
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


def kernel_name(kernel) -> str:
    """``module:name`` of a launched kernel (under its autotune / heuristics wrappers)."""
    fn = _jit_function(kernel).fn
    return f"{fn.__module__}:{fn.__name__}"


def triton_compile_unavailable() -> Optional[str]:
    """Why this triton cannot bind and compile the recorded launches for GPU targets (None when it can): the report
    goes through triton's own launch binder, internals that triton 3.3 does not have (works with 3.6 and 3.8)."""
    import triton
    from triton.runtime import jit

    if hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args"):
        return None
    return (f"the GPU report binds Triton launches with triton's internal binder, which triton {triton.__version__} "
            "lacks; it needs triton >= 3.6")


def triton_jobs(launches, archs: Sequence[int], all_configs: bool = True,
                dtypes: Optional[Sequence[str]] = None) -> List[TritonJob]:
    """Bind every recorded launch for every arch and autotune config with Triton's own specialisation (the code
    ``JITFunction.run`` calls), deduplicated; only builds whose :func:`job_dtype` is in ``dtypes`` if given."""
    reason = triton_compile_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
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
                job = TritonJob(kernel_name(kernel), arch, signature, constexprs, attrs, dict(options.__dict__),
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
    """Compile one job for its arch and read the cubin (runs in a worker process without TRITON_INTERPRET).
    Dot products are read from the TTIR (``tt.dot`` operand type and ``inputPrecision``); Triton's dynamic shared
    memory from the compiled kernel's metadata."""
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
