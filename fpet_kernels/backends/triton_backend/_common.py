"""Helpers shared by the Triton kernels: launch settings and the in-kernel checkerboard token maps (docs/design.md §2
step 3).

The host side takes the geometry (NA, NB, token counts) from :class:`fpet_kernels.geometry.Checkerboard`; the
@triton.jit maps below are the same maps inside a kernel, over blocks of positions.
"""
from __future__ import annotations

import os
from typing import List

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

from . import SUPPORTED_DTYPES  # noqa: F401  (defined with the host-side checks; the GPU report reads it here)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: a launch that ``torch.compile`` traces into. Under the interpreter
    some torch versions (2.11 among them) refuse interpreted kernels ("wrap_triton only works on functions annotated
    with triton.jit or triton.autotune"), and every torch refuses the stand-in of :func:`autotune`; there the kernel
    itself is launched (torch.compile of the Triton ops needs a GPU anyway)."""
    try:
        return _torch_wrap_triton(kernel)
    except RuntimeError:
        if INTERPRET or getattr(kernel, "_fpet_autotune_stand_in", False):  # see autotune()
            return kernel
        raise


def autotune_configs(configs: List[triton.Config]) -> List[triton.Config]:
    """All configs on a GPU; the first one only under the interpreter (it cannot time kernels)."""
    return configs[:1] if INTERPRET else configs


def autotune(configs: List[triton.Config], key: List[str]):
    """``triton.autotune`` over :func:`autotune_configs`. Without a GPU driver, triton < 3.4 cannot build an Autotuner
    at all ("0 active drivers"; under the interpreter, or when the GPU report compiles for GPU targets on a CPU
    machine): there the first config's meta-parameters are bound with ``triton.heuristics`` instead (what a
    one-config autotuner passes), and its ``configs`` attribute lists the configs for the GPU report."""

    def decorate(fn):
        try:
            return triton.autotune(configs=autotune_configs(configs), key=key)(fn)
        except RuntimeError as error:
            if "active driver" not in str(error):
                raise
            first = configs[0]
            values = {name: (lambda args, value=value: value) for name, value in first.kwargs.items()}
            bound = triton.heuristics(values)(fn)
            bound.configs = autotune_configs(configs)
            bound._fpet_autotune_stand_in = True  # wrap_triton refuses it: launched directly (no GPU here)
            return bound

    return decorate


def padded(n: int, minimum: int = 16) -> int:
    """Power-of-two block covering ``n`` (at least ``minimum``, the smallest tl.dot operand size)."""
    return max(minimum, triton.next_power_of_2(n))


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are upcast to float32 first (and multiplied as tf32x3, float32-level accuracy): always
    for float32 inputs, and for bfloat16 under the interpreter, whose bfloat16 tl.dot is wrong. On a GPU, 16-bit
    operands go to the tensor cores as they are; their products are exact and the sums accumulate in float32."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


@triton.jit
def a_token(i, width, num_prefix):
    """Token index of A position ``i``: the i-th grid cell with even ``r + c``, row-major. For odd W it is cell 2i;
    for even W each row holds W/2 A cells, shifted by one on odd rows. The in-kernel form of
    :meth:`fpet_kernels.geometry.Checkerboard.a_token` (and ``Checkerboard::a_token`` of ``csrc/fpet_math.h``)."""
    even_width = 1 - width % 2
    return num_prefix + 2 * i + ((2 * i // width) & 1) * even_width


@triton.jit
def b_token(j, width, num_prefix):
    """Token index of B position ``j``: the prefix tokens first, then the cells with odd ``r + c``, row-major. The
    in-kernel form of :meth:`fpet_kernels.geometry.Checkerboard.b_token` (and ``Checkerboard::b_token`` of
    ``csrc/fpet_math.h``)."""
    even_width = 1 - width % 2
    jj = tl.maximum(j - num_prefix, 0)
    cell = 2 * jj + 1 - ((2 * jj // width) & 1) * even_width
    return tl.where(j < num_prefix, j, num_prefix + cell)


@triton.jit
def token_to_ab(n, width, num_prefix):
    """Inverse map: token ``n`` -> (is an A token, its position in A or in B). Inverts :func:`a_token` and
    :func:`b_token` through the rank ``q // 2`` of cell ``q`` among its own set, as described in
    :mod:`fpet_kernels.geometry` (``Checkerboard`` there and in ``csrc/fpet_math.h``)."""
    cell = tl.maximum(n - num_prefix, 0)
    row = cell // width
    col = cell % width
    is_a = (n >= num_prefix) & ((row + col) % 2 == 0)
    position = tl.where(n < num_prefix, n, tl.where(is_a, cell // 2, num_prefix + cell // 2))
    return is_a, position
