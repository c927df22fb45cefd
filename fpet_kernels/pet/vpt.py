"""Visual prompt tuning (VPT-shallow / VPT-deep) for timm VisionTransformer models.

Prompts are inserted right after the class token (position 0 when there is none) and count as prefix tokens: the
model's ``num_prefix_tokens`` grows by their number, so pooling skips them and FPET never merges them.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn as nn


class VisualPrompts(nn.Module):
    """``num_tokens`` learned prompt tokens, one set (shallow) or one per block (deep)."""

    fpet_trainable = True  # marker read by mark_trainable

    def __init__(self, num_tokens: int, dim: int, depth: int, patch_area: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.prompts = nn.Parameter(torch.empty(depth, num_tokens, dim))
        # Xavier-uniform bound over the patch-embedding fan (VPT paper, section 3.2).
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.position = 1

    @property
    def deep(self) -> bool:
        return self.prompts.shape[0] > 1

    def _prompts(self, layer: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        # Without grad mode the prompts are detached first: in inference mode a view of a parameter still says
        # requires_grad but has no grad_fn, which breaks module hooks that look for one (FlopCounterMode's tracker).
        prompts = self.prompts if torch.is_grad_enabled() else self.prompts.detach()
        return self.dropout(prompts[layer].to(like.dtype)).unsqueeze(0).expand(batch, -1, -1)

    def insert(self, module: nn.Module, args: Tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
        """Forward hook after the embeddings: ``[B, N, C] -> [B, N + p, C]``."""
        p = self.position
        return torch.cat([x[:, :p], self._prompts(0, x.shape[0], x), x[:, p:]], dim=1)

    def replace(self, layer: int, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        """Forward pre-hook of block ``layer >= 1`` (deep prompts, bound with functools.partial): swap in that
        block's own prompts."""
        x = args[0]
        p, n = self.position, self.num_tokens
        x = torch.cat([x[:, :p], self._prompts(layer, x.shape[0], x), x[:, p + n:]], dim=1)
        return (x,) + tuple(args[1:])

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, deep={self.deep}, position={self.position}"
