"""LoRA on the query and value parts of timm's fused qkv projection (optionally with 1-bit weights)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..binary import QuantLinear, init_up_projection


class LoRAQKV(nn.Module):
    """Wraps a fused ``qkv`` Linear (``dim -> 3 * attn_dim``) and adds ``scale * B(A(x))`` to its q and v outputs.

    ``A: dim -> rank`` (nn.Linear init), ``B: rank -> attn_dim`` (zeros for 32-bit, ``trunc_normal(std 1e-3)`` for
    1-bit weights, docs/design.md §5). The wrapped Linear stays as ``base_layer`` and is not modified.

    Nothing is cached: every forward reads the current weights, so updates of any kind (optimizer steps,
    ``load_state_dict``, in-place ``.data`` edits) show at once, in grad mode or not, and the module compiles with
    ``torch.compile(fullgraph=True)``. With grad mode off (``torch.no_grad`` / ``torch.inference_mode``) the two
    low-rank products are added in place into the q and v slices of the base output (at ViT-S/16 shapes on CPU
    this beats folding the weight per call at batch 1). :meth:`merged_weight` gives the folded weight, for exporting
    a plain qkv Linear (:func:`fpet_kernels.checkpoint.fold_pet`).
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 8, scale: float = 1.0, bits: int = 32) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear) or base_layer.out_features % 3:
            raise ValueError(f"LoRA expects a fused qkv nn.Linear with 3 * attn_dim outputs, got {base_layer}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base_layer = base_layer
        self.rank = rank
        self.scale = scale
        dim_in, attn_dim = base_layer.in_features, base_layer.out_features // 3
        self.lora_a_q = QuantLinear(dim_in, rank, bits=bits)
        self.lora_b_q = QuantLinear(rank, attn_dim, bits=bits)
        self.lora_a_v = QuantLinear(dim_in, rank, bits=bits)
        self.lora_b_v = QuantLinear(rank, attn_dim, bits=bits)
        init_up_projection(self.lora_b_q.weight, bits)
        init_up_projection(self.lora_b_v.weight, bits)
        self.to(device=base_layer.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * [B_q A_q; 0; B_v A_v]``: the qkv weight with the LoRA update folded in."""
        delta_q = self.lora_b_q.effective_weight() @ self.lora_a_q.effective_weight()
        delta_v = self.lora_b_v.effective_weight() @ self.lora_a_v.effective_weight()
        delta = torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=0)
        return self.base_layer.weight + self.scale * delta.to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.base_layer(x)
        if not torch.is_grad_enabled():
            # No autograd graph to keep: add the low-rank updates into the q and v slices of the fresh base output.
            attn_dim = qkv.shape[-1] // 3
            qkv[..., :attn_dim].add_(self.lora_b_q(self.lora_a_q(x)), alpha=self.scale)
            qkv[..., 2 * attn_dim:].add_(self.lora_b_v(self.lora_a_v(x)), alpha=self.scale)
            return qkv
        delta_q = self.lora_b_q(self.lora_a_q(x)) * self.scale
        delta_v = self.lora_b_v(self.lora_a_v(x)) * self.scale
        return qkv + torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=-1)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"
