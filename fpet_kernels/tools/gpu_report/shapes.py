"""The shapes the report works at: ViT-B/16 at 224x224 (docs/design.md §2 defaults); ViT-L/16 for the GPU check."""
from __future__ import annotations

import dataclasses

from ...geometry import Checkerboard


@dataclasses.dataclass(frozen=True)
class Shapes:
    """``grid``: the 14x14 patch grid behind one class token; ``channels`` C, ``head_dim`` Dh (the metric) and
    ``refine_dim`` d (the key refinement adapter's hidden size)."""

    grid: Checkerboard = Checkerboard(14, 14, 1)
    channels: int = 768
    head_dim: int = 64
    refine_dim: int = 32

    @property
    def tokens(self) -> int:
        """N = P + H * W = 197."""
        return self.grid.num_tokens


VIT_B16 = Shapes()
# ViT-T/16 and ViT-S/16 at 224x224: the same grid and head size, C = 192 and 384.
VIT_T16 = Shapes(channels=192)
VIT_S16 = Shapes(channels=384)
# ViT-L/16 at 224x224: a 16x16 grid (256 patches), C = 1024, Dh = 64.
VIT_L16 = Shapes(Checkerboard(16, 16, 1), channels=1024)
