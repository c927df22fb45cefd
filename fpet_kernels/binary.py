"""1-bit weights with a straight-through estimator (docs/design.md §2 step 2) and a Linear that can use them."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Phi^-1(0.75): the magnitude that keeps a standard normal's mean absolute deviation after binarisation.
BINARY_MAGNITUDE = 0.6744897501960817


def binarize(weight: torch.Tensor) -> torch.Tensor:
    """``Q(W) = (W^ + stopgrad(c * sign(W^) - W^)) * sigma + mu`` with ``W^ = (W - mu) / (sigma + 1e-5)``.

    ``mu = W.mean()`` and ``sigma = W.std()`` (unbiased) stay differentiable; ``sign(0) = +1``. The forward value
    takes two levels, ``mu +- c * sigma``; the gradient passes straight through.
    """
    mu = weight.mean()
    sigma = weight.std()
    normalized = (weight - mu) / (sigma + 1e-5)
    sign = torch.where(normalized >= 0, 1.0, -1.0).to(normalized.dtype)
    quantized = normalized + (BINARY_MAGNITUDE * sign - normalized).detach()
    return quantized * sigma + mu


def init_up_projection(weight: torch.Tensor, bits: int) -> None:
    """Init of an adapter's Up projection: zeros for 32-bit weights, ``trunc_normal(0, 1e-3, +-2e-3)`` for 1-bit
    (an all-zero weight has sigma = 0, where the binarised weight has no gradient)."""
    if bits == 32:
        nn.init.zeros_(weight)
    else:
        nn.init.trunc_normal_(weight, mean=0.0, std=1e-3, a=-2e-3, b=2e-3)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight is used through :func:`binarize` when ``bits == 1`` (``bits == 32``: as is).

    The stored parameter stays full precision (it is what the optimiser updates); the bias is never binarised.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 32) -> None:
        if bits not in (1, 32):
            raise ValueError(f"bits must be 1 or 32, got {bits}")
        super().__init__(in_features, out_features, bias=bias)
        self.bits = bits

    def effective_weight(self) -> torch.Tensor:
        return binarize(self.weight) if self.bits == 1 else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"

