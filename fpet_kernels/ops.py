"""Public functional API of the FPET ops, with input checks and backend dispatch (docs/design.md §4).

Every op takes ``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``, looked up in the backend registry
(:mod:`fpet_kernels.backends`). ``auto`` picks by device: for a CUDA tensor triton if it can run, else cuda; for a
CPU tensor cpp if built; the pure-PyTorch ``reference`` otherwise. Asking by name for a backend that is not
available raises :class:`BackendUnavailableError` saying how to get it; a backend given tensors of a device or
dtype it does not take raises a ValueError / TypeError naming the argument.

The checks here read shapes and Python numbers only: no op synchronises with the device, so every op traces under
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch

from .backends import (
    BACKENDS,
    FLOAT_DTYPES,
    BackendUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
)
from .geometry import Checkerboard

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "scatter_mean_merge_dense",
    "merge_tokens",
    "unmerge_tokens",
]


# ---------------------------------------------------------------------------------------------- input checks
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")


def _check_tokens(name: str, t: torch.Tensor) -> None:
    _check_float(name, t)
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, D], got {tuple(t.shape)}")


def _check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")


def _grid(grid_size: Sequence[int], num_prefix_tokens: int, num_tokens: int, name: str) -> Checkerboard:
    grid = Checkerboard.of(grid_size, num_prefix_tokens)
    grid.check_tokens(num_tokens, name)
    return grid


def _check_size(size: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """Token sizes: ``[B, N]``, float32 (float64 for float64 ``x``: sizes are counts, which half precision cannot
    hold), every value finite and > 0 (checked as :func:`_check_index_range` checks an index)."""
    if size is None:
        return
    _check_float("size", size)
    batch, num_tokens = x.shape[0], x.shape[1]
    if tuple(size.shape) != (batch, num_tokens):
        raise ValueError(f"size must have shape [B, N] = [{batch}, {num_tokens}], got {tuple(size.shape)}")
    expected = torch.float64 if x.dtype == torch.float64 else torch.float32
    if size.dtype != expected:
        raise TypeError(f"size must be {expected} for x of dtype {x.dtype} (token sizes are counts), got {size.dtype}")
    if size.numel() == 0:
        return
    valid = (size > 0).logical_and(size.isfinite()).all()
    message = "size must hold finite token sizes > 0 (a token of size s stands for s patches)"
    if size.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid):
            raise ValueError(message)
    else:
        torch._assert_async(valid, message)


def _check_precision(**tensors: torch.Tensor) -> None:
    """float64 inputs are not mixed with lower precisions (a float64 op is a reference or gradcheck computation)."""
    wide = {name for name, t in tensors.items() if t.dtype == torch.float64}
    if wide and len(wide) != len(tensors):
        listing = ", ".join(f"{k} {v.dtype}" for k, v in tensors.items())
        raise TypeError(f"float64 cannot be mixed with other dtypes here, got {listing}")


def _check_index_range(index: torch.Tensor, grid: Checkerboard) -> None:
    """Every A token must go to a B patch: ``P <= k(i) < NB``. Checked in Python for CPU tensors in eager mode (no
    device to wait for); on a GPU, and under torch.compile, as an asynchronous assert (no host sync)."""
    message = f"matching index values must lie in [P, NB) = [{grid.prefix}, {grid.num_b})"
    if index.numel() == 0:
        return
    in_range = ((index >= grid.prefix) & (index < grid.num_b)).all()
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(in_range):
            raise ValueError(message)
    else:
        torch._assert_async(in_range, message)


def _resolved(backend: str, device_type: str) -> str:
    """The name of the backend that runs ``backend`` for tensors of ``device_type``, its module imported. Runs
    eagerly under torch.compile too (a constant of the graph): probing imports modules and registers ops."""
    chosen = resolve_backend(backend, torch.device(device_type))
    chosen.implementation()
    return chosen.name


# What torch.compiler.assume_constant_result(_resolved) does, without importing torch._dynamo (and triton) here.
_resolved._dynamo_marked_constant = True


def _implementation(backend: str, tensors: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> ModuleType:
    """The module of the backend that runs these tensors (named for the errors; the first one's device decides),
    after checking that the backend takes their dtypes."""
    chosen = get_backend(_resolved(backend, tensors[0][1].device.type))
    for name, tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            chosen.check_dtype(name, tensor)
    return sys.modules[chosen.module]


# ---------------------------------------------------------------------------------------------- the ops
def refine_keys(
    metric: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Key refinement adapter ``m + scale * Up(Dropout(ReLU(Down(m))))`` (docs/design.md §2 step 2).

    metric ``[B, N, Dh]``, w_down ``[d, Dh]``, w_up ``[Dh, d]`` (effective weights, nn.Linear layout)
    -> refined metric ``[B, N, Dh]``. Dropout is active when ``training`` and ``dropout_p > 0``.
    """
    _check_tokens("metric", metric)
    _check_float("w_down", w_down)
    _check_float("w_up", w_up)
    dh = metric.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != dh:
        raise ValueError(f"w_down must have shape [d, Dh={dh}], got {tuple(w_down.shape)}")
    if tuple(w_up.shape) != (dh, w_down.shape[0]):
        raise ValueError(f"w_up must have shape [Dh, d] = [{dh}, {w_down.shape[0]}], got {tuple(w_up.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _check_same_device(metric=metric, w_down=w_down, w_up=w_up)
    if not metric.dtype == w_down.dtype == w_up.dtype:
        raise TypeError(f"metric, w_down and w_up must have one dtype, got {metric.dtype}, {w_down.dtype}, "
                        f"{w_up.dtype} (TokenMerger casts its weights to the metric's dtype)")
    impl = _implementation(backend, [("metric", metric), ("w_down", w_down), ("w_up", w_up)])
    return impl.refine_keys(metric, w_down, w_up, scale, dropout_p, training)


def checkerboard_similarity(
    metric: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int, *, backend: str = "auto"
) -> torch.Tensor:
    """Cosine scores of A tokens vs B tokens: metric ``[B, N, Dh]`` -> ``[B, NA, NB]`` float32 (float64 for
    float64 input), prefix columns ``-inf`` (docs/design.md §2 steps 3-4)."""
    _check_tokens("metric", metric)
    grid = _grid(grid_size, num_prefix_tokens, metric.shape[1], "metric")
    impl = _implementation(backend, [("metric", metric)])
    return impl.checkerboard_similarity(metric, grid.size, grid.prefix)


def ste_match(scores: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Straight-through matching: scores ``[B, NA, NB]`` -> ``(matching [B, NA, NB], index [B, NA] int64)``;
    the matching is one-hot in value with the sigmoid STE gradient (docs/design.md §2 step 5)."""
    _check_float("scores", scores)
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [B, NA, NB], got {tuple(scores.shape)}")
    if scores.shape[-1] < 1:
        raise ValueError("scores must have at least one B column")
    impl = _implementation(backend, [("scores", scores)])
    return impl.ste_match(scores)


def _merge_geometry(x: torch.Tensor, size: Optional[torch.Tensor], grid_size, num_prefix_tokens) -> Checkerboard:
    """The checks shared by the two merges: tokens x on the grid, sizes [B, N] or None."""
    _check_tokens("x", x)
    grid = _grid(grid_size, num_prefix_tokens, x.shape[1], "x")
    _check_size(size, x)
    return grid


def scatter_mean_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    index: torch.Tensor,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean merge of every A token into its matched B token ``k(i)`` (docs/design.md §2 step 6).

    x ``[B, N, C]``, size ``[B, N]`` or None, index ``[B, NA]`` int64 with values in ``[P, NB)``
    -> ``(x_merged [B, NB, C], size_merged [B, NB])``. For a float matching use :func:`scatter_mean_merge_dense`.
    """
    grid = _merge_geometry(x, size, grid_size, num_prefix_tokens)
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"index must be an int64 tensor [B, NA], got {got}; for a float matching [B, NA, NB] use "
                        "scatter_mean_merge_dense")
    if tuple(index.shape) != (x.shape[0], grid.num_a):
        raise ValueError(f"matching index must have shape [B, NA] = [{x.shape[0]}, {grid.num_a}], "
                         f"got {tuple(index.shape)}")
    _check_same_device(x=x, size=size, index=index)
    _check_index_range(index, grid)
    impl = _implementation(backend, [("x", x), ("size", size)])
    return impl.scatter_mean_merge(x, size, index, grid.size, grid.prefix)


def scatter_mean_merge_dense(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    matching: torch.Tensor,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The merge of :func:`scatter_mean_merge` through a float matching ``M [B, NA, NB]`` (e.g. the STE matching of
    :func:`ste_match`; gradients flow into it): ``x'_j = (s_B x_B + sum_i M[i, j] s_A[i] x_A[i]) / Z_j``
    (docs/design.md §2 step 6) -> ``(x_merged [B, NB, C], size_merged [B, NB])``."""
    grid = _merge_geometry(x, size, grid_size, num_prefix_tokens)
    _check_float("matching", matching)
    if tuple(matching.shape) != (x.shape[0], grid.num_a, grid.num_b):
        raise ValueError(f"matching must have shape [B, NA, NB] = [{x.shape[0]}, {grid.num_a}, {grid.num_b}], "
                         f"got {tuple(matching.shape)}")
    _check_same_device(x=x, size=size, matching=matching)
    impl = _implementation(backend, [("x", x), ("size", size), ("matching", matching)])
    return impl.scatter_mean_merge_dense(x, size, matching, grid.size, grid.prefix)


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarity + STE match + size-weighted merge as one op (docs/design.md §2 steps 3-6).

    x ``[B, N, C]``, metric ``[B, N, Dh]``, size ``[B, N]`` or None -> ``(x_merged [B, NB, C] in x.dtype,
    size_merged [B, NB] float32, float64 for float64 x)``. When no gradient is needed it takes the fast path
    (argmax + scatter, no matching matrix); the forward values are the same.
    """
    grid = _merge_geometry(x, size, grid_size, num_prefix_tokens)
    _check_tokens("metric", metric)
    if tuple(metric.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(
            f"metric must have shape [B, N, Dh] with B, N of x = {tuple(x.shape[:2])}, got {tuple(metric.shape)}"
        )
    _check_same_device(x=x, metric=metric, size=size)
    _check_precision(x=x, metric=metric)
    impl = _implementation(backend, [("x", x), ("metric", metric), ("size", size)])
    return impl.merge_tokens(x, metric, size, grid_size=grid.size, num_prefix_tokens=grid.prefix)


def unmerge_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """The merge's inverse for dense outputs: merged tokens back on the full patch grid (docs/design.md §2 step 10).

    x ``[B, NB, C]`` (tokens after a merge, e.g. a later block's output), index ``[B, NA]`` int64 with values in
    ``[P, NB)`` (the merge assignment ``k(i)``, :class:`fpet_kernels.vit_patch.MergeInfo`) -> ``[B, N, C]``,
    ``N = P + H*W``: prefix tokens and B cells take their own token, A cell ``i`` takes token ``k(i)``. Gradients flow
    into ``x`` (summed over the cells that share a token). One gather, the same on every device and dtype (no
    backend of its own); it traces under ``torch.compile``.
    """
    _check_tokens("x", x)
    grid = Checkerboard.of(grid_size, num_prefix_tokens)
    if x.shape[1] != grid.num_b:
        raise ValueError(f"x has {x.shape[1]} tokens but a merge on this grid leaves NB = P + floor(H*W / 2) = "
                         f"{grid.prefix} + {grid.cells // 2} = {grid.num_b}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"index must be an int64 tensor [B, NA], got {got}")
    if tuple(index.shape) != (x.shape[0], grid.num_a):
        raise ValueError(f"index must have shape [B, NA] = [{x.shape[0]}, {grid.num_a}], got {tuple(index.shape)}")
    _check_same_device(x=x, index=index)
    _check_index_range(index, grid)
    batch = x.shape[0]
    idx_a, idx_b = grid.indices(x.device)
    source = index.new_empty(batch, grid.num_tokens)
    source[:, idx_b] = torch.arange(grid.num_b, device=x.device).expand(batch, -1)
    source[:, idx_a] = index
    return x.gather(1, source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
