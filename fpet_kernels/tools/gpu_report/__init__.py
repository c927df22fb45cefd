"""GPU readiness without a GPU: compile every kernel for real NVIDIA targets and read what the compiler produced.

``fpet gpu-report`` (:func:`main`) builds or reads, with no GPU and no driver:

* every Triton kernel of :mod:`fpet_kernels.backends.triton_backend`, for every autotune config, at the exact
  signatures the launchers use (:mod:`.launches`: launch capture, binding, ``triton.compile``);
* every CUDA C++ kernel of the built extension ``fpet_kernels._C``, for the arch list of
  ``fpet_kernels/cuda_archs.txt`` (:mod:`.cubin`: the cubins embedded in the shared library).

Each cubin is read with ``cuobjdump`` (shipped with Triton, :mod:`.cubin`): registers per thread, stack bytes
(spills), shared memory, and the SASS (HMMA = tensor cores on sm_80, HGMMA = wgmma on sm_90). :func:`check` turns the
rows into the CI verdict, with an occupancy estimate per row (:mod:`.rows`). :func:`roofline` (:mod:`.roofline`) is
a bandwidth/FLOP *model* of each op at ViT-B/16 shapes, not a measurement. docs/gpu_report.md describes it all.

Not imported by ``import fpet_kernels``; ``fpet gpu-report`` imports it when it runs.
"""
from .cubin import (
    built_cuda_archs,
    cuda_rows,
    embedded_archs,
    extension_library,
    max_threads,
    nvidia_tool,
    resource_usage,
    sass_counts,
    tensor_core_label,
)
from .launches import (
    PACKAGE_LAUNCHER,
    TritonJob,
    compile_triton,
    defined_kernels,
    job_dtype,
    launch_package_ops,
    record_launches,
    triton_compile_unavailable,
    triton_jobs,
)
from .report import TRITON_ARCHS, Report, build_report, main
from .roofline import (
    GPU_SPECS,
    ROOFLINE_OPS,
    Call,
    RooflineRow,
    bound_us,
    execution_trace_calls,
    format_roofline,
    gpu_spec,
    kernel_launches,
    minimum_traffic,
    profile_calls,
    profile_reference,
    reference_traffic,
    reference_workload,
    roofline,
)
from .rows import ARCH_LIMITS, ArchLimits, KernelRow, check, format_rows, occupancy_warps
from .shapes import VIT_B16, VIT_L16, Shapes

__all__ = [
    "ARCH_LIMITS", "ArchLimits", "Call", "GPU_SPECS", "KernelRow", "PACKAGE_LAUNCHER", "ROOFLINE_OPS", "Report",
    "RooflineRow", "Shapes", "TRITON_ARCHS", "TritonJob", "VIT_B16", "VIT_L16", "bound_us", "build_report",
    "built_cuda_archs", "check", "compile_triton",
    "cuda_rows", "defined_kernels", "embedded_archs", "execution_trace_calls", "extension_library", "format_rows",
    "format_roofline", "gpu_spec", "job_dtype", "kernel_launches", "launch_package_ops", "main", "max_threads",
    "minimum_traffic", "nvidia_tool", "occupancy_warps", "profile_calls", "profile_reference", "record_launches",
    "reference_traffic", "reference_workload", "resource_usage", "roofline", "sass_counts", "tensor_core_label",
    "triton_compile_unavailable", "triton_jobs",
]
