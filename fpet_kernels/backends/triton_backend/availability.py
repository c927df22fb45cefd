"""Whether the Triton backend can run here. Imports nothing heavy at module import time: the backend registry
(:mod:`fpet_kernels.backends`) calls :func:`unavailable_reason` before it first imports the backend."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["unavailable_reason"]


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here; otherwise why not, and how to get them. Imports triton and this
    backend (which registers the ``fpet_triton`` ops); a missing or broken triton gives a reason, never an error."""
    try:
        import triton  # noqa: F401

        from . import library  # noqa: F401  (the kernels and the op registration)
    except Exception as error:
        return f"triton could not be loaded ({type(error).__name__}: {error}); install it with `pip install triton`"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return ("no CUDA device is available (the Triton kernels need an NVIDIA GPU; set TRITON_INTERPRET=1 before "
                "importing them to run them slowly on CPU tensors)")
    return None
