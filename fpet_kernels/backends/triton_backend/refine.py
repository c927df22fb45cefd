"""refine_keys: the key refinement adapter ``m + s * Up(Dropout(ReLU(Down(m))))`` (SPEC section 2, step 2).

One program handles BLOCK_M token rows: both small GEMMs (Dh -> d -> Dh) stay on chip, in float32. Dropout takes a
keep mask drawn by torch (``keep_mask``), so the kernel itself is deterministic. The backward kernel gives
``dL/dm`` and ``dL/dpre`` (the hidden pre-activation); the weight gradients are two torch matmuls over them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import padded


def keep_mask(rows: int, hidden: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """Dropout keep mask ``[rows, hidden]`` (uint8, 1 = keep with probability ``1 - p``) from torch's generator."""
    return (torch.rand(rows, hidden, device=device) >= dropout_p).to(torch.uint8)


@triton.jit
def _refine_keys_kernel(
    metric_ptr, w_down_ptr, w_up_ptr, keep_ptr, out_ptr, hidden_ptr,
    M, head_dim, hidden_dim, scale, keep_scale,
    HAS_DROPOUT: tl.constexpr, STORE_HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """metric rows ``[M, Dh]`` (contiguous) -> refined rows; ``hidden = ReLU(m W_down^T)`` (float32, before dropout)
    when STORE_HIDDEN."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_mask, d_mask, h_mask = offs_m < M, offs_d < head_dim, offs_h < hidden_dim
    rows = offs_m[:, None].to(tl.int64)
    metric = tl.load(metric_ptr + rows * head_dim + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                     other=0.0).to(tl.float32)
    w_down = tl.load(w_down_ptr + offs_h[:, None] * head_dim + offs_d[None, :],
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    hidden = tl.maximum(tl.dot(metric, tl.trans(w_down), input_precision="tf32x3"), 0.0)
    if STORE_HIDDEN:
        tl.store(hidden_ptr + rows * hidden_dim + offs_h[None, :], hidden, mask=m_mask[:, None] & h_mask[None, :])
    if HAS_DROPOUT:
        keep = tl.load(keep_ptr + rows * hidden_dim + offs_h[None, :], mask=m_mask[:, None] & h_mask[None, :], other=0)
        hidden = tl.where(keep != 0, hidden * keep_scale, 0.0)
    w_up = tl.load(w_up_ptr + offs_d[:, None] * hidden_dim + offs_h[None, :],
                   mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    out = metric + scale * tl.dot(hidden, tl.trans(w_up), input_precision="tf32x3")
    tl.store(out_ptr + rows * head_dim + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _refine_keys_bwd_kernel(
    grad_out_ptr, w_down_ptr, w_up_ptr, keep_ptr, hidden_ptr, grad_metric_ptr, grad_pre_ptr,
    M, head_dim, hidden_dim, scale, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``dL/dpre = [pre > 0] * dropout(s * g W_up)`` (float32) and ``dL/dm = g + dL/dpre W_down``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_mask, d_mask, h_mask = offs_m < M, offs_d < head_dim, offs_h < hidden_dim
    rows = offs_m[:, None].to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    mh_mask = m_mask[:, None] & h_mask[None, :]
    grad_out = tl.load(grad_out_ptr + rows * head_dim + offs_d[None, :], mask=md_mask, other=0.0).to(tl.float32)
    w_up = tl.load(w_up_ptr + offs_d[:, None] * hidden_dim + offs_h[None, :],
                   mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    grad_hidden = scale * tl.dot(grad_out, w_up, input_precision="tf32x3")
    if HAS_DROPOUT:
        keep = tl.load(keep_ptr + rows * hidden_dim + offs_h[None, :], mask=mh_mask, other=0)
        grad_hidden = tl.where(keep != 0, grad_hidden * keep_scale, 0.0)
    hidden = tl.load(hidden_ptr + rows * hidden_dim + offs_h[None, :], mask=mh_mask, other=0.0)
    grad_pre = tl.where(hidden > 0, grad_hidden, 0.0)
    tl.store(grad_pre_ptr + rows * hidden_dim + offs_h[None, :], grad_pre, mask=mh_mask)
    w_down = tl.load(w_down_ptr + offs_h[:, None] * head_dim + offs_d[None, :],
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    grad_metric = grad_out + tl.dot(grad_pre, w_down, input_precision="tf32x3")
    tl.store(grad_metric_ptr + rows * head_dim + offs_d[None, :], grad_metric.to(grad_metric_ptr.dtype.element_ty),
             mask=md_mask)


_BLOCK_M = 32


def launch_refine_keys(
    metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, scale: float, dropout_p: float,
    keep: Optional[torch.Tensor], store_hidden: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> ``(refined [B, N, Dh], hidden [B*N, d] float32; empty unless store_hidden)``."""
    metric, w_down, w_up = metric.contiguous(), w_down.contiguous(), w_up.contiguous()
    rows, head_dim, hidden_dim = metric.numel() // metric.shape[-1], metric.shape[-1], w_down.shape[0]
    out = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    hidden = torch.empty(rows if store_hidden else 0, hidden_dim, dtype=torch.float32, device=metric.device)
    wrap_triton(_refine_keys_kernel)[(triton.cdiv(rows, _BLOCK_M),)](
        metric, w_down, w_up, keep if keep is not None else metric, out, hidden,
        rows, head_dim, hidden_dim, scale, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=keep is not None, STORE_HIDDEN=store_hidden,
        BLOCK_M=_BLOCK_M, BLOCK_D=padded(head_dim), BLOCK_H=padded(hidden_dim), num_warps=4,
    )
    return out, hidden


def launch_refine_keys_backward(
    grad_out: torch.Tensor, metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, hidden: torch.Tensor,
    scale: float, dropout_p: float, keep: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(dL/dmetric, dL/dw_down, dL/dw_up)``."""
    grad_out, metric = grad_out.contiguous(), metric.contiguous()
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    rows, head_dim, hidden_dim = hidden.shape[0], metric.shape[-1], w_down.shape[0]
    grad_metric = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    grad_pre = torch.empty(rows, hidden_dim, dtype=torch.float32, device=metric.device)
    keep_scale = 1.0 / (1.0 - dropout_p)
    wrap_triton(_refine_keys_bwd_kernel)[(triton.cdiv(rows, _BLOCK_M),)](
        grad_out, w_down, w_up, keep if keep is not None else hidden, hidden, grad_metric, grad_pre,
        rows, head_dim, hidden_dim, scale, keep_scale,
        HAS_DROPOUT=keep is not None, BLOCK_M=_BLOCK_M, BLOCK_D=padded(head_dim), BLOCK_H=padded(hidden_dim),
        num_warps=4,
    )
    dropped = hidden if keep is None else hidden * keep * keep_scale
    grad_w_up = (scale * grad_out.reshape(rows, head_dim).float()).t() @ dropped
    grad_w_down = grad_pre.t() @ metric.reshape(rows, head_dim).float()
    return grad_metric, grad_w_down.to(w_down.dtype), grad_w_up.to(w_up.dtype)
