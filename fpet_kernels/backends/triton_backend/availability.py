"""Whether the Triton backend can run here. Imports nothing heavy at module import time: the backend registry
(:mod:`fpet_kernels.backends`) calls :func:`unavailable_reason` before it first imports the backend."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["MIN_TRITON", "unavailable_reason"]

# The oldest triton the kernels are tested with (under the interpreter, with torch 2.7.1). Triton 3.2's interpreter
# corrupts memory on the merge's inverse-index kernel (a masked scatter store), so 3.2 is refused, not guessed at.
MIN_TRITON = (3, 3)


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here; otherwise why not, and how to get them. Imports triton and this
    backend (which registers the ``fpet_triton`` ops); a missing or broken triton gives a reason, never an error."""
    try:
        import triton
    except Exception as error:
        return f"triton could not be loaded ({type(error).__name__}: {error}); install it with `pip install triton`"
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRITON:
        return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the Triton "
                "backend supports (torch 2.6 comes with triton 3.2: use torch >= 2.7, or the cuda backend)")
    try:
        from . import library  # noqa: F401  (the kernels and the op registration)
    except Exception as error:
        return f"the Triton backend could not be loaded ({type(error).__name__}: {error})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return ("no CUDA device is available (the Triton kernels need an NVIDIA GPU; set TRITON_INTERPRET=1 before "
                "importing them to run them slowly on CPU tensors)")
    return None
