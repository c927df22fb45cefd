"""One row per compiled kernel, the occupancy estimate and the CI verdict on the rows.

Occupancy estimate (resident warps per SM, one kernel alone on the SM), with ``L`` the arch's limits in
``ARCH_LIMITS``, ``w`` warps per block, ``r`` registers per thread, ``s`` shared bytes per block::

    regs_per_warp   = ceil(r * 32 / 256) * 256                  (allocation granularity: 256 registers per warp)
    blocks_by_regs  = floor(floor(L.registers / regs_per_warp) / w)
    blocks_by_smem  = floor(L.shared_per_sm / (s + 1024))       (the driver reserves 1 KiB per block; inf if s == 0)
    blocks_by_warps = floor(L.max_warps / w)
    warps           = w * min(blocks_by_regs, blocks_by_smem, blocks_by_warps, L.max_blocks)

and 0 when ``s`` exceeds ``L.shared_per_block`` (the launch would fail).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Sequence


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (CUDA C Programming Guide, compute capabilities table)."""

    max_warps: int
    max_blocks: int
    registers: int
    shared_per_sm: int
    shared_per_block: int


ARCH_LIMITS = {
    80: ArchLimits(max_warps=64, max_blocks=32, registers=65536, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    86: ArchLimits(max_warps=48, max_blocks=16, registers=65536, shared_per_sm=100 * 1024, shared_per_block=99 * 1024),
    89: ArchLimits(max_warps=48, max_blocks=24, registers=65536, shared_per_sm=100 * 1024, shared_per_block=99 * 1024),
    90: ArchLimits(max_warps=64, max_blocks=32, registers=65536, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}


@dataclasses.dataclass
class KernelRow:
    """One compiled kernel: ``backend`` is "triton" or "cuda"; ``dot_16bit`` counts dot products with 16-bit
    operands (Triton ``tt.dot``; unknown = 0 for CUDA C++), ``mma`` the tensor-core instructions in the SASS."""

    backend: str
    kernel: str
    config: str
    dtype: str
    arch: int
    registers: int
    stack_bytes: int
    shared_bytes: int
    warps_per_block: int
    occupancy_warps: int
    dots: int
    dot_16bit: int
    mma: int
    tensor_cores: str
    signature: str = ""


def occupancy_warps(arch: int, registers: int, shared_bytes: int, warps_per_block: int) -> int:
    """Resident warps per SM from registers and shared memory (formula in the module docstring)."""
    limits = ARCH_LIMITS[arch]
    if shared_bytes > limits.shared_per_block:
        return 0
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks_by_regs = (limits.registers // regs_per_warp) // warps_per_block
    blocks_by_smem = limits.shared_per_sm // (shared_bytes + 1024) if shared_bytes else limits.max_blocks
    blocks_by_warps = limits.max_warps // warps_per_block
    return warps_per_block * min(blocks_by_regs, blocks_by_smem, blocks_by_warps, limits.max_blocks)


def check(rows: Iterable[KernelRow]) -> List[str]:
    """The CI verdict: one line per problem (empty = ready). No stack use (spills), shared memory within the arch's
    per-block limit, at least one resident block, and every dot with 16-bit operands on tensor cores."""
    problems = []
    for row in rows:
        name = f"{row.backend} {row.kernel} [{row.config}] {row.dtype} sm_{row.arch}"
        if row.stack_bytes:
            problems.append(f"{name}: {row.stack_bytes} bytes of stack (register spills / local memory)")
        if row.shared_bytes > ARCH_LIMITS[row.arch].shared_per_block:
            problems.append(f"{name}: {row.shared_bytes} bytes of shared memory > "
                            f"{ARCH_LIMITS[row.arch].shared_per_block} per block")
        elif row.occupancy_warps == 0:
            problems.append(f"{name}: not even one block fits on an SM")
        if row.dot_16bit and not row.mma:
            problems.append(f"{name}: {row.dot_16bit} 16-bit dot product(s) but no HMMA/HGMMA in the SASS")
    return problems


def format_rows(rows: Sequence[KernelRow]) -> str:
    """A markdown table of the rows."""
    header = ("| backend | kernel | config | dtype | arch | regs | stack B | smem B | warps/blk | warps/SM "
              "| tensor cores |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.backend} | {r.kernel} | {r.config} | {r.dtype} | sm_{r.arch} | {r.registers} "
                     f"| {r.stack_bytes} | {r.shared_bytes} | {r.warps_per_block} | {r.occupancy_warps} "
                     f"| {r.tensor_cores} |")
    return "\n".join(lines)
