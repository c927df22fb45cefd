"""refine_keys: the key refinement adapter ``m + s * Up(Dropout(ReLU(Down(m))))`` (docs/design.md §2 step 2).

One program handles BLOCK_M token rows: both small GEMMs (Dh -> d -> Dh) stay on chip, in float32. Dropout takes a
bool keep mask ``[B, N, d]`` drawn by torch (``fpet_kernels.reference.dropout_keep_mask``), so the kernels
themselves are deterministic. Nothing is saved for the backward but the op's inputs: the backward kernel recomputes
the hidden activation from the metric and W_down (:func:`refine_hidden`, the forward's own code on the same rows),
and gives ``dL/dm``, ``dL/dpre`` (the hidden pre-activation) and the dropped hidden activation; the weight gradients
are two torch matmuls over the last two.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import padded, wrap_triton


@triton.jit
def refine_hidden(metric_ptr, w_down_ptr, rows, offs_d, offs_h, md_mask, d_mask, h_mask, head_dim):
    """Rows of ``metric [M, Dh]`` -> ``(metric rows, hidden = ReLU(m W_down^T))``, both float32."""
    metric = tl.load(metric_ptr + rows * head_dim + offs_d[None, :], mask=md_mask, other=0.0).to(tl.float32)
    w_down = tl.load(w_down_ptr + offs_h[:, None] * head_dim + offs_d[None, :],
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return metric, tl.maximum(tl.dot(metric, tl.trans(w_down), input_precision="tf32x3"), 0.0)


@triton.jit
def apply_keep(values, keep, keep_scale):
    """Inverted dropout of ``values`` by the loaded keep mask: kept units scaled by ``1 / (1 - p)``, others 0."""
    return tl.where(keep != 0, values * keep_scale, 0.0)


@triton.jit
def _refine_keys_kernel(
    metric_ptr, w_down_ptr, w_up_ptr, keep_ptr, out_ptr,
    M, head_dim, hidden_dim, scale, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """metric rows ``[M, Dh]`` (contiguous) -> refined rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_mask, d_mask, h_mask = offs_m < M, offs_d < head_dim, offs_h < hidden_dim
    rows = offs_m[:, None].to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    metric, hidden = refine_hidden(metric_ptr, w_down_ptr, rows, offs_d, offs_h, md_mask, d_mask, h_mask, head_dim)
    if HAS_DROPOUT:
        keep = tl.load(keep_ptr + rows * hidden_dim + offs_h[None, :], mask=m_mask[:, None] & h_mask[None, :], other=0)
        hidden = apply_keep(hidden, keep, keep_scale)
    w_up = tl.load(w_up_ptr + offs_d[:, None] * hidden_dim + offs_h[None, :],
                   mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    out = metric + scale * tl.dot(hidden, tl.trans(w_up), input_precision="tf32x3")
    tl.store(out_ptr + rows * head_dim + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=md_mask)


@triton.jit
def _refine_keys_bwd_kernel(
    grad_out_ptr, metric_ptr, w_down_ptr, w_up_ptr, keep_ptr, grad_metric_ptr, grad_pre_ptr, dropped_ptr,
    M, head_dim, hidden_dim, scale, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Recompute ``hidden`` as the forward did, then store ``dropped = dropout(hidden)`` and
    ``dL/dpre = [pre > 0] * dropout(s * g W_up)`` (float32), and ``dL/dm = g + dL/dpre W_down``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_mask, d_mask, h_mask = offs_m < M, offs_d < head_dim, offs_h < hidden_dim
    rows = offs_m[:, None].to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    mh_mask = m_mask[:, None] & h_mask[None, :]
    hidden = refine_hidden(metric_ptr, w_down_ptr, rows, offs_d, offs_h, md_mask, d_mask, h_mask, head_dim)[1]
    # Only the ReLU mask stays live: dropout(hidden), the operand of dL/dW_up, is stored before the other GEMMs
    # (holding hidden across them spills registers on sm_90 in float32).
    active = hidden > 0
    if HAS_DROPOUT:
        keep = tl.load(keep_ptr + rows * hidden_dim + offs_h[None, :], mask=mh_mask, other=0)
        hidden = apply_keep(hidden, keep, keep_scale)
    tl.store(dropped_ptr + rows * hidden_dim + offs_h[None, :], hidden, mask=mh_mask)
    grad_out = tl.load(grad_out_ptr + rows * head_dim + offs_d[None, :], mask=md_mask, other=0.0).to(tl.float32)
    w_up = tl.load(w_up_ptr + offs_d[:, None] * hidden_dim + offs_h[None, :],
                   mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    grad_hidden = scale * tl.dot(grad_out, w_up, input_precision="tf32x3")
    if HAS_DROPOUT:
        grad_hidden = apply_keep(grad_hidden, keep, keep_scale)
    grad_pre = tl.where(active, grad_hidden, 0.0)
    tl.store(grad_pre_ptr + rows * hidden_dim + offs_h[None, :], grad_pre, mask=mh_mask)
    w_down = tl.load(w_down_ptr + offs_h[:, None] * head_dim + offs_d[None, :],
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    grad_metric = grad_out + tl.dot(grad_pre, w_down, input_precision="tf32x3")
    tl.store(grad_metric_ptr + rows * head_dim + offs_d[None, :], grad_metric.to(grad_metric_ptr.dtype.element_ty),
             mask=md_mask)


_BLOCK_M = 32


def _keep_args(keep: Optional[torch.Tensor], dropout_p: float, dummy: torch.Tensor):
    """``(keep pointer, 1 / (1 - p))`` for the kernels: the bool mask as bytes, or a dummy pointer without dropout."""
    if keep is None:
        return dummy, 1.0
    torch._check(keep.dtype == torch.bool, lambda: f"refine_keys: keep must be a bool mask, got {keep.dtype}")
    return keep.contiguous().view(torch.uint8), (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


def _shapes(metric: torch.Tensor, w_down: torch.Tensor) -> Tuple[int, int, int]:
    """``(rows M, Dh, d)``."""
    return metric.numel() // metric.shape[-1], metric.shape[-1], w_down.shape[0]


def _blocks(head_dim: int, hidden_dim: int) -> dict:
    return dict(BLOCK_M=_BLOCK_M, BLOCK_D=padded(head_dim), BLOCK_H=padded(hidden_dim), num_warps=4)


def launch_refine_keys(
    metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, keep: Optional[torch.Tensor], scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """-> refined ``[B, N, Dh]`` in metric's dtype; ``keep`` is the bool ``[B, N, d]`` dropout keep mask or None."""
    metric, w_down, w_up = metric.contiguous(), w_down.contiguous(), w_up.contiguous()
    rows, head_dim, hidden_dim = _shapes(metric, w_down)
    keep_t, keep_scale = _keep_args(keep, dropout_p, metric)
    out = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    wrap_triton(_refine_keys_kernel)[(triton.cdiv(rows, _BLOCK_M),)](
        metric, w_down, w_up, keep_t, out,
        rows, head_dim, hidden_dim, scale, keep_scale,
        HAS_DROPOUT=keep is not None, **_blocks(head_dim, hidden_dim),
    )
    return out


def launch_refine_keys_backward(
    grad_out: torch.Tensor, metric: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
    keep: Optional[torch.Tensor], scale: float, dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(dL/dmetric, dL/dw_down, dL/dw_up)``, each in its input's dtype."""
    grad_out, metric = grad_out.contiguous(), metric.contiguous()
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    rows, head_dim, hidden_dim = _shapes(metric, w_down)
    keep_t, keep_scale = _keep_args(keep, dropout_p, metric)
    grad_metric = torch.empty(metric.shape, dtype=metric.dtype, device=metric.device)
    grad_pre = torch.empty(rows, hidden_dim, dtype=torch.float32, device=metric.device)
    dropped = torch.empty(rows, hidden_dim, dtype=torch.float32, device=metric.device)
    wrap_triton(_refine_keys_bwd_kernel)[(triton.cdiv(rows, _BLOCK_M),)](
        grad_out, metric, w_down, w_up, keep_t, grad_metric, grad_pre, dropped,
        rows, head_dim, hidden_dim, scale, keep_scale,
        HAS_DROPOUT=keep is not None, **_blocks(head_dim, hidden_dim),
    )
    grad_w_up = (scale * grad_out.reshape(rows, head_dim).float()).t() @ dropped
    grad_w_down = grad_pre.t() @ metric.reshape(rows, head_dim).float()
    return grad_metric, grad_w_down.to(w_down.dtype), grad_w_up.to(w_up.dtype)
