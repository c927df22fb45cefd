"""What the tests share (docs/design.md §6): shapes, the one input factory, gradients, the one ``assert_close``, the
backend x dtype x shape cases built from the backend registry, the frozen-STE surrogate of the reference's
gradchecks, and the tiny timm models.

Tolerances come from the registry only (``Backend.forward`` / ``Backend.grad``, per dtype), with
``torch.testing.assert_close``'s elementwise meaning: ``|actual - expected| <= atol + rtol * |expected|``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import pytest
import torch

from fpet_kernels import reference
from fpet_kernels.backends import Backend, Tolerance, get_backend
from fpet_kernels.geometry import Checkerboard

__all__ = [
    "Shape",
    "Case",
    "COMPILED_SHAPES",
    "TRITON_SHAPES",
    "WIDE",
    "GRADCHECK_SHAPES",
    "EXACT",
    "backend_cases",
    "skip_reason",
    "requires_backend",
    "requires_cuda",
    "backend_marks",
    "GPU_BACKENDS",
    "backend_device",
    "random_tensor",
    "make_inputs",
    "adapter_weights",
    "leaves",
    "weighted_loss",
    "grads_of",
    "assert_close",
    "assert_matches_reference",
    "frozen_ste",
    "assert_same_vjp",
    "REFERENCE_GRADCHECK_GRIDS",
    "tiny_vit",
    "images",
    "run_python",
]

EXACT = Tolerance(0.0, 0.0)


# ---------------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    """``x [batch, prefix + height * width, channels]`` and ``metric [batch, prefix + height * width, dim]``."""

    batch: int
    height: int
    width: int
    prefix: int
    channels: int
    dim: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.height, self.width)

    @property
    def checkerboard(self) -> Checkerboard:
        return Checkerboard(self.height, self.width, self.prefix)

    def with_batch(self, batch: int) -> "Shape":
        return dataclasses.replace(self, batch=batch)

    def __str__(self) -> str:
        return f"B{self.batch}_{self.height}x{self.width}_P{self.prefix}_C{self.channels}_D{self.dim}"


# The compiled backends: grids 1x2, odd, non-square, the ViT-B/16 grid; P = 0..4; B = 1; C, Dh not multiples of 8.
COMPILED_SHAPES = [
    Shape(2, 1, 2, 0, 8, 4),  # smallest grid: one A, one B patch
    Shape(1, 2, 1, 3, 5, 3),  # column grid, B = 1, prefix tokens the only B tokens besides one patch
    Shape(3, 3, 3, 1, 13, 7),  # odd square
    Shape(2, 3, 5, 2, 24, 16),  # odd, non-square
    Shape(2, 4, 6, 4, 17, 9),  # even, non-square, P = 4
    Shape(1, 5, 4, 0, 33, 12),
    Shape(2, 7, 7, 1, 40, 20),
    Shape(2, 14, 14, 1, 32, 64),  # ViT-B/16 grid
]
# Triton under the interpreter (CPU, slow): tiny shapes. Odd and non-square grids, P = 0..3, one B patch (1x2, 1x3),
# masked tails (C, Dh, NA, NB not powers of two).
TRITON_SHAPES = [
    Shape(2, 3, 4, 1, 7, 5),
    Shape(2, 3, 3, 0, 6, 4),
    Shape(2, 2, 5, 2, 9, 3),
    Shape(2, 1, 2, 0, 5, 4),
    Shape(2, 1, 3, 3, 6, 7),
    Shape(2, 5, 3, 3, 10, 6),
    Shape(2, 4, 4, 1, 33, 17),
]
# The compiled backends' float64 gradchecks: small, with B = 1, P = 0 and a 1x2 grid.
GRADCHECK_SHAPES = [Shape(2, 3, 3, 1, 5, 4), Shape(1, 2, 3, 0, 3, 3), Shape(1, 1, 2, 2, 4, 3)]
# More than one block of B columns (the similarity kernel's running top-2 merge) and of A rows in the Triton kernels.
WIDE = Shape(2, 12, 11, 1, 20, 8)

BACKEND_NAMES = ("cpp", "cuda", "triton")
# The dtypes each backend is tested in unless a test asks for others (always intersected with the registry's).
_TEST_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
_DEFAULT_SHAPES = {"cpp": COMPILED_SHAPES, "cuda": COMPILED_SHAPES, "triton": TRITON_SHAPES}


# ---------------------------------------------------------------------------------------------- backends
def backend_device(name: str) -> str:
    """The device type the tests give backend ``name`` tensors on."""
    return get_backend(name).devices[0]


def skip_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot be tested here (None when it can): the registry's reason."""
    try:
        return get_backend(name).unavailable_reason()
    except Exception as error:  # a probe must give a reason, never raise; say so instead of breaking collection
        return f"probing the {name} backend raised {type(error).__name__}: {error}"


# Backends whose tests are GPU tests (``pytest -m gpu``, run by bench/gpu_check.py): on a GPU they run compiled
# kernels; without one they skip (cuda) or run under the Triton interpreter (triton).
GPU_BACKENDS = ("cuda", "triton")


def backend_marks(name: str) -> List[Any]:
    """The marks of a test of backend ``name``: a skip (with the registry's reason) where it cannot run, and the
    ``gpu`` marker for the GPU backends."""
    reason = skip_reason(name)
    marks = [pytest.mark.skipif(reason is not None, reason=f"backend {name!r}: {reason}")]
    return marks + [pytest.mark.gpu] if name in GPU_BACKENDS else marks


def _apply(marks: Sequence[Any]) -> Callable:
    def decorate(test: Callable) -> Callable:
        for mark in marks:
            test = mark(test)
        return test

    return decorate


def requires_backend(name: str) -> Callable:
    """A decorator giving a test :func:`backend_marks` of ``name``."""
    return _apply(backend_marks(name))


def requires_cuda(reason: str) -> Callable:
    """A decorator for a test that needs a CUDA device: the ``gpu`` marker, and a skip with ``reason`` without one."""
    return _apply([pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)])


@dataclasses.dataclass(frozen=True)
class Case:
    """One backend x dtype x shape test case. ``shape`` is a :class:`Shape` or whatever the test parametrises."""

    backend: str
    dtype: torch.dtype
    shape: Any

    @property
    def entry(self) -> Backend:
        return get_backend(self.backend)

    @property
    def impl(self):
        """The backend's implementation module (the six ops with the reference's signatures)."""
        return self.entry.implementation()

    @property
    def device(self) -> str:
        return backend_device(self.backend)

    @property
    def forward(self) -> Tolerance:
        """The registry's forward tolerance for outputs in this case's dtype."""
        return self.entry.forward[self.dtype]

    @property
    def grad(self) -> Tolerance:
        """The registry's gradient tolerance for gradients in this case's dtype."""
        return self.entry.grad[self.dtype]

    def forward_for(self, output: torch.Tensor) -> Tolerance:
        """The registry's forward tolerance for ``output``'s dtype: scores and merged sizes of 16-bit inputs are
        float32 (computed in float32 from exactly converted inputs) and are held to the float32 tolerance."""
        return self.entry.forward[output.dtype]

    @property
    def interpreted(self) -> bool:
        """Triton kernels run by the interpreter on CPU tensors (slow: the tests keep to their essentials there)."""
        return self.backend == "triton" and self.device == "cpu"

    @property
    def noncontiguous(self) -> bool:
        """Shapes with a batch > 1 run on transposed views (half of the shapes)."""
        return getattr(self.shape, "batch", 1) > 1

    def inputs(self, seed: int = 0):
        """``make_inputs`` of this case's shape, dtype, device and layout."""
        return make_inputs(self.shape, self.dtype, self.device, seed=seed, noncontiguous=self.noncontiguous)

    def __str__(self) -> str:
        return f"{self.backend}-{str(self.dtype).replace('torch.', '')}-{self.shape}"


def _per_backend(value, name: str, default):
    if value is None:
        return default
    if isinstance(value, Mapping):
        return value.get(name, default)
    return value


def backend_cases(
    dtypes: Union[Sequence[torch.dtype], Mapping[str, Sequence[torch.dtype]], None] = None,
    shapes: Union[Sequence[Any], Mapping[str, Sequence[Any]], None] = None,
    backends: Iterable[str] = BACKEND_NAMES,
    xfail: Optional[Mapping[str, str]] = None,
) -> List[Any]:
    """pytest params of :class:`Case` for every backend x dtype x shape.

    ``dtypes`` / ``shapes``: one list for every backend, or a mapping from backend name to its list (backends not in
    it keep the default). Default dtypes: float64, float32 and bfloat16, intersected with the dtypes the registry
    says the backend takes (so never float64 for triton); default shapes: :data:`COMPILED_SHAPES` for cpp and cuda,
    :data:`TRITON_SHAPES` for triton. Cases of a backend that cannot run here skip with the registry's reason.
    ``xfail``: backend name -> why its cases are expected to fail (a known finding, reported; not strict).
    """
    params = []
    for name in backends:
        entry = get_backend(name)
        wanted = _per_backend(dtypes, name, _TEST_DTYPES)
        reason = skip_reason(name)
        marks = [pytest.mark.skip(reason=f"backend {name!r}: {reason}")] if reason is not None else []
        if name in GPU_BACKENDS:
            marks.append(pytest.mark.gpu)
        if xfail and name in xfail:
            marks.append(pytest.mark.xfail(reason=xfail[name], strict=False))
        for dtype in (d for d in wanted if d in entry.dtypes):
            for shape in _per_backend(shapes, name, _DEFAULT_SHAPES[name]):
                case = Case(name, dtype, shape)
                params.append(pytest.param(case, id=str(case), marks=marks))
    return params


# ---------------------------------------------------------------------------------------------- inputs
def random_tensor(
    *shape: int,
    dtype: torch.dtype = torch.float64,
    device: Union[torch.device, str] = "cpu",
    seed: int = 0,
    positive: bool = False,
    noncontiguous: bool = False,
) -> torch.Tensor:
    """Standard normal values (``positive``: uniform in [0.5, 1.5)) drawn in float64 from a generator seeded with
    ``seed``, then cast: the same values for every dtype and device. ``noncontiguous``: a transposed view of them."""
    gen = torch.Generator().manual_seed(seed)
    if positive:
        t = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = t.to(device=device, dtype=dtype)
    if noncontiguous:
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
        assert not t.is_contiguous() or t.dim() < 2 or 1 in t.shape
    return t


def make_inputs(
    shape: Shape,
    dtype: torch.dtype = torch.float64,
    device: Union[torch.device, str] = "cpu",
    *,
    seed: int = 0,
    noncontiguous: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input factory: ``x [B, N, C]``, ``metric [B, N, Dh]`` (standard normal) and ``size [B, N]`` (in
    [0.5, 1.5)), drawn with seeds ``seed``, ``seed + 1``, ``seed + 2``; ``noncontiguous`` makes x and metric
    transposed views of the same values."""
    lead = (shape.batch, shape.tokens)
    kwargs = dict(dtype=dtype, device=device)
    x = random_tensor(*lead, shape.channels, seed=seed, noncontiguous=noncontiguous, **kwargs)
    metric = random_tensor(*lead, shape.dim, seed=seed + 1, noncontiguous=noncontiguous, **kwargs)
    size = random_tensor(*lead, seed=seed + 2, positive=True, **kwargs)
    return x, metric, size


def adapter_weights(
    dim: int, hidden: int, dtype: torch.dtype = torch.float64, device: Union[torch.device, str] = "cpu", seed: int = 11
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Refinement adapter weights ``w_down [hidden, dim]``, ``w_up [dim, hidden]`` scaled by 1 / sqrt(fan-in)."""
    w_down = random_tensor(hidden, dim, dtype=torch.float64, seed=seed) / dim**0.5
    w_up = random_tensor(dim, hidden, dtype=torch.float64, seed=seed + 1) / hidden**0.5
    return w_down.to(device, dtype), w_up.to(device, dtype)


# ---------------------------------------------------------------------------------------------- gradients
def leaves(*tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Fresh leaf copies; floating ones require grad."""
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def weighted_loss(outputs: Sequence[torch.Tensor], seed: int = 7) -> torch.Tensor:
    """``sum_k <out_k, w_k>`` with fixed random weights ``w_k`` over the finite entries, so that every output gets a
    gradient (integer outputs are skipped)."""
    total = 0
    for k, out in enumerate(outputs):
        if not out.is_floating_point():
            continue
        w = random_tensor(*out.shape, dtype=out.dtype, device=out.device, seed=seed + k)
        total = total + (out.masked_fill(torch.isinf(out), 0) * w).sum()
    return total


def grads_of(fn: Callable, tensors: Sequence[Optional[torch.Tensor]]):
    """``(gradients, outputs)`` of :func:`weighted_loss` of ``fn(*tensors)``: one gradient per tensor, None for those
    that are None, do not require grad, or get none."""
    out = fn(*tensors)
    out = out if isinstance(out, tuple) else (out,)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(weighted_loss(out), wanted, allow_unused=True) if wanted else ())
    return [next(got) if t is not None and t.requires_grad else None for t in tensors], out


# ---------------------------------------------------------------------------------------------- comparisons
def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, name: str = "") -> None:
    """``torch.testing.assert_close`` with the registry's ``tolerance``: same shape, dtype and device, equal
    non-finite entries, and ``|actual - expected| <= atol + rtol * |expected|`` elementwise."""
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    torch.testing.assert_close(
        actual.detach(), expected.detach(), atol=tolerance.atol, rtol=tolerance.rtol,
        msg=(lambda message: f"{name}: {message}") if name else None,
    )


def assert_matches_reference(case: Case, run: Callable, tensors: Sequence[Optional[torch.Tensor]],
                             names: Sequence[str] = ()) -> None:
    """``run(impl)`` -> a function of ``tensors``. The backend's outputs match the reference's within the forward
    tolerance and its gradients within the gradient tolerance, with no gradient where the reference has none.
    Tensors that require grad get gradients; pass :func:`leaves` for all floating ones."""
    def copies():
        return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]

    got_grads, got = grads_of(run(case.impl), copies())
    want_grads, want = grads_of(run(reference), copies())
    for k, (a, b) in enumerate(zip(got, want)):
        if b.is_floating_point():
            assert_close(a, b, case.forward_for(b), f"output {k}")
        else:
            assert torch.equal(a, b), f"output {k}"
    for k, (a, b) in enumerate(zip(got_grads, want_grads)):
        name = names[k] if k < len(names) else f"grad {k}"
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, case.grad, name)


# ---------------------------------------------------------------------------------------------- STE gradchecks
# (grid, prefix) of the reference's float64 gradchecks.
REFERENCE_GRADCHECK_GRIDS = [((1, 2), 0), ((2, 2), 1), ((3, 5), 2), ((5, 3), 0), ((1, 3), 3)]


def frozen_ste(scores_fn: Callable) -> Callable:
    """A smooth function with the STE's value and Jacobian at the evaluation point.

    ``M = Soft + stopgrad(Hard - Soft)`` is piecewise constant, so finite differences of it are zero. Its gradient is
    that of ``Soft(theta) + C`` with ``C = (Hard - Soft)(theta0)`` frozen at the point: gradcheck that function
    numerically, then require the op's autograd gradient to equal it.
    """

    def soft(*inputs):
        scores = scores_fn(*inputs)
        top = scores.topk(2, dim=-1).values if scores.shape[-1] >= 2 else scores.expand(*scores.shape[:-1], 2)
        top2 = torch.where(torch.isinf(top[..., 1:]), top[..., :1], top[..., 1:])
        return torch.sigmoid(scores - (top[..., :1] + top2) / 2)

    def make(*point):
        with torch.no_grad():
            scores = scores_fn(*point)
            hard = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)
            offset = hard - soft(*point)
        return lambda *inputs: soft(*inputs) + offset

    return make


def assert_same_vjp(fn_a: Callable, fn_b: Callable, inputs: Sequence[torch.Tensor], seed: int = 0) -> None:
    """``fn_a`` and ``fn_b`` agree in value (1e-12) and vector-Jacobian product (rtol 1e-10, atol 1e-12), float64."""
    outs_a, outs_b = fn_a(*inputs), fn_b(*inputs)
    outs_a = outs_a if isinstance(outs_a, tuple) else (outs_a,)
    outs_b = outs_b if isinstance(outs_b, tuple) else (outs_b,)
    gen = torch.Generator().manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs_a]
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_a = torch.autograd.grad(outs_a, inputs, probes, allow_unused=True)
    grads_b = torch.autograd.grad(outs_b, inputs, probes, allow_unused=True)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- models
def tiny_vit(**kwargs) -> torch.nn.Module:
    """A small timm VisionTransformer: 64x64 input, 8x8 grid of 8-pixel patches, 4 blocks, eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    config: Dict[str, Any] = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    config.update(kwargs)
    torch.manual_seed(0)
    return VisionTransformer(**config).eval()


def images(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of images of the model's input size."""
    height, width = model.patch_embed.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- subprocesses
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> Any:
    """Run ``code`` in a fresh interpreter (this checkout first on the path, the environment of the tests, so also
    TRITON_INTERPRET); its last line of output, parsed as JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
