"""scatter_mean_merge (index and dense) and the fused merge_tokens backward (docs/design.md §2 step 6; §3).

Forward (one-hot matching): an inverse index (A rows grouped by matched B column, ascending A position) is built
deterministically, then every B row sums its members in that fixed order: no float atomics, same result run to
run. Forward with a dense float matching: ``T = s_B x_B + M^T (s_A x_A)`` as a blocked GEMM.

Backward, with ``gz_j = g_j / Z_j`` and ``q_j = <x'_j, g_j> / Z_j - h_j``:
``dL/dx_n = s_n gz_j(n)``, ``dL/ds_n = <x_n, gz_j(n)> - q_j(n)`` for every token n (j(n) = k(n) for A tokens),
``dL/dM[i, j] = s_A[i] (<x_A[i], gz_j> - q_j)``. ``x'`` is the merged output in x's dtype.

The merge_tokens backward saves no matching state: it re-runs the similarity kernel's WRITE_MATCH launch
(:func:`launch_match`) for the argmax, the second column and the threshold of every A row.

The launchers take the geometry as a :class:`fpet_kernels.geometry.Checkerboard`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...geometry import Checkerboard
from ._common import a_token, autotune, b_token, dot_in_float32, padded, token_to_ab, wrap_triton
from .match import ste_sigmoid_slope
from .similarity import a_block_rows, launch_cosine_backward_b, launch_match, store_grad_a, unit_rows


# ------------------------------------------------------------------------------------ inverse index (counting sort)
@triton.jit
def _inverse_index_kernel(
    index_ptr, order_ptr, offsets_ptr, NA, NB,
    BLOCK_NA: tl.constexpr, BLOCK_OFFSETS: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per batch element: ``order [NA]`` lists the A positions sorted by (k(i), i) and
    ``offsets [NB + 1]`` the start of each B column's run in it. Position of i = #{i' : (k(i'), i') < (k(i), i)}."""
    batch = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_NA)
    i_mask = offs_i < NA
    key_i = tl.load(index_ptr + batch * NA + offs_i, mask=i_mask, other=NB).to(tl.int32) * NA + offs_i
    offs_j = tl.arange(0, BLOCK_OFFSETS)
    position = tl.zeros([BLOCK_NA], tl.int32)
    count_below = tl.zeros([BLOCK_OFFSETS], tl.int32)
    for start in range(0, NA, CHUNK):
        offs_c = start + tl.arange(0, CHUNK)
        c_mask = offs_c < NA
        k_c = tl.load(index_ptr + batch * NA + offs_c, mask=c_mask, other=NB).to(tl.int32)
        key_c = k_c * NA + offs_c
        position += tl.sum(((key_c[None, :] < key_i[:, None]) & c_mask[None, :]).to(tl.int32), axis=1)
        count_below += tl.sum(((k_c[None, :] < offs_j[:, None]) & c_mask[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + batch * NA + position, offs_i, mask=i_mask)
    tl.store(offsets_ptr + batch * (NB + 1) + offs_j, count_below, mask=offs_j <= NB)


def _launch_inverse_index(index: torch.Tensor, num_b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``index [B, NA]`` int64 -> ``(order [B, NA], offsets [B, NB + 1])`` int32."""
    batch, num_a = index.shape
    index = index.contiguous()
    order = torch.empty(batch, num_a, dtype=torch.int32, device=index.device)
    offsets = torch.empty(batch, num_b + 1, dtype=torch.int32, device=index.device)
    block_na, block_offsets = padded(num_a), padded(num_b + 1)
    chunk = max(16, min(block_na, 8192 // max(block_na, block_offsets)))
    wrap_triton(_inverse_index_kernel)[(batch,)](
        index, order, offsets, num_a, num_b,
        BLOCK_NA=block_na, BLOCK_OFFSETS=block_offsets, CHUNK=chunk, num_warps=4,
    )
    return order, offsets


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _scatter_mean_merge_kernel(
    x_ptr, size_ptr, order_ptr, offsets_ptr, out_ptr, out_size_ptr,
    NA, NB, C, width, num_prefix,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn, stride_ob, stride_on,
    HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: B row j, BLOCK_C channels. ``x'_j = (s_B x_B + sum_{i: k(i)=j} s_A[i] x_A[i]) / Z_j``, the sum in
    ascending i."""
    j = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    x_ptr += batch * stride_xb
    token = b_token(j, width, num_prefix)
    weight = tl.load(size_ptr + batch * stride_sb + token * stride_sn).to(tl.float32) if HAS_SIZE else 1.0
    total = weight * tl.load(x_ptr + token * stride_xn + offs_c * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
    merged_size = weight
    start = tl.load(offsets_ptr + batch * (NB + 1) + j)
    end = tl.load(offsets_ptr + batch * (NB + 1) + j + 1)
    for t in range(start, end):
        token = a_token(tl.load(order_ptr + batch * NA + t), width, num_prefix)
        weight = tl.load(size_ptr + batch * stride_sb + token * stride_sn).to(tl.float32) if HAS_SIZE else 1.0
        total += weight * tl.load(x_ptr + token * stride_xn + offs_c * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
        merged_size += weight
    out = total / merged_size
    tl.store(out_ptr + batch * stride_ob + j * stride_on + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_mask)
    if tl.program_id(2) == 0:
        tl.store(out_size_ptr + batch * NB + j, merged_size)


def _channel_block(channels: int) -> int:
    return min(1024, triton.next_power_of_2(channels))


def _size_args(size: Optional[torch.Tensor], x: torch.Tensor):
    return (size, size.stride(0), size.stride(1)) if size is not None else (x, 0, 0)


def launch_scatter_mean_merge(
    x: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor, grid: Checkerboard,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-hot merge by ``index [B, NA]`` int64: the inverse index, then the gather-and-sum per B row ->
    ``(x' [B, NB, C] in x's dtype, size' [B, NB] float32)``."""
    batch, _, channels = x.shape
    num_a, num_b = grid.num_a, grid.num_b
    order, offsets = _launch_inverse_index(index, num_b)
    out = torch.empty(batch, num_b, channels, dtype=x.dtype, device=x.device)
    out_size = torch.empty(batch, num_b, dtype=torch.float32, device=x.device)
    size_t, stride_sb, stride_sn = _size_args(size, x)
    block_c = _channel_block(channels)
    wrap_triton(_scatter_mean_merge_kernel)[(num_b, batch, triton.cdiv(channels, block_c))](
        x, size_t, order, offsets, out, out_size,
        num_a, num_b, channels, grid.width, grid.prefix,
        x.stride(0), x.stride(1), x.stride(2), stride_sb, stride_sn, out.stride(0), out.stride(1),
        HAS_SIZE=size is not None, BLOCK_C=block_c, num_warps=4 if block_c <= 512 else 8,
    )
    return out, out_size


_DENSE_CONFIGS = [
    triton.Config({"BLOCK_J": 32, "BLOCK_I": 32, "BLOCK_C": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_J": 32, "BLOCK_I": 32, "BLOCK_C": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_J": 64, "BLOCK_I": 32, "BLOCK_C": 64}, num_warps=8, num_stages=2),
]


@autotune(_DENSE_CONFIGS, key=["NA", "NB", "C"])
@triton.jit
def _scatter_mean_merge_dense_kernel(
    x_ptr, size_ptr, matching_ptr, out_ptr, out_size_ptr,
    NA, NB, C, width, num_prefix,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn, stride_mb, stride_ma, stride_mn,
    stride_ob, stride_on,
    HAS_SIZE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Dense float matching: ``T_j = s_B x_B + sum_i M[i, j] s_A[i] x_A[i]``, ``Z_j = s_B + sum_i M[i, j] s_A[i]``,
    summed over i in a fixed blocked order, float32 IEEE products."""
    batch = tl.program_id(1).to(tl.int64)
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = offs_j < NB
    c_mask = offs_c < C
    x_ptr += batch * stride_xb
    tokens_b = b_token(offs_j, width, num_prefix)
    if HAS_SIZE:
        s_b = tl.load(size_ptr + batch * stride_sb + tokens_b * stride_sn, mask=j_mask, other=1.0).to(tl.float32)
    else:
        s_b = tl.full([BLOCK_J], 1.0, tl.float32)
    x_b = tl.load(x_ptr + tokens_b[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                  mask=j_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    total = s_b[:, None] * x_b
    merged_size = s_b
    for start in range(0, NA, BLOCK_I):
        offs_i = start + tl.arange(0, BLOCK_I)
        i_mask = offs_i < NA
        tokens_a = a_token(offs_i, width, num_prefix)
        if HAS_SIZE:
            s_a = tl.load(size_ptr + batch * stride_sb + tokens_a * stride_sn, mask=i_mask, other=0.0).to(tl.float32)
        else:
            s_a = tl.where(i_mask, 1.0, 0.0)
        m_t = tl.load(matching_ptr + batch * stride_mb + offs_i[None, :] * stride_ma + offs_j[:, None] * stride_mn,
                      mask=j_mask[:, None] & i_mask[None, :], other=0.0).to(tl.float32)
        weights = m_t * s_a[None, :]
        x_a = tl.load(x_ptr + tokens_a[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                      mask=i_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        total += tl.dot(weights, x_a, input_precision="tf32x3")
        merged_size += tl.sum(weights, axis=1)
    out = total / merged_size[:, None]
    tl.store(out_ptr + batch * stride_ob + offs_j[:, None] * stride_on + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=j_mask[:, None] & c_mask[None, :])
    if tl.program_id(2) == 0:
        tl.store(out_size_ptr + batch * NB + offs_j, merged_size, mask=j_mask)


def launch_scatter_mean_merge_dense(
    x: torch.Tensor, size: Optional[torch.Tensor], matching: torch.Tensor, grid: Checkerboard,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge by a float ``matching [B, NA, NB]`` -> ``(x' [B, NB, C] in x's dtype, size' [B, NB] float32)``."""
    batch, _, channels = x.shape
    num_a, num_b = grid.num_a, grid.num_b
    out = torch.empty(batch, num_b, channels, dtype=x.dtype, device=x.device)
    out_size = torch.empty(batch, num_b, dtype=torch.float32, device=x.device)
    size_t, stride_sb, stride_sn = _size_args(size, x)

    def programs(meta):
        return triton.cdiv(num_b, meta["BLOCK_J"]), batch, triton.cdiv(channels, meta["BLOCK_C"])

    wrap_triton(_scatter_mean_merge_dense_kernel)[programs](
        x, size_t, matching, out, out_size,
        num_a, num_b, channels, grid.width, grid.prefix,
        x.stride(0), x.stride(1), x.stride(2), stride_sb, stride_sn,
        matching.stride(0), matching.stride(1), matching.stride(2), out.stride(0), out.stride(1),
        HAS_SIZE=size is not None,
    )
    return out, out_size


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _merge_row_terms_kernel(
    merged_ptr, grad_merged_ptr, merged_size_ptr, grad_size_ptr, q_ptr,
    NB, C, stride_ob, stride_on, stride_gb, stride_gn, stride_gc, stride_hb, stride_hn,
    HAS_GRAD_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per B row: ``q_j = <x'_j, g_j> / Z_j - h_j`` (float32)."""
    j = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        merged = tl.load(merged_ptr + batch * stride_ob + j * stride_on + offs_c, mask=c_mask, other=0.0)
        grad = tl.load(grad_merged_ptr + batch * stride_gb + j * stride_gn + offs_c * stride_gc, mask=c_mask, other=0.0)
        acc += merged.to(tl.float32) * grad.to(tl.float32)
    q = tl.sum(acc, axis=0) / tl.load(merged_size_ptr + batch * NB + j)
    if HAS_GRAD_SIZE:
        q -= tl.load(grad_size_ptr + batch * stride_hb + j * stride_hn).to(tl.float32)
    tl.store(q_ptr + batch * NB + j, q)


@triton.jit
def _scatter_mean_merge_bwd_kernel(
    x_ptr, size_ptr, index_ptr, grad_merged_ptr, merged_size_ptr, q_ptr, grad_x_ptr, grad_size_ptr,
    N, NA, NB, C, width, num_prefix,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn, stride_gb, stride_gn, stride_gc,
    HAS_SIZE: tl.constexpr, ALL_TOKENS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per token: ``dL/dx_n = s_n g_j / Z_j``, ``dL/ds_n = <x_n, g_j> / Z_j - q_j``, with j = the token's
    own B position, or k(i) for A token i. ALL_TOKENS=False: only the B tokens (program id = B position)."""
    row = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    if ALL_TOKENS:
        token = row
        is_a, position = token_to_ab(token, width, num_prefix)
        j = tl.where(is_a, tl.load(index_ptr + batch * NA + position, mask=is_a, other=0).to(tl.int32), position)
    else:
        token = b_token(row, width, num_prefix)
        j = row
    inv_z = 1.0 / tl.load(merged_size_ptr + batch * NB + j)
    weight = tl.load(size_ptr + batch * stride_sb + token * stride_sn).to(tl.float32) if HAS_SIZE else 1.0
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        grad = tl.load(grad_merged_ptr + batch * stride_gb + j * stride_gn + offs_c * stride_gc, mask=c_mask, other=0.0)
        grad = grad.to(tl.float32) * inv_z
        tl.store(grad_x_ptr + (batch * N + token) * C + offs_c, (weight * grad).to(grad_x_ptr.dtype.element_ty),
                 mask=c_mask)
        if HAS_SIZE:
            x = tl.load(x_ptr + batch * stride_xb + token * stride_xn + offs_c * stride_xc, mask=c_mask, other=0.0)
            acc += x.to(tl.float32) * grad
    if HAS_SIZE:
        grad_size = tl.sum(acc, axis=0) - tl.load(q_ptr + batch * NB + j)
        tl.store(grad_size_ptr + batch * N + token, grad_size.to(grad_size_ptr.dtype.element_ty))


@triton.jit
def xa_dot_grad(x_ptr, grad_merged_ptr, tokens_a, a_mask, offs_b, b_mask, C,
                stride_xn, stride_xc, stride_gn, stride_gc,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    """``<x_A[i], g_j>`` for a block of A rows and a block of B columns: ``X_A G^T``, K = C in blocks (float32
    accumulator). ``x_ptr`` / ``grad_merged_ptr`` already point at this batch element."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        x_a = tl.load(x_ptr + tokens_a[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                      mask=a_mask[:, None] & c_mask[None, :], other=0.0)
        grad = tl.load(grad_merged_ptr + offs_b[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                       mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(x_a.to(tl.float32), tl.trans(grad.to(tl.float32)), input_precision="tf32x3")
        else:
            acc += tl.dot(x_a, tl.trans(grad.to(x_a.dtype)))
    return acc


# The backward kernels walk the B columns in blocks of BLOCK_B (and C in blocks of BLOCK_C), so that no
# [BLOCK_A, NB] tile and no whole-NB dot operand is held in registers: every config is spill-free on sm_80 and
# sm_90 at ViT-B / ViT-L shapes in float32, bfloat16 and float16 (checked with fpet_kernels.tools.gpu_report).
_DENSE_BWD_CONFIGS = [
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 32}, num_warps=8, num_stages=3),
]
_BWD_CONFIGS = [  # the fused merge_tokens backward (float32: BLOCK_C=32 spills 8 B on sm_90)
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 16}, num_warps=8, num_stages=3),
]


@triton.jit
def a_rows_of_program(pid_a, batch, NA, width, num_prefix, size_ptr, stride_sb, stride_sn,
                      HAS_SIZE: tl.constexpr, BLOCK_A: tl.constexpr):
    """The A rows of program ``pid_a`` in ``batch``: their indices, mask, token indices and sizes (1 without sizes)."""
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = offs_a < NA
    tokens_a = a_token(offs_a, width, num_prefix)
    if HAS_SIZE:
        s_a = tl.load(size_ptr + batch * stride_sb + tokens_a * stride_sn, mask=a_mask, other=0.0).to(tl.float32)
    else:
        s_a = tl.full([BLOCK_A], 1.0, tl.float32)
    return offs_a, a_mask, tokens_a, s_a


@autotune(_DENSE_BWD_CONFIGS, key=["NB", "C", "BLOCK_A", "DOT_FP32"])
@triton.jit
def _scatter_mean_merge_dense_bwd_kernel(
    x_ptr, size_ptr, matching_ptr, grad_merged_ptr, merged_size_ptr, q_ptr,
    grad_x_ptr, grad_size_ptr, grad_matching_ptr,
    N, NA, NB, C, width, num_prefix,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn, stride_mb, stride_ma, stride_mn,
    stride_gb, stride_gn, stride_gc,
    HAS_SIZE: tl.constexpr, BLOCK_A: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Dense matching, A side, one program per BLOCK_A rows, all B columns in blocks of BLOCK_B:
    ``E = X_A G^T / Z - q``, ``dL/dM = s_A E``, ``dL/ds_A = sum_j M E``, ``dL/dx_A = s_A M (G / Z)``."""
    pid_a = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_a, a_mask, tokens_a, s_a = a_rows_of_program(pid_a, batch, NA, width, num_prefix, size_ptr, stride_sb,
                                                      stride_sn, HAS_SIZE, BLOCK_A)
    x_ptr += batch * stride_xb
    grad_merged_ptr += batch * stride_gb
    matching_ptr += batch * stride_mb
    grad_size = tl.zeros([BLOCK_A], tl.float32)
    for start_b in range(0, NB, BLOCK_B):
        offs_b = start_b + tl.arange(0, BLOCK_B)
        b_mask = offs_b < NB
        ab_mask = a_mask[:, None] & b_mask[None, :]
        inv_z = 1.0 / tl.load(merged_size_ptr + batch * NB + offs_b, mask=b_mask, other=1.0)
        q = tl.load(q_ptr + batch * NB + offs_b, mask=b_mask, other=0.0)
        excess = xa_dot_grad(x_ptr, grad_merged_ptr, tokens_a, a_mask, offs_b, b_mask, C, stride_xn, stride_xc,
                             stride_gn, stride_gc, BLOCK_A, BLOCK_B, BLOCK_C, DOT_FP32)
        excess = excess * inv_z[None, :] - q[None, :]
        tl.store(grad_matching_ptr + (batch * NA + offs_a[:, None]) * NB + offs_b[None, :],
                 (s_a[:, None] * excess).to(grad_matching_ptr.dtype.element_ty), mask=ab_mask)
        if HAS_SIZE:
            matching = tl.load(matching_ptr + offs_a[:, None] * stride_ma + offs_b[None, :] * stride_mn,
                               mask=ab_mask, other=0.0).to(tl.float32)
            grad_size += tl.sum(tl.where(ab_mask, matching * excess, 0.0), axis=1)
    if HAS_SIZE:
        tl.store(grad_size_ptr + batch * N + tokens_a, grad_size.to(grad_size_ptr.dtype.element_ty), mask=a_mask)
    for start_c in range(0, C, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        grad_x = tl.zeros([BLOCK_A, BLOCK_C], tl.float32)
        for start_b in range(0, NB, BLOCK_B):
            offs_b = start_b + tl.arange(0, BLOCK_B)
            b_mask = offs_b < NB
            inv_z = 1.0 / tl.load(merged_size_ptr + batch * NB + offs_b, mask=b_mask, other=1.0)
            matching = tl.load(matching_ptr + offs_a[:, None] * stride_ma + offs_b[None, :] * stride_mn,
                               mask=a_mask[:, None] & b_mask[None, :], other=0.0).to(tl.float32)
            grad = tl.load(grad_merged_ptr + offs_b[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                           mask=b_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            grad_x += tl.dot(matching * inv_z[None, :], grad, input_precision="tf32x3")  # (M / Z) G
        tl.store(grad_x_ptr + (batch * N + tokens_a[:, None]) * C + offs_c[None, :],
                 (s_a[:, None] * grad_x).to(grad_x_ptr.dtype.element_ty), mask=a_mask[:, None] & c_mask[None, :])


@autotune(_BWD_CONFIGS, key=["NB", "C", "BLOCK_A", "BLOCK_D", "DOT_FP32"])
@triton.jit
def _merge_tokens_bwd_kernel(
    x_ptr, size_ptr, metric_ptr, grad_merged_ptr, merged_size_ptr, q_ptr,
    index_ptr, top2_ptr, threshold_ptr, grad_metric_ptr, partial_ptr,
    NA, NB, C, head_dim, width, num_prefix, num_a_blocks,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn, stride_mb, stride_mn, stride_md,
    stride_gb, stride_gn, stride_gc, stride_db, stride_dn, stride_dd,
    HAS_SIZE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fused merge_tokens backward to the metric, one program per BLOCK_A rows of A, all B columns walked in blocks
    of BLOCK_B: ``dL/dM`` (one GEMM + rank-1 terms), the STE backward to ``dL/dS`` (S recomputed from the metric),
    then the cosine backward. Neither ``dL/dM`` nor ``dL/dS`` is written to memory (docs/design.md §3).

    With ``W = sigma' dL/dM`` and ``r_i = sum_l W[i, l] / 2``, ``dL/dS = W - r [j in top2]``, so
    ``dm^_A = W m^_B - r (m^_B[k] + m^_B[top2])`` and ``dm^_B = W^T m^_A - [j in top2]^T (r m^_A)``: the first terms
    accumulate block by block, the top-2 terms follow once ``r`` is complete (a second, GEMM-free column loop)."""
    pid_a = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_a, a_mask, tokens_a, s_a = a_rows_of_program(pid_a, batch, NA, width, num_prefix, size_ptr, stride_sb,
                                                      stride_sn, HAS_SIZE, BLOCK_A)
    x_ptr += batch * stride_xb
    grad_merged_ptr += batch * stride_gb
    metric_ptr += batch * stride_mb
    offs_d = tl.arange(0, BLOCK_D)
    threshold = tl.load(threshold_ptr + batch * NA + offs_a, mask=a_mask, other=0.0)
    grad_unit_a = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_A], tl.float32)
    block = (batch * num_a_blocks + pid_a) * NB
    for start in range(0, NB, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        b_mask = offs_b < NB
        inv_z = 1.0 / tl.load(merged_size_ptr + batch * NB + offs_b, mask=b_mask, other=1.0)
        q = tl.load(q_ptr + batch * NB + offs_b, mask=b_mask, other=0.0)
        grad_matching = xa_dot_grad(x_ptr, grad_merged_ptr, tokens_a, a_mask, offs_b, b_mask, C,
                                    stride_xn, stride_xc, stride_gn, stride_gc, BLOCK_A, BLOCK_B, BLOCK_C, DOT_FP32)
        grad_matching = s_a[:, None] * (grad_matching * inv_z[None, :] - q[None, :])
        unit_b = unit_rows(metric_ptr, b_token(offs_b, width, num_prefix), b_mask, offs_d, head_dim,
                           stride_mn, stride_md)[0]
        # m^_A is reloaded (L1/L2) every block rather than kept live across the loop with its tf32 splits.
        unit_a = unit_rows(metric_ptr, tokens_a, a_mask, offs_d, head_dim, stride_mn, stride_md)[0]
        scores = tl.dot(unit_a, tl.trans(unit_b), input_precision="tf32x3")
        scores = tl.where(b_mask[None, :] & (offs_b >= num_prefix)[None, :], scores, float("-inf"))
        weighted = ste_sigmoid_slope(scores, threshold) * grad_matching
        weighted = tl.where(a_mask[:, None] & b_mask[None, :], weighted, 0.0)
        row_sum += tl.sum(weighted, axis=1)
        grad_unit_a += tl.dot(weighted, unit_b, input_precision="tf32x3")
        grad_unit_b = tl.dot(tl.trans(weighted), unit_a, input_precision="tf32x3")
        tl.store(partial_ptr + (block + offs_b[:, None]) * BLOCK_D + offs_d[None, :], grad_unit_b,
                 mask=b_mask[:, None])
    # Top-2 terms of the STE backward (a column that is both top1 and top2 gets both halves).
    half = 0.5 * row_sum
    index = tl.load(index_ptr + batch * NA + offs_a, mask=a_mask, other=0).to(tl.int32)
    top2 = tl.load(top2_ptr + batch * NA + offs_a, mask=a_mask, other=0)
    unit_top = unit_rows(metric_ptr, b_token(index, width, num_prefix), a_mask, offs_d, head_dim,
                         stride_mn, stride_md)[0]
    unit_top += unit_rows(metric_ptr, b_token(top2, width, num_prefix), a_mask, offs_d, head_dim,
                          stride_mn, stride_md)[0]
    grad_unit_a -= half[:, None] * unit_top
    unit_a, norm_a = unit_rows(metric_ptr, tokens_a, a_mask, offs_d, head_dim, stride_mn, stride_md)
    store_grad_a(grad_unit_a, unit_a, norm_a, tokens_a, a_mask, offs_d, head_dim, grad_metric_ptr + batch * stride_db,
                 stride_dn, stride_dd)
    tl.debug_barrier()  # this program's partial rows above are read back below (by other threads)
    scaled_a = half[:, None] * unit_a
    for start in range(0, NB, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        b_mask = offs_b < NB
        in_top2 = (offs_b[None, :] == index[:, None]).to(tl.float32) + (offs_b[None, :] == top2[:, None]).to(tl.float32)
        in_top2 = tl.where(a_mask[:, None], in_top2, 0.0)
        ptrs = partial_ptr + (block + offs_b[:, None]) * BLOCK_D + offs_d[None, :]
        grad_unit_b = tl.load(ptrs, mask=b_mask[:, None], other=0.0)
        grad_unit_b -= tl.dot(tl.trans(in_top2), scaled_a, input_precision="tf32x3")
        tl.store(ptrs, grad_unit_b, mask=b_mask[:, None])


def _row_terms(merged, grad_merged, merged_size, grad_size) -> torch.Tensor:
    batch, num_b, channels = merged.shape
    q = torch.empty(batch, num_b, dtype=torch.float32, device=merged.device)
    grad_size_t, stride_hb, stride_hn = (grad_size, grad_size.stride(0), grad_size.stride(1)) \
        if grad_size is not None else (merged_size, 0, 0)
    wrap_triton(_merge_row_terms_kernel)[(num_b, batch)](
        merged, grad_merged, merged_size, grad_size_t, q,
        num_b, channels, merged.stride(0), merged.stride(1),
        grad_merged.stride(0), grad_merged.stride(1), grad_merged.stride(2), stride_hb, stride_hn,
        HAS_GRAD_SIZE=grad_size is not None, BLOCK_C=min(512, triton.next_power_of_2(channels)), num_warps=4,
    )
    return q


def _token_grads(x, size, index, grad_merged, merged_size, q, grad_x, grad_size, grid: Checkerboard,
                 all_tokens: bool) -> None:
    batch, num_tokens, channels = x.shape
    size_t, stride_sb, stride_sn = _size_args(size, x)
    index_t = index if index is not None else merged_size
    wrap_triton(_scatter_mean_merge_bwd_kernel)[(num_tokens if all_tokens else grid.num_b, batch)](
        x, size_t, index_t, grad_merged, merged_size, q, grad_x, grad_size if grad_size is not None else grad_x,
        num_tokens, grid.num_a, grid.num_b, channels, grid.width, grid.prefix,
        x.stride(0), x.stride(1), x.stride(2), stride_sb, stride_sn,
        grad_merged.stride(0), grad_merged.stride(1), grad_merged.stride(2),
        HAS_SIZE=size is not None, ALL_TOKENS=all_tokens, BLOCK_C=min(512, triton.next_power_of_2(channels)),
        num_warps=4,
    )


def _empty_grads(x: torch.Tensor, size: Optional[torch.Tensor]):
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_size = torch.empty(size.shape, dtype=size.dtype, device=x.device) if size is not None else None
    return grad_x, grad_size


def _index_backward(x, size, index, merged, merged_size, grad_merged, grad_size, grid: Checkerboard):
    """One-hot merge backward to the tokens -> ``(q [B, NB], dL/dx, dL/dsize or None)``."""
    q = _row_terms(merged, grad_merged, merged_size, grad_size)
    grad_x, grad_in_size = _empty_grads(x, size)
    _token_grads(x, size, index, grad_merged, merged_size, q, grad_x, grad_in_size, grid, True)
    return q, grad_x, grad_in_size


def launch_scatter_mean_merge_backward(
    x, size, index, merged, merged_size, grad_merged, grad_size, grid: Checkerboard,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One-hot (index) merge backward -> ``(dL/dx [B, N, C], dL/dsize [B, N] or None)``."""
    _, grad_x, grad_in_size = _index_backward(x, size, index, merged, merged_size, grad_merged, grad_size, grid)
    return grad_x, grad_in_size


def launch_scatter_mean_merge_dense_backward(
    x, size, matching, merged, merged_size, grad_merged, grad_size, grid: Checkerboard,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Dense-matching merge backward -> ``(dL/dx, dL/dsize or None, dL/dmatching [B, NA, NB])``."""
    batch, num_tokens, channels = x.shape
    num_a, num_b = grid.num_a, grid.num_b
    q = _row_terms(merged, grad_merged, merged_size, grad_size)
    grad_x, grad_in_size = _empty_grads(x, size)
    grad_matching = torch.empty(batch, num_a, num_b, dtype=matching.dtype, device=x.device)
    _token_grads(x, size, None, grad_merged, merged_size, q, grad_x, grad_in_size, grid, False)
    size_t, stride_sb, stride_sn = _size_args(size, x)
    block_a = a_block_rows(num_b)
    wrap_triton(_scatter_mean_merge_dense_bwd_kernel)[(triton.cdiv(num_a, block_a), batch)](
        x, size_t, matching, grad_merged, merged_size, q,
        grad_x, grad_in_size if grad_in_size is not None else grad_x, grad_matching,
        num_tokens, num_a, num_b, channels, grid.width, grid.prefix,
        x.stride(0), x.stride(1), x.stride(2), stride_sb, stride_sn,
        matching.stride(0), matching.stride(1), matching.stride(2),
        grad_merged.stride(0), grad_merged.stride(1), grad_merged.stride(2),
        HAS_SIZE=size is not None, BLOCK_A=block_a, DOT_FP32=dot_in_float32(x.dtype),
    )
    return grad_x, grad_in_size, grad_matching


def launch_merge_tokens(
    x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], grid: Checkerboard,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused merge_tokens forward: the argmax of every A row (the similarity kernel's WRITE_MATCH launch, no score
    matrix), then the one-hot merge -> ``(x' [B, NB, C], size' [B, NB] float32)``."""
    index, _, _ = launch_match(metric, grid)
    return launch_scatter_mean_merge(x, size, index, grid)


def launch_merge_tokens_backward(
    x, metric, size, merged, merged_size, grad_merged, grad_size, grid: Checkerboard, metric_grad: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused merge_tokens backward -> ``(dL/dx, dL/dmetric or None, dL/dsize or None)``. The argmax, second column
    and threshold of every A row are recomputed from the metric (one WRITE_MATCH launch of the forward's kernel)."""
    index, top2, threshold = launch_match(metric, grid)
    q, grad_x, grad_in_size = _index_backward(x, size, index, merged, merged_size, grad_merged, grad_size, grid)
    if not metric_grad:
        return grad_x, None, grad_in_size
    batch, num_tokens, channels = x.shape
    num_a, num_b, head_dim = grid.num_a, grid.num_b, metric.shape[2]
    block_a, block_d = a_block_rows(num_b), padded(head_dim)
    num_a_blocks = triton.cdiv(num_a, block_a)
    grad_metric = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    partial = torch.empty(batch, num_a_blocks, num_b, block_d, dtype=torch.float32, device=x.device)
    size_t, stride_sb, stride_sn = _size_args(size, x)
    wrap_triton(_merge_tokens_bwd_kernel)[(num_a_blocks, batch)](
        x, size_t, metric, grad_merged, merged_size, q, index, top2, threshold, grad_metric, partial,
        num_a, num_b, channels, head_dim, grid.width, grid.prefix, num_a_blocks,
        x.stride(0), x.stride(1), x.stride(2), stride_sb, stride_sn,
        metric.stride(0), metric.stride(1), metric.stride(2),
        grad_merged.stride(0), grad_merged.stride(1), grad_merged.stride(2),
        grad_metric.stride(0), grad_metric.stride(1), grad_metric.stride(2),
        HAS_SIZE=size is not None, BLOCK_A=block_a, BLOCK_D=block_d, DOT_FP32=dot_in_float32(x.dtype),
    )
    launch_cosine_backward_b(metric, grad_metric, partial, grid)
    return grad_x, grad_metric, grad_in_size
