"""Public functional API of the FPET ops, with input checks and backend dispatch (SPEC section 4).

Every op takes ``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``. ``auto`` picks by device: for a CUDA
tensor triton if importable, else cuda; for a CPU tensor cpp if built; the pure-PyTorch ``reference`` otherwise.
Asking by name for a backend that is not available raises :class:`BackendUnavailableError` saying how to get it.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch

from . import compiled, reference
from . import triton as triton_backend

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "refine_keys",
    "checkerboard_similarity",
    "ste_match",
    "scatter_mean_merge",
    "merge_tokens",
]

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


# Why each compiled backend cannot run here; a backend missing from this dict is available.
_UNAVAILABLE = dict(compiled.unavailable_reasons())  # cpp / cuda: fpet_kernels._C not built, no CUDA kernels or device
_TRITON_REASON = triton_backend.unavailable_reason()  # triton missing, or neither a GPU nor TRITON_INTERPRET=1
if _TRITON_REASON is not None:
    _UNAVAILABLE["triton"] = _TRITON_REASON
_IMPLEMENTATIONS = {"reference": reference, "cpp": compiled.cpp, "cuda": compiled.cuda, "triton": triton_backend}


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that can run in this installation (``auto`` excluded)."""
    return tuple(name for name in BACKENDS[1:] if name not in _UNAVAILABLE)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend name for ``backend`` on ``device``; raises for an unknown or unavailable one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        preference = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
        chosen = next((name for name in preference if name not in _UNAVAILABLE), "reference")
        if chosen == "reference" and device.type == "cpu":
            compiled.warn_fallback_once()  # the C++ extension is missing: say once how to build it
        return chosen
    if backend in _UNAVAILABLE:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available: {_UNAVAILABLE[backend]}. "
            f"Use backend='reference' (or 'auto', which falls back to it). Available: {available_backends()}"
        )
    return backend


def _implementation(backend: str, device: torch.device) -> ModuleType:
    return _IMPLEMENTATIONS[resolve_backend(backend, device)]


# ---------------------------------------------------------------------------------------------- input checks
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
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


def _check_grid(grid_size: Sequence[int], num_prefix_tokens: int, num_tokens: int, name: str) -> Tuple[int, int]:
    if len(grid_size) != 2 or any(int(g) != g or g < 1 for g in grid_size):
        raise ValueError(f"grid_size must be two positive ints (H, W), got {tuple(grid_size)}")
    height, width = int(grid_size[0]), int(grid_size[1])
    if int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if height * width < 2:
        raise ValueError(f"grid_size {height}x{width} has fewer than 2 patches; merging needs H*W >= 2")
    if num_tokens != num_prefix_tokens + height * width:
        raise ValueError(
            f"{name} has N={num_tokens} tokens but num_prefix_tokens + H*W = "
            f"{num_prefix_tokens} + {height}*{width} = {num_prefix_tokens + height * width}"
        )
    return height, width


def _check_size(size: Optional[torch.Tensor], batch: int, num_tokens: int) -> None:
    if size is None:
        return
    _check_float("size", size)
    if tuple(size.shape) != (batch, num_tokens):
        raise ValueError(f"size must have shape [B, N] = [{batch}, {num_tokens}], got {tuple(size.shape)}")


def _check_scores(scores: torch.Tensor) -> None:
    _check_float("scores", scores)
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [B, NA, NB], got {tuple(scores.shape)}")


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
    """Key refinement adapter ``m + scale * Up(Dropout(ReLU(Down(m))))`` (SPEC section 2, step 2).

    metric ``[B, N, Dh]``, w_down ``[d, Dh]``, w_up ``[Dh, d]`` (effective weights, nn.Linear layout)
    -> refined metric ``[B, N, Dh]``.
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
    impl = _implementation(backend, metric.device)
    return impl.refine_keys(metric, w_down, w_up, scale, dropout_p, training)


def checkerboard_similarity(
    metric: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int, *, backend: str = "auto"
) -> torch.Tensor:
    """Cosine scores of A tokens vs B tokens: metric ``[B, N, Dh]`` -> ``[B, NA, NB]`` float32 (float64 for
    float64 input), prefix columns ``-inf`` (SPEC section 2, steps 3-4)."""
    _check_tokens("metric", metric)
    grid = _check_grid(grid_size, num_prefix_tokens, metric.shape[1], "metric")
    impl = _implementation(backend, metric.device)
    return impl.checkerboard_similarity(metric, grid, int(num_prefix_tokens))


def ste_match(scores: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Straight-through matching: scores ``[B, NA, NB]`` -> ``(matching [B, NA, NB], index [B, NA] int64)``;
    the matching is one-hot in value with the sigmoid STE gradient (SPEC section 2, step 5)."""
    _check_scores(scores)
    if scores.shape[-1] < 1:
        raise ValueError("scores must have at least one B column")
    impl = _implementation(backend, scores.device)
    return impl.ste_match(scores)


def scatter_mean_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    matching: torch.Tensor,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean merge of A tokens into their matched B tokens (SPEC section 2, step 6).

    x ``[B, N, C]``, size ``[B, N]`` or None, matching ``[B, NA, NB]`` float or index ``[B, NA]`` int64
    -> ``(x_merged [B, NB, C], size_merged [B, NB])``.
    """
    _check_tokens("x", x)
    batch, num_tokens = x.shape[:2]
    grid = _check_grid(grid_size, num_prefix_tokens, num_tokens, "x")
    _check_size(size, batch, num_tokens)
    num_a = (grid[0] * grid[1] + 1) // 2
    num_b = num_prefix_tokens + grid[0] * grid[1] // 2
    if matching.dtype == torch.int64:
        if tuple(matching.shape) != (batch, num_a):
            raise ValueError(f"matching index must have shape [B, NA] = [{batch}, {num_a}], got {tuple(matching.shape)}")
        if matching.numel() and (int(matching.min()) < num_prefix_tokens or int(matching.max()) >= num_b):
            raise ValueError(f"matching index values must lie in [P, NB) = [{num_prefix_tokens}, {num_b})")
    else:
        _check_float("matching", matching)
        if tuple(matching.shape) != (batch, num_a, num_b):
            raise ValueError(
                f"matching must have shape [B, NA, NB] = [{batch}, {num_a}, {num_b}], got {tuple(matching.shape)}"
            )
    _check_same_device(x=x, size=size, matching=matching)
    impl = _implementation(backend, x.device)
    return impl.scatter_mean_merge(x, size, matching, grid, int(num_prefix_tokens))


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarity + STE match + size-weighted merge as one op (SPEC section 2, steps 3-6).

    x ``[B, N, C]``, metric ``[B, N, Dh]``, size ``[B, N]`` or None -> ``(x_merged [B, NB, C] in x.dtype,
    size_merged [B, NB] float32, float64 for float64 x)``. When no gradient is needed it takes the fast path
    (argmax + scatter, no matching matrix); the forward values are the same.
    """
    _check_tokens("x", x)
    _check_tokens("metric", metric)
    batch, num_tokens = x.shape[:2]
    if tuple(metric.shape[:2]) != (batch, num_tokens):
        raise ValueError(
            f"metric must have shape [B, N, Dh] with B, N of x = ({batch}, {num_tokens}), got {tuple(metric.shape)}"
        )
    grid = _check_grid(grid_size, num_prefix_tokens, num_tokens, "x")
    _check_size(size, batch, num_tokens)
    _check_same_device(x=x, metric=metric, size=size)
    impl = _implementation(backend, x.device)
    return impl.merge_tokens(x, metric, size, grid_size=grid, num_prefix_tokens=int(num_prefix_tokens))
