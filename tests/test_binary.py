"""1-bit weights with a straight-through estimator (docs/design.md §2 step 2): fpet_kernels.binary."""
import torch

from fpet_kernels.binary import BINARY_MAGNITUDE, binarize


def test_binarize_values_and_straight_through_gradient():
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    q = binarize(w)
    mu, sigma = w.mean().detach(), w.std().detach()
    levels = mu + torch.tensor([-1.0, 1.0], dtype=torch.float64) * BINARY_MAGNITUDE * sigma
    assert set(torch.round(q.detach(), decimals=9).unique().tolist()) <= set(torch.round(levels, decimals=9).tolist())
    # Straight-through: the gradient is that of (W^ + K) * sigma + mu with K = c*sign(W^) - W^ held constant.
    normalized = (w.detach() - mu) / (sigma + 1e-5)
    k = BINARY_MAGNITUDE * torch.where(normalized >= 0, 1.0, -1.0).double() - normalized

    def surrogate(weight):
        m, s = weight.mean(), weight.std()
        return ((weight - m) / (s + 1e-5) + k) * s + m

    probe = torch.randn(8, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad((q * probe).sum(), w)
    (want,) = torch.autograd.grad((surrogate(w) * probe).sum(), w)
    torch.testing.assert_close(grad, want)


def test_binarize_sign_of_zero_is_plus_one():
    w = torch.tensor([-1.0, 0.0, 1.0])  # mean 0: the middle weight normalises to exactly 0
    q = binarize(w)
    assert q[1] > 0 and q[1] == q[2]
