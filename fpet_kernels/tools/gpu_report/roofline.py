"""The roofline model of each op at ViT-B/16 shapes (a bandwidth/FLOP *model*, not a measurement), and the
reference's kernel launches and bytes, counted from a ``torch.profiler`` execution trace of one CPU run.

:func:`minimum_traffic` is what an ideal fused kernel must move and compute; :func:`reference_traffic` what the
pure-PyTorch reference launches (:func:`kernel_launches` reads the launches off the profiled call tree); both are
turned into lower bounds on an H100 SXM by :func:`roofline`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .shapes import VIT_B16, Shapes

H100_SXM = dict(name="H100 SXM", bandwidth=3.35e12, tensor_flops=989e12, fp32_flops=67e12)
# Datasheet peaks (DRAM bandwidth, dense bf16 tensor-core and fp32 CUDA-core FLOP/s) of the GPUs the GPU check
# (bench/gpu_check.py) knows, matched by a substring of torch.cuda.get_device_name(); first match wins.
GPU_SPECS = (
    dict(name="H200", bandwidth=4.8e12, tensor_flops=989e12, fp32_flops=67e12),
    dict(name="H100 PCIe", bandwidth=2.0e12, tensor_flops=756e12, fp32_flops=51e12),
    dict(H100_SXM, name="H100"),
    dict(name="A100", bandwidth=2.0e12, tensor_flops=312e12, fp32_flops=19.5e12),
)


def gpu_spec(device_name: str):
    """The datasheet peaks of the GPU called ``device_name`` (a dict like :data:`H100_SXM`), None if unknown."""
    return next((dict(spec) for spec in GPU_SPECS if spec["name"].lower() in device_name.lower()), None)


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


def bound_us(nbytes: float, tensor_flops: float, fp32_flops: float, gpu=H100_SXM) -> float:
    """max(bytes / bandwidth, tensor FLOPs / tensor peak, fp32 FLOPs / fp32 peak), in microseconds."""
    return 1e6 * max(nbytes / gpu["bandwidth"], tensor_flops / gpu["tensor_flops"], fp32_flops / gpu["fp32_flops"])


def minimum_traffic(op: str, batch: int, element: int = 2, shapes: Shapes = VIT_B16) -> Tuple[int, int, int]:
    """(bytes, tensor-core FLOPs, fp32 FLOPs) an ideal fused kernel of ``op`` needs at ``shapes`` (default
    ViT-B/16), ``element`` bytes per x/metric element; sizes, scores and thresholds float32, indices int64 (as the
    Triton backend)."""
    s = shapes
    n, c, dh, d = s.tokens, s.channels, s.head_dim, s.refine_dim
    na, nb = s.grid.num_a, s.grid.num_b
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
    if op == "scatter_mean_merge_dense":  # the float matching [B, NA, NB] in x's dtype; M^T (s_A x_A) a GEMM
        gemm = 2 * batch * na * nb * c
        tensor = gemm if element == 2 else 0
        return x + batch * na * nb * element + merged + batch * nb * 4, tensor, merge_flops + gemm - tensor
    if op in ("merge_tokens fwd", "merge_tokens no-grad"):
        state = match_state if op == "merge_tokens fwd" else 0
        return x + metric + merged + batch * nb * 4 + state, 0, sim_flops + merge_flops
    if op == "merge_tokens fwd+bwd":
        forward, _, forward_flops = minimum_traffic("merge_tokens fwd", batch, element, shapes)
        # backward reads g, h, x, metric and the match state; writes dL/dx and dL/dmetric.
        backward = merged + batch * nb * 4 + x + metric + match_state + x + metric
        gemm = 2 * batch * na * nb * c  # X_A G^T: 16-bit operands on tensor cores
        backward_flops = 3 * sim_flops + 4 * batch * n * c + 12 * batch * na * nb
        tensor = gemm if element == 2 else 0
        return forward + backward, tensor, forward_flops + backward_flops + (gemm - tensor)
    raise ValueError(f"unknown op {op!r}")


ROOFLINE_OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge",
                "scatter_mean_merge_dense", "merge_tokens fwd", "merge_tokens fwd+bwd", "merge_tokens no-grad")


@dataclasses.dataclass
class Call:
    """One dispatcher call recorded while the reference ran: its schema, its tensor arguments (``inputs``, schema
    order, tensor lists flattened) and results (``outputs``) as ``(tensor id, storage id, bytes, dims)`` with
    ``bytes = numel * element size``, and the calls it made (``calls``)."""

    schema: str
    inputs: List[Tuple[int, int, int, int]]
    outputs: List[Tuple[int, int, int, int]]
    calls: List["Call"] = dataclasses.field(default_factory=list)


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


def kernel_launches(calls: Sequence[Call]) -> List[Tuple[str, int]]:
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

    def new_storages(call: Call) -> set:
        return {t[1] for t, new in zip(call.outputs, _op_info(call.schema)[3]) if new}

    def may_launch_below(call: Call) -> bool:
        return any(_op_info(c.schema)[1] or may_launch_below(c) for c in call.calls)

    def visit(call: Call, enclosing: Optional[Call]) -> None:
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


def execution_trace_calls(nodes: Sequence[Dict[str, Any]]) -> List[Call]:
    """The call tree of the operator nodes of a PyTorch execution trace (``ExecutionTraceObserver``): nodes without
    an op schema (threads, autograd engine functions, ``record_function`` ranges) are left out, their calls
    attached to the nearest recorded ancestor. Node ids follow call order."""
    by_id = {node["id"]: node for node in nodes}
    calls: Dict[int, Call] = {}
    for node in sorted(nodes, key=lambda n: n["id"]):
        schema = next((a["value"] for a in node.get("attrs", ()) if a["name"] == "op_schema"), "")
        if schema:
            tensors = {side: [t for args in [node[side]] for value, shape, kind in
                              zip(args["values"], args["shapes"], args["types"])
                              for t in _trace_tensors(value, shape, kind)] for side in ("inputs", "outputs")}
            calls[node["id"]] = Call(schema, tensors["inputs"], tensors["outputs"])
    roots: List[Call] = []
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

    from ... import reference as ref

    dtype = dtype or torch.bfloat16
    s = VIT_B16
    grid, prefix = s.grid.size, s.grid.prefix
    na, nb = s.grid.num_a, s.grid.num_b
    gen = torch.Generator().manual_seed(0)
    grad = op in ("merge_tokens fwd", "merge_tokens fwd+bwd")
    x = torch.randn(batch, s.tokens, s.channels, generator=gen, dtype=dtype).requires_grad_(grad)
    metric = torch.randn(batch, s.tokens, s.head_dim, generator=gen, dtype=dtype).requires_grad_(grad)
    s.grid.indices()  # the checkerboard index tensors the reference uses, built (and cached) outside the run

    def merge():
        return ref.merge_tokens(x, metric, grid_size=grid, num_prefix_tokens=prefix)

    if op == "refine_keys":
        w_down = torch.randn(s.refine_dim, s.head_dim, generator=gen, dtype=dtype)
        w_up = torch.randn(s.head_dim, s.refine_dim, generator=gen, dtype=dtype)
        return lambda: ref.refine_keys(metric, w_down, w_up)
    if op == "checkerboard_similarity":
        return lambda: ref.checkerboard_similarity(metric, grid, prefix)
    if op == "ste_match":
        scores = torch.randn(batch, na, nb, generator=gen)
        return lambda: ref.ste_match(scores)
    if op == "scatter_mean_merge":
        index = torch.randint(0, nb, (batch, na), generator=gen)
        return lambda: ref.scatter_mean_merge(x, None, index, grid, prefix)
    if op == "scatter_mean_merge_dense":
        matching = torch.nn.functional.one_hot(torch.randint(0, nb, (batch, na), generator=gen), nb).to(dtype)
        return lambda: ref.scatter_mean_merge_dense(x, None, matching, grid, prefix)
    if op == "merge_tokens fwd":
        return merge
    if op == "merge_tokens fwd+bwd":
        grads = [torch.randn(batch, nb, s.channels, generator=gen, dtype=dtype),
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


def profile_calls(run) -> List[Call]:
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


def profile_reference(op: str, batch: int, dtype=None) -> List[Call]:
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
            rows.append(RooflineRow(op, batch, nbytes, tensor, fp32, bound_us(nbytes, tensor, fp32),
                                    ref_bytes, launches, bound_us(ref_bytes, tensor, fp32)))
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


