"""The op workloads shared by the GPU check (bench/gpu_check.py) and the kernel benchmarks (bench/test_bench_ops.py):
every op's inputs at a :class:`~fpet_kernels.tools.gpu_report.shapes.Shapes`, its call on a backend implementation,
and a zero-argument timed function per mode.

Modes: ``forward`` (grad mode: the graph is built), ``backward`` (the forward and every input's gradient through
``torch.autograd.grad``, fixed random output gradients) and ``no-grad`` (``torch.no_grad``: ``merge_tokens`` takes its
fast path).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["OPS", "MODES", "op_inputs", "op_tensors", "op_call", "output_grads", "run_op", "timed_call"]

OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "scatter_mean_merge_dense",
       "merge_tokens")
MODES = ("forward", "backward", "no-grad")


def op_inputs(shape, batch: int, dtype, device: str, seed: int = 0):
    """x [B, N, C], metric [B, N, Dh], size [B, N] in [0.5, 1.5), adapter weights: drawn in float32 on the device
    from a seeded generator, then cast."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    n, c, dh, d = shape.tokens, shape.channels, shape.head_dim, shape.refine_dim

    def draw(*dims, positive=False, scale=1.0):
        if positive:
            return torch.rand(dims, generator=gen, device=device) + 0.5
        return (torch.randn(dims, generator=gen, device=device) * scale).to(dtype)

    return dict(x=draw(batch, n, c), metric=draw(batch, n, dh), size=draw(batch, n, positive=True),
                w_down=draw(d, dh, scale=dh ** -0.5), w_up=draw(dh, d, scale=d ** -0.5))


def op_call(op: str, shape, tensors: Dict[str, Any]) -> Tuple[Callable, Tuple[str, ...]]:
    """``(call(impl, **leaves) -> outputs, names of the differentiable inputs)`` of ``op`` at ``shape``."""
    import torch

    grid, prefix = shape.grid.size, shape.grid.prefix
    if op == "refine_keys":
        def call(impl, metric, w_down, w_up):
            torch.manual_seed(1)  # the dropout keep mask: every backend draws it with reference.dropout_keep_mask
            return (impl.refine_keys(metric, w_down, w_up, 1.0, 0.1, True),)
        return call, ("metric", "w_down", "w_up")
    if op == "checkerboard_similarity":
        return (lambda impl, metric: (impl.checkerboard_similarity(metric, grid, prefix),)), ("metric",)
    if op == "ste_match":
        return (lambda impl, scores: impl.ste_match(scores)), ("scores",)
    if op == "scatter_mean_merge":
        return (lambda impl, x, size: impl.scatter_mean_merge(x, size, tensors["index"], grid, prefix)), ("x", "size")
    if op == "scatter_mean_merge_dense":
        return (lambda impl, x, size, matching: impl.scatter_mean_merge_dense(x, size, matching, grid, prefix)), \
            ("x", "size", "matching")
    if op == "merge_tokens":
        return (lambda impl, x, metric, size: impl.merge_tokens(
            x, metric, size, grid_size=grid, num_prefix_tokens=prefix)), ("x", "metric", "size")
    raise ValueError(f"unknown op {op!r}")


def op_tensors(shape, batch: int, dtype, device: str) -> Dict[str, Any]:
    """Every tensor the ops take: the inputs, reference scores and matching (in float32 for 16-bit inputs, as
    checkerboard_similarity returns them), a random index and a soft matching."""
    import torch

    from .. import reference

    t = op_inputs(shape, batch, dtype, device)
    grid = shape.grid
    scores = reference.checkerboard_similarity(t["metric"], grid.size, grid.prefix)
    gen = torch.Generator(device=device).manual_seed(5)
    t["scores"] = scores
    t["index"] = torch.randint(0, grid.num_b, (batch, grid.num_a), generator=gen, device=device)
    logits = torch.randn(batch, grid.num_a, grid.num_b, generator=gen, device=device)
    t["matching"] = torch.softmax(logits, -1).to(dtype)
    return t


def output_grads(outputs: Sequence[Any], seed: int = 3) -> List[Any]:
    """Fixed random output gradients (None for integer outputs), the same for every backend."""
    import torch

    grads = []
    for k, out in enumerate(outputs):
        if out.is_floating_point():
            gen = torch.Generator(device=out.device).manual_seed(seed + k)
            g = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
            grads.append(g.masked_fill(torch.isinf(out), 0))
        else:
            grads.append(None)
    return grads


def run_op(impl, call, names, tensors, mode: str):
    """``(outputs, gradients of names)``: the forward in grad mode (``forward``, ``backward``) or under no_grad."""
    import torch

    leaves = {n: tensors[n].detach().clone().requires_grad_(mode != "no-grad") for n in names}
    if mode == "no-grad":
        with torch.no_grad():
            return call(impl, **leaves), ()
    outputs = call(impl, **leaves)
    if mode == "forward":
        return outputs, ()
    pairs = [(o, g) for o, g in zip(outputs, output_grads(outputs)) if g is not None and o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], [leaves[n] for n in names], [g for _, g in pairs],
                                allow_unused=True)
    return outputs, grads


def timed_call(impl, call, names, tensors, mode: str) -> Callable[[], Any]:
    """A zero-argument function running ``op`` in ``mode`` on inputs prepared once (no copies inside the timing):
    ``forward`` builds the graph, ``backward`` also computes every input gradient with torch.autograd.grad."""
    import torch

    leaves = {n: tensors[n].detach().clone().requires_grad_(mode != "no-grad") for n in names}
    if mode == "no-grad":
        return torch.no_grad()(lambda: call(impl, **leaves))
    if mode == "forward":
        return lambda: call(impl, **leaves)
    outputs = call(impl, **leaves)
    keep = [k for k, (o, g) in enumerate(zip(outputs, output_grads(outputs))) if g is not None and o.requires_grad]
    grads = [g for k, g in enumerate(output_grads(outputs)) if k in keep]
    inputs = [leaves[n] for n in names]

    def forward_backward():
        outs = call(impl, **leaves)
        return torch.autograd.grad([outs[k] for k in keep], inputs, grads, allow_unused=True)

    return forward_backward
