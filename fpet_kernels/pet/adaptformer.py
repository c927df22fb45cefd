"""AdaptFormer: a parallel bottleneck beside a timm Block's MLP (optionally with 1-bit weights).

``x = x + drop_path2(ls2(mlp(norm2(x)))) + s * Up(Dropout(ReLU(Down(x))))``, with ``x`` the block's residual input
to the MLP branch. The adapter is installed with hooks on the block's own ``norm2`` (to read ``x``) and
``drop_path2`` (to add the branch), so timm's Block, Mlp, LayerScale and any merge patch stay untouched.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn as nn

from .._thread_state import ThreadState
from ..binary import QuantLinear, init_up_projection


class AdaptFormerAdapter(nn.Module):
    """``s * Up(Dropout(ReLU(Down(x))))``; ``Down: dim -> bottleneck``, ``Up: bottleneck -> dim``, Up near zero."""

    fpet_trainable = True  # marker read by mark_trainable

    def __init__(
        self, dim: int, bottleneck: int = 8, scale: float = 0.1, dropout: float = 0.1, bits: int = 32
    ) -> None:
        super().__init__()
        self.down = QuantLinear(dim, bottleneck, bias=bits == 32, bits=bits)
        self.up = QuantLinear(bottleneck, dim, bias=bits == 32, bits=bits)
        init_up_projection(self.up.weight, bits)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self._pending = ThreadState()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale

    def read_input(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """norm2 pre-hook: compute the branch from the MLP branch's residual input."""
        self._pending.set("branch", self(args[0]))

    def add_branch(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """drop_path2 forward hook: add the branch to the MLP branch's output."""
        branch = self._pending.pop("branch")
        if branch is None:
            raise RuntimeError("AdaptFormer: the block's norm2 did not run before drop_path2")
        return output + branch

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
