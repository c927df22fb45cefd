"""TokenMerger: the key refinement adapter followed by the fused merge (docs/design.md §2 steps 2-6)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import ops
from .backends import BACKENDS
from .binary import QuantLinear, init_up_projection


class TokenMerger(nn.Module):
    """Refine the merge block's keys with a tiny adapter, then halve the tokens with :func:`ops.merge_tokens`.

    Args:
        head_dim: ``Dh``, the metric (attention head) dimension.
        refine_dim: adapter width ``d``; ``0`` disables refinement (``m' = m``).
        refine_bits: ``1`` (binary weights through ``Q(W)``) or ``32``.
        refine_scale: ``s`` in ``m' = m + s * Up(Dropout(ReLU(Down(m))))``.
        refine_dropout: dropout ``p`` inside the adapter (active in training mode only).
        backend: kernel backend for the ops (see :mod:`fpet_kernels.ops`).
    """

    fpet_trainable = True  # marker read by mark_trainable: the refinement adapter trains with the PET method

    def __init__(
        self,
        head_dim: int,
        refine_dim: int = 32,
        refine_bits: int = 1,
        refine_scale: float = 1.0,
        refine_dropout: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if refine_dim < 0:
            raise ValueError(f"refine_dim must be >= 0, got {refine_dim}")
        if refine_bits not in (1, 32):
            raise ValueError(f"refine_bits must be 1 or 32, got {refine_bits}")
        if not 0.0 <= refine_dropout < 1.0:
            raise ValueError(f"refine_dropout must be in [0, 1), got {refine_dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.head_dim = head_dim
        self.refine_dim = refine_dim
        self.refine_bits = refine_bits
        self.refine_scale = refine_scale
        self.refine_dropout = refine_dropout
        self.backend = backend
        if refine_dim > 0:
            self.down = QuantLinear(head_dim, refine_dim, bits=refine_bits)
            self.up = QuantLinear(refine_dim, head_dim, bits=refine_bits)
            init_up_projection(self.up.weight, refine_bits)

    def refine(self, metric: torch.Tensor) -> torch.Tensor:
        """``[B, N, Dh]`` keys -> refined keys; no gradient flows into ``metric`` (it is detached)."""
        metric = metric.detach()
        if self.refine_dim == 0:
            return metric
        return ops.refine_keys(
            metric,
            self.down.effective_weight().to(metric.dtype),
            self.up.effective_weight().to(metric.dtype),
            self.refine_scale,
            self.refine_dropout,
            self.training,
            backend=self.backend,
        )

    def forward(
        self,
        x: torch.Tensor,
        metric: torch.Tensor,
        size: Optional[torch.Tensor],
        grid_size: Sequence[int],
        num_prefix_tokens: int,
        return_index: bool = False,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x ``[B, N, C]``, metric ``[B, N, Dh]``, size ``[B, N]`` or None -> ``(x' [B, NB, C], size' [B, NB])``.

        With ``return_index`` also the assignment ``k(i)`` ``[B, NA]`` int64 the merge used, through the unfused ops
        (similarity, STE match, merge: the same values and gradients as :func:`ops.merge_tokens`; one extra
        ``[B, NA, NB]`` score matrix)."""
        refined = self.refine(metric)
        if not return_index:
            return ops.merge_tokens(x, refined, size, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens,
                                    backend=self.backend)
        scores = ops.checkerboard_similarity(refined, grid_size, num_prefix_tokens, backend=self.backend)
        matching, index = ops.ste_match(scores, backend=self.backend)
        if torch.is_grad_enabled():
            merged, merged_size = ops.scatter_mean_merge_dense(x, size, matching, grid_size,
                                                               num_prefix_tokens, backend=self.backend)
        else:
            merged, merged_size = ops.scatter_mean_merge(x, size, index, grid_size, num_prefix_tokens,
                                                         backend=self.backend)
        return merged, merged_size, index

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, refine_dim={self.refine_dim}, refine_bits={self.refine_bits}, "
            f"refine_scale={self.refine_scale}, refine_dropout={self.refine_dropout}, backend={self.backend!r}"
        )
