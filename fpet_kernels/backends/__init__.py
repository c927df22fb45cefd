"""The backend registry (docs/design.md §4): every implementation of the FPET ops, with what it runs on.

One :class:`Backend` per implementation: its name, why it cannot run here (``None`` when it can), the device types
and dtypes it takes, and the tolerance per dtype to which it matches the reference. :mod:`fpet_kernels.ops`, the
tests and the benchmarks read these entries instead of keeping lists of their own.

Discovery is lazy: importing this module imports neither triton nor the compiled extension. A backend's
availability is probed, and its implementation module imported, the first time something asks for it (an op call,
``available_backends()``). Every implementation module has the same six functions with the reference's signatures
(``refine_keys``, ``checkerboard_similarity``, ``ste_match``, ``scatter_mean_merge``, ``scatter_mean_merge_dense``,
``merge_tokens``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from types import ModuleType
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "OPS",
    "Backend",
    "BackendUnavailableError",
    "Tolerance",
    "available_backends",
    "get_backend",
    "resolve_backend",
]

OPS = ("refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "scatter_mean_merge_dense",
       "merge_tokens")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise (``torch.testing.assert_close``)."""

    atol: float
    rtol: float


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    ``forward`` / ``grad``: per dtype, the tolerance to which its outputs / gradients match the reference's at the
    same inputs (scores and sums in float32; 16-bit outputs are rounded to their dtype). The reference matches
    itself exactly.
    """

    name: str
    module: str
    description: str
    dtypes: Tuple[torch.dtype, ...]
    forward: Mapping[torch.dtype, Tolerance]
    grad: Mapping[torch.dtype, Tolerance]
    _devices: Callable[[], Tuple[str, ...]]
    _probe: Callable[[], Optional[str]]

    @property
    def devices(self) -> Tuple[str, ...]:
        """Device types of the tensors it takes."""
        return self._devices()

    def unavailable_reason(self) -> Optional[str]:
        """None when it can run here; otherwise why not and how to get it (probed once per process)."""
        return _probe(self.name)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def implementation(self) -> ModuleType:
        """The implementation module; BackendUnavailableError when it cannot run here."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {self.name!r} is not available: {reason}. "
                f"Use backend='reference' (or 'auto', which falls back to it). Available: {available_backends()}"
            )
        return importlib.import_module(self.module)

    def check_dtype(self, name: str, tensor: torch.Tensor) -> None:
        """TypeError unless it computes in the dtype of ``tensor`` (the argument called ``name``)."""
        if tensor.dtype not in self.dtypes:
            others = [b.name for b in _REGISTRY.values() if tensor.dtype in b.dtypes and b.name != self.name]
            supported = ", ".join(str(dtype).replace("torch.", "") for dtype in self.dtypes)
            raise TypeError(
                f"the {self.name} backend supports {supported} {name}, got {tensor.dtype}; use "
                f"backend={' or '.join(repr(o) for o in others)} for {str(tensor.dtype).replace('torch.', '')}"
            )

    def check_device(self, device: torch.device) -> None:
        """ValueError unless it takes tensors on ``device``."""
        if device.type not in self.devices:
            others = [b.name for b in _REGISTRY.values() if device.type in b.devices and b.name != "reference"]
            hint = f"backend={others[0]!r}, " if others else ""
            raise ValueError(
                f"backend {self.name!r} runs on {' / '.join(self.devices)} tensors, got a tensor on {device}; use "
                f"{hint}'reference' or 'auto'"
            )


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _no_reason() -> Optional[str]:
    return None


def _compiled_reason(device: str) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        from . import compiled

        return compiled.unavailable_reason(device)

    return probe


def _triton_reason() -> Optional[str]:
    from .triton_backend.availability import unavailable_reason

    return unavailable_reason()


def _tolerances(table: Mapping[torch.dtype, Tuple[float, float]]) -> Dict[torch.dtype, Tolerance]:
    return {dtype: Tolerance(*values) for dtype, values in table.items()}


_EXACT = _tolerances({dtype: (0.0, 0.0) for dtype in FLOAT_DTYPES})
# The compiled kernels sum in a different order than the reference (GEMMs, fused loops); bfloat16 / float16 outputs
# are rounded to 8 / 11 bits of mantissa.
_COMPILED_FORWARD = _tolerances({torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 2e-5),
                                 torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)})
_COMPILED_GRAD = _tolerances({torch.float64: (1e-11, 1e-9), torch.float32: (2e-5, 1e-4),
                              torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-3, 5e-3)})
# Triton: tf32x3 dots and on-chip blocked sums.
_TRITON_FORWARD = _tolerances({torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2),
                               torch.float16: (2e-3, 2e-3)})
_TRITON_GRAD = _tolerances({torch.float32: (5e-5, 1e-4), torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-3, 5e-3)})

_REGISTRY: Dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", "fpet_kernels.reference", "pure PyTorch, autograd: the ground truth", FLOAT_DTYPES,
                _EXACT, _EXACT, lambda: ("cpu", "cuda"), _no_reason),
        Backend("cpp", "fpet_kernels.backends.compiled", "C++ CPU kernels of fpet_kernels._C (torch.ops.fpet)",
                FLOAT_DTYPES, _COMPILED_FORWARD, _COMPILED_GRAD, lambda: ("cpu",), _compiled_reason("cpu")),
        Backend("cuda", "fpet_kernels.backends.compiled", "CUDA kernels of fpet_kernels._C (torch.ops.fpet)",
                FLOAT_DTYPES, _COMPILED_FORWARD, _COMPILED_GRAD, lambda: ("cuda",), _compiled_reason("cuda")),
        Backend("triton", "fpet_kernels.backends.triton_backend",
                "Triton kernels (torch.ops.fpet_triton); CPU tensors under TRITON_INTERPRET=1",
                (torch.float32, torch.bfloat16, torch.float16), _TRITON_FORWARD, _TRITON_GRAD,
                lambda: ("cpu",) if _interpreting_triton() else ("cuda",), _triton_reason),
    )
}
BACKENDS = ("auto", *_REGISTRY)
# backend="auto": the first available backend of this list for the device type, else the reference.
_AUTO_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> Optional[str]:
    return _REGISTRY[name]._probe()


def get_backend(name: str) -> Backend:
    """The registry entry of ``name`` (ValueError for an unknown name)."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _REGISTRY[name]


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that can run in this installation (``auto`` excluded)."""
    return tuple(name for name, backend in _REGISTRY.items() if backend.available)


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend ``backend`` names for tensors on ``device`` (``auto``: by device type, see docs/design.md §4).

    Raises ValueError for an unknown name or a device the backend does not take, BackendUnavailableError for a
    backend that cannot run here."""
    if backend == "auto":
        preference = _AUTO_PREFERENCE.get(device.type, ())
        chosen = next((_REGISTRY[name] for name in preference if _REGISTRY[name].available), _REGISTRY["reference"])
        if chosen.name == "reference" and device.type == "cpu":
            from . import compiled

            compiled.warn_fallback_once()  # the C++ extension is missing: say once how to build it
        return chosen
    entry = get_backend(backend)
    entry.implementation()  # raises when unavailable
    entry.check_device(device)
    return entry
