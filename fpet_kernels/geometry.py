"""The checkerboard geometry of the merge (docs/design.md §2 step 3), defined once for every backend and tool.

:class:`Checkerboard` mirrors the C++ struct ``fpet::Checkerboard`` of ``csrc/fpet_math.h`` (same fields, same
formulas; ``tests/test_geometry.py`` checks the two against each other through the compiled ops). Cell
``q = r * W + c`` of the ``H x W`` grid is an A cell when ``r + c`` is even. Among the cells of its own set, in
row-major order, the rank of cell ``q`` is ``q // 2`` for both parities of ``W``; the token maps invert that rank.
Token order: the ``P`` prefix tokens first, then the grid in row-major order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple, Union

import torch

__all__ = ["Checkerboard"]

Device = Union[torch.device, str, None]


@dataclasses.dataclass(frozen=True)
class Checkerboard:
    """An ``H x W`` patch grid behind ``P`` prefix tokens, split into the A and B sets of the merge.

    ``NA = ceil(HW / 2)`` A tokens (the A cells, row-major); ``NB = P + floor(HW / 2)`` B tokens (the prefix tokens,
    then the B cells, row-major). Construct with :meth:`of` to validate user input.
    """

    height: int
    width: int
    prefix: int

    @classmethod
    def of(cls, grid_size: Sequence[int], num_prefix_tokens: int) -> "Checkerboard":
        """Validated geometry: ``grid_size = (H, W)`` two positive ints with ``H * W >= 2``, ``P >= 0``."""
        if len(grid_size) != 2 or any(int(g) != g or g < 1 for g in grid_size):
            raise ValueError(f"grid_size must be two positive ints (H, W), got {tuple(grid_size)}")
        if int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        grid = cls(int(grid_size[0]), int(grid_size[1]), int(num_prefix_tokens))
        if grid.cells < 2:
            raise ValueError(f"grid_size {grid.height}x{grid.width} has fewer than 2 patches; merging needs H*W >= 2")
        return grid

    # ------------------------------------------------------------------ counts
    @property
    def size(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return self.height, self.width

    @property
    def cells(self) -> int:
        return self.height * self.width

    @property
    def num_a(self) -> int:
        return (self.cells + 1) // 2

    @property
    def num_b(self) -> int:
        return self.prefix + self.cells // 2

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.cells

    def check_tokens(self, num_tokens: int, name: str) -> None:
        """ValueError unless a tensor called ``name`` with ``num_tokens`` tokens lies on this grid."""
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"{name} has N={num_tokens} tokens but num_prefix_tokens + H*W = "
                f"{self.prefix} + {self.height}*{self.width} = {self.num_tokens}"
            )

    # ------------------------------------------------------------------ token maps
    def a_token(self, i: int) -> int:
        """Token index of A token ``i`` (``0 <= i < NA``)."""
        q = 2 * i
        if self.width % 2 == 0:
            q += (q // self.width) & 1  # odd rows start their A cells at column 1
        return self.prefix + q

    def b_token(self, j: int) -> int:
        """Token index of B token ``j`` (``0 <= j < NB``): the prefix tokens first, then the B cells."""
        if j < self.prefix:
            return j
        q = 2 * (j - self.prefix)
        q += 1 - ((q // self.width) & 1) if self.width % 2 == 0 else 1  # odd rows (even W) start at column 0
        return self.prefix + q

    def indices(self, device: Device = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(idx_a [NA], idx_b [NB])`` indexing the token axis of ``x [B, N, C]``, cached per device.

        The cached tensors are made outside inference mode, so autograd can use them whatever mode the first call
        ran in; under ``torch.compile`` they are built in the graph (constants after tracing)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if torch.compiler.is_compiling():
            return self._build_indices(device)
        return _cached_indices(self, device)

    def _build_indices(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        # a_token / b_token over all positions at once (static shapes, so torch.compile traces it).
        even_width = int(self.width % 2 == 0)
        q_a = 2 * torch.arange(self.num_a, device=device)
        q_a = q_a + ((q_a // self.width) % 2) * even_width
        q_b = 2 * torch.arange(self.num_b - self.prefix, device=device)
        q_b = q_b + (1 - ((q_b // self.width) % 2) * even_width)
        return q_a + self.prefix, torch.cat([torch.arange(self.prefix, device=device), q_b + self.prefix])

@functools.lru_cache(maxsize=256)
def _cached_indices(grid: Checkerboard, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):
        return grid._build_indices(device)
