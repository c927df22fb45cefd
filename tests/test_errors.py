"""Clear errors for bad input (the argument named, what was expected), on every CPU backend, and the documented
behaviour of NaN / inf inputs (docs/design.md §4 "Input checks")."""
import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import ops

from tests.helpers import backend_marks, images, tiny_vit

BACKENDS = [pytest.param("reference"), pytest.param("cpp", marks=backend_marks("cpp"))]
GRID = dict(grid_size=(2, 2), num_prefix_tokens=1)


def tokens(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 8, generator=generator, dtype=dtype), torch.randn(2, 5, 4, generator=generator,
                                                                               dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_sizes_are_refused(backend, value):
    x, metric = tokens()
    size = torch.ones(2, 5)
    size[1, 3] = value
    with pytest.raises(ValueError, match="size must hold finite token sizes > 0"):
        ops.merge_tokens(x, metric, size, backend=backend, **GRID)
    with pytest.raises(ValueError, match="size must hold finite token sizes > 0"):
        ops.scatter_mean_merge(x, size, torch.ones(2, 2, dtype=torch.int64), (2, 2), 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_dtypes_are_refused(backend):
    x, metric = tokens()
    with pytest.raises(TypeError, match="size must be torch.float32 for x of dtype torch.float32"):
        ops.merge_tokens(x, metric, torch.ones(2, 5, dtype=torch.float64), backend=backend, **GRID)
    with pytest.raises(TypeError, match="size must be torch.float64 for x of dtype torch.float64"):
        ops.merge_tokens(x.double(), metric.double(), torch.ones(2, 5), backend=backend, **GRID)
    with pytest.raises(TypeError, match="float64 cannot be mixed with other dtypes here, got x torch.float64"):
        ops.merge_tokens(x.double(), metric, None, backend=backend, **GRID)
    with pytest.raises(TypeError, match="metric, w_down and w_up must have one dtype"):
        ops.refine_keys(metric, torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 3), backend=backend)
    with pytest.raises(TypeError, match="metric, w_down and w_up must have one dtype"):
        ops.refine_keys(metric.half(), torch.randn(3, 4), torch.randn(4, 3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_on_different_devices_are_refused(backend):
    x, metric = tokens()
    with pytest.raises(ValueError, match="all inputs must be on one device, got x on cpu, metric on meta"):
        ops.merge_tokens(x, metric.to("meta"), None, backend=backend, **GRID)
    with pytest.raises(ValueError, match="size on meta"):
        ops.merge_tokens(x, metric, torch.ones(2, 5, device="meta"), backend=backend, **GRID)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_ranks_shapes_and_grids_are_refused(backend):
    x, metric = tokens()
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, D\], got \(5, 8\)"):
        ops.merge_tokens(x[0], metric, None, backend=backend, **GRID)
    with pytest.raises(ValueError, match=r"metric must have shape \[B, N, Dh\] with B, N of x"):
        ops.merge_tokens(x, metric[:, :4], None, backend=backend, **GRID)
    with pytest.raises(ValueError, match=r"x has N=5 tokens but num_prefix_tokens \+ H\*W = 1 \+ 2\*3 = 7"):
        ops.merge_tokens(x, metric, None, grid_size=(2, 3), num_prefix_tokens=1, backend=backend)
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        ops.checkerboard_similarity(metric, (1, 1), 4, backend=backend)
    with pytest.raises(ValueError, match=r"size must have shape \[B, N\] = \[2, 5\]"):
        ops.merge_tokens(x, metric, torch.ones(2, 4), backend=backend, **GRID)


def test_model_level_mistakes_are_refused_with_the_argument_named():
    model = fk.apply_fpet(tiny_vit())
    with pytest.raises(ValueError, match="images are 48x48 but this model takes 64x64"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="already patched with FPET"):
        fk.apply_fpet(model)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 4\) for a model with 4 blocks, got 4"):
        fk.apply_fpet(tiny_vit(), layer=4)
    with torch.no_grad():
        assert model(images(model)).shape == (2, 5)  # the refused calls left the model working
