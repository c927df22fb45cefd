"""`fpet gpu-report` as a CI check (no GPU needed): every Triton kernel, at the signatures its launcher really uses,
compiles for sm_80 and sm_90, and every CUDA C++ kernel of the built extension is there for sm_80 and sm_90, without
spills, within each arch's shared memory, with its 16-bit dot products on tensor cores. A deliberately spilling toy
kernel shows the check can fail, and so does a CUDA arch the extension was not built for.

To stay within a couple of minutes on 2 cores, CI compiles the first autotune config of every kernel for bfloat16
and float16 (the tensor-core dtypes); ``fpet gpu-report`` compiles every config and float32 too. The CUDA C++ kernels
are read from the built extension (no nvcc); when it has none, their test skips, or fails with
FPET_EXPECT_CUDA_KERNELS=1 (as CI sets it).

The roofline tests check the reference's kernel launches and bytes, counted from a ``torch.profiler`` execution
trace, against the same calls recorded by a dispatch mode.
"""
import os

import pytest
import torch
import triton
import triton.language as tl
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fpet_kernels.tools import gpu_report
from fpet_kernels.tools.gpu_report import KernelRow, check, occupancy_warps

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16")


# The report compiles through triton's internal launch binder (triton >= 3.6); older triton gets a clear error.
requires_triton_binder = pytest.mark.skipif(gpu_report.triton_compile_unavailable() is not None,
                                            reason=str(gpu_report.triton_compile_unavailable()))


@pytest.fixture(scope="module")
def report():
    if gpu_report.triton_compile_unavailable() is not None:
        pytest.skip(gpu_report.triton_compile_unavailable())
    return gpu_report.build_report(triton_archs=ARCHS, cuda_archs=ARCHS, all_configs=False, dtypes=DTYPES)


def test_launch_sites_cover_every_triton_kernel(report):
    assert report.defined_kernels, "no @triton.jit kernel found in fpet_kernels.backends.triton_backend"
    assert sorted(set(report.defined_kernels) - set(report.launched_kernels)) == []


def test_every_kernel_compiles_for_every_arch_and_dtype(report):
    triton_rows = [r for r in report.rows if r.backend == "triton"]
    compiled = {(f"{r.kernel}", r.arch) for r in triton_rows}
    expected = {(name.split(":")[1], arch) for name in report.launched_kernels for arch in ARCHS}
    assert compiled == expected
    for dtype in DTYPES:
        assert {(r.kernel, r.arch) for r in triton_rows if r.dtype == dtype} >= {
            (kernel, arch) for kernel, arch in expected if kernel != "_inverse_index_kernel"}  # int-only kernel


def _extension_has_cuda_kernels() -> bool:
    library = gpu_report.extension_library()
    return library is not None and bool(gpu_report.embedded_archs(library))


def test_cuda_kernels_compile_for_every_arch(report):
    if not _extension_has_cuda_kernels() and os.environ.get("FPET_EXPECT_CUDA_KERNELS") != "1":  # as test_cuda_build
        pytest.skip("the extension has no CUDA kernels (not built, or built with FPET_SKIP_CUDA_BUILD=1)")
    cuda_rows = [r for r in report.rows if r.backend == "cuda"]
    names = {r.kernel for r in cuda_rows}
    assert names and all({r.arch for r in cuda_rows if r.kernel == name} == set(ARCHS) for name in names)
    assert {r.dtype for r in cuda_rows} - {"-"} == set(DTYPES)


def test_shared_memory_within_limits_and_16bit_dots_on_tensor_cores(report):
    assert [p for p in check(report.rows) if "stack" not in p] == []


def test_no_kernel_spills(report):
    assert [p for p in check(report.rows) if "stack" in p] == []


def test_16bit_dot_kernels_exist_so_the_tensor_core_check_is_not_vacuous(report):
    for dtype in ("bf16", "fp16"):
        for arch in ARCHS:
            assert any(r.dot_16bit and r.mma for r in report.rows if r.dtype == dtype and r.arch == arch)


@triton.jit
def _spilling_toy_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Keeps BLOCK floats alive across a reduction: with one warp, BLOCK / 32 values per thread."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * tl.sum(x, axis=0) + tl.cumsum(x, axis=0))


def launch_spilling_toy():
    x = torch.empty(16384)
    _spilling_toy_kernel[(1,)](x, x, BLOCK=16384, num_warps=1)


@requires_triton_binder
def test_check_flags_a_spilling_kernel():
    toy = gpu_report.build_report(launcher=f"{__name__}:launch_spilling_toy", triton_archs=(80,), cuda_archs=(75,))
    (row,) = toy.rows
    assert row.kernel == "_spilling_toy_kernel" and row.stack_bytes > 0
    assert any("stack" in problem for problem in check(toy.rows))
    if _extension_has_cuda_kernels():  # sm_75 is not in the build: a problem, not a silent skip
        assert [p for p in toy.problems() if "sm_75" in p] == toy.unavailable != []


def _row(**changes):
    base = dict(backend="triton", kernel="k", config="c", dtype="bf16", arch=80, registers=32, stack_bytes=0,
                shared_bytes=0, warps_per_block=4, occupancy_warps=64, dots=1, dot_16bit=1, mma=8,
                tensor_cores="yes")
    return KernelRow(**dict(base, **changes))


def test_check_flags_shared_memory_and_missing_tensor_cores():
    assert check([_row()]) == []
    assert "shared memory" in check([_row(shared_bytes=200 * 1024)])[0]
    assert check([_row(arch=90, shared_bytes=200 * 1024)]) == []
    assert "no HMMA/HGMMA" in check([_row(mma=0)])[0]


def test_occupancy_estimate():
    assert occupancy_warps(80, 32, 0, 4) == 64  # warp limit
    assert occupancy_warps(80, 255, 0, 4) == 8  # 65536 // (256 * 32) = 8 warps
    assert occupancy_warps(80, 128, 0, 8) == 16
    assert occupancy_warps(80, 32, 40 * 1024, 4) == 16  # 164 KiB // 41 KiB = 4 blocks
    assert occupancy_warps(90, 32, 40 * 1024, 4) == 20  # 228 KiB // 41 KiB = 5 blocks
    assert occupancy_warps(80, 32, 0, 1) == 32  # 32 blocks per SM at most
    assert occupancy_warps(80, 32, 164 * 1024, 4) == 0  # over the 163 KiB per-block limit


def test_roofline_model():
    rows = gpu_report.roofline(batches=(1, 64))
    assert {r.op for r in rows} == set(gpu_report.ROOFLINE_OPS)
    for r in rows:
        assert r.bytes > 0 and r.bound_us > 0 and r.ref_launches > 0
        assert r.ref_bytes >= r.bytes, r.op  # unfused PyTorch moves at least what an ideal kernel must
    by_op = {(r.op, r.batch): r for r in rows}
    assert by_op[("merge_tokens fwd", 64)].bytes == pytest.approx(64 * by_op[("merge_tokens fwd", 1)].bytes)
    assert by_op[("merge_tokens fwd+bwd", 1)].tensor_flops > 0
    for op in gpu_report.ROOFLINE_OPS:  # the reference's launches do not depend on the batch size
        assert by_op[(op, 1)].ref_launches == by_op[(op, 64)].ref_launches, op
    assert "not a measurement" in gpu_report.format_roofline(rows)


class _DispatchRecorder(TorchDispatchMode):
    """The independent check of the profiler's call tree: a dispatch mode that sees every aten call below autograd,
    including the calls each kernel makes (it runs the kernel for its dispatch key with the mode re-entered), and
    records them as the same ``Call`` tree from the live tensors."""

    KEYS = (DispatchKey.CPU, DispatchKey.CompositeExplicitAutogradNonFunctional,
            DispatchKey.CompositeExplicitAutograd, DispatchKey.CompositeImplicitAutograd)

    def __init__(self):
        super().__init__()
        self.calls = []
        self._stack = [self.calls]

    @staticmethod
    def _tensors(values):
        return [(t._cdata, t.untyped_storage()._cdata, t.numel() * t.element_size(), t.dim())
                for t in tree_leaves(values) if isinstance(t, torch.Tensor)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        ordered = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)]
        call = gpu_report.Call(str(schema), self._tensors(ordered), [])
        self._stack[-1].append(call)
        self._stack.append(call.calls)
        try:
            key = next(k for k in self.KEYS if func.has_kernel_for_dispatch_key(k))
            if func.is_view and key != DispatchKey.CompositeImplicitAutograd:
                out = func(*args, **kwargs)  # a view: no kernel, nothing inside (detach would recurse into itself)
            else:
                with self:
                    out = func._op_dk(key, *args, **kwargs)
        finally:
            self._stack.pop()
        call.outputs = self._tensors(out)
        return out


def _dispatch_calls(run):
    recorder = _DispatchRecorder()
    with recorder:
        run()
    return recorder.calls


def _with_a_dispatch_mode(launches):
    """The reference's backward as it runs under a dispatch mode. With a mode active, autograd takes its
    composite-compliant paths (no in-place ops on tensors a mode could wrap): gradient accumulation runs ``add``
    instead of ``add_`` (one more result of the same size), and the backward of ``gather`` / ``topk`` and of indexing
    build their gradient with functional ``scatter_add`` / ``scatter`` / ``index_put`` instead of ``scatter_add_`` /
    ``scatter_`` / ``index_put_`` into fresh zeros: one more ``copy_`` (the clone of the zeros) each, and the
    scatter's new result."""
    out = []
    for i, (name, nbytes) in enumerate(launches):
        if name == "aten::add_.Tensor":
            out.append(("aten::add.Tensor", nbytes * 3 // 2))
        elif name == "aten::_index_put_impl_":
            zeros, zeros_bytes = launches[i - 1]
            assert zeros == "aten::zero_"
            out += [("aten::copy_", 2 * zeros_bytes), (name, nbytes)]
        elif name in ("aten::scatter_.src", "aten::scatter_add_"):
            zeros, zeros_bytes = launches[i - 1]
            assert zeros == "aten::zero_"
            out += [(name.replace("_.", ".").rstrip("_"), nbytes + zeros_bytes), ("aten::copy_", 2 * zeros_bytes)]
        else:
            out.append((name, nbytes))
    return out


@pytest.mark.parametrize("op", gpu_report.ROOFLINE_OPS)
def test_profiler_launches_match_an_independent_dispatch_count(op):
    """The launches and bytes counted from the profiler's execution trace agree, call by call, with those counted
    from a dispatch mode, at B = 1 and 2 (each run on fresh inputs): exactly on one run seen by both at once, and on
    separate runs up to what the mode itself changes in the backward (:func:`_with_a_dispatch_mode`)."""
    for batch in (1, 2):
        profiled = gpu_report.kernel_launches(gpu_report.profile_reference(op, batch))
        assert gpu_report.reference_traffic(op, batch) == (len(profiled), sum(b for _, b in profiled))
        dispatched = gpu_report.kernel_launches(_dispatch_calls(gpu_report.reference_workload(op, batch)))
        expected = _with_a_dispatch_mode(profiled) if op == "merge_tokens fwd+bwd" else profiled
        assert profiled and dispatched == expected, (op, batch)
        if op == "merge_tokens fwd+bwd":
            assert len(dispatched) == len(profiled) + 6 and profiled != dispatched
        seen = []
        run = gpu_report.reference_workload(op, batch)
        traced = gpu_report.kernel_launches(gpu_report.profile_calls(lambda: seen.append(_dispatch_calls(run))))
        assert traced == gpu_report.kernel_launches(seen[0]) == dispatched, (op, batch)


def test_launch_rules():
    """What counts as a launch (op, bytes) in small cases, from the profiler's trace."""
    a, idx = torch.ones(3), torch.tensor([0, 0, 1])
    mask = torch.tensor([True, False, True])

    def launches(run):
        return gpu_report.kernel_launches(gpu_report.profile_calls(run))

    assert launches(lambda: a.view(1, 3).t().expand(3, 3)) == []  # views
    assert launches(lambda: a.to(torch.float64)) == [("aten::copy_", 3 * 8 + 3 * 4)]  # _to_copy -> its copy_
    assert launches(lambda: a * 2) == [("aten::mul.Tensor", 12 + 12)]  # the scalar: no bytes, its CPU cast no launch
    assert launches(lambda: a.masked_fill(mask, 0.0)) == [("aten::copy_", 24), ("aten::masked_fill_.Scalar", 15)]
    assert launches(lambda: a.scatter_add(0, idx, a)) == [  # the functional op's clone counts: a launch on GPU too
        ("aten::scatter_add", 12 + 24 + 12 + 12), ("aten::copy_", 24)]
    assert launches(lambda: torch.zeros(4)) == [("aten::zero_", 16)]  # allocation excluded
    assert launches(lambda: torch.nn.functional.dropout(a, 0.5, training=False)) == []  # a decomposition to nothing
