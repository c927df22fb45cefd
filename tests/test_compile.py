"""``torch.compile(fullgraph=True)`` traces the public ``ops.merge_tokens`` (input checks, backend dispatch and the
op) with no graph break and no host sync, on the cpp and reference backends: forward, and a training-style
forward + backward, matching eager. The Triton ops compile on a GPU. (The model-level compile test is in
test_vit_patch.py.)"""
import pytest
import torch

from fpet_kernels import ops

from tests.helpers import (
    Shape,
    backend_cases,
    grads_of,
    leaves,
    make_inputs,
    backend_marks,
    requires_backend,
    requires_cuda,
    run_python,
    skip_reason,
)

SHAPE = Shape(2, 4, 6, 1, 16, 8)
BACKENDS = [pytest.param("reference"), pytest.param("cpp", marks=backend_marks("cpp"))]
# AOTAutograd without code generation: it traces forward and backward graphs as inductor does, without inductor's
# C++ compilation of the reference's graph on CPU (over a minute here).
COMPILER = "aot_eager"


def merge_fn(backend, shape=SHAPE):
    def merge(x, metric, size):
        return ops.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix,
                                backend=backend)

    return merge


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_tokens_traces_without_graph_breaks(backend):
    explanation = torch._dynamo.explain(merge_fn(backend))(*leaves(*make_inputs(SHAPE, torch.float32)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_forward_matches_eager(backend):
    fn = merge_fn(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
    x, metric, size = make_inputs(SHAPE, torch.float32)
    with torch.no_grad():
        for size_arg in (size, None):
            for got, want in zip(compiled(x, metric, size_arg), fn(x, metric, size_arg)):
                assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_training_step_matches_eager(backend):
    """Forward + backward through the compiled function, the merge block's use in training."""
    fn = merge_fn(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
    x, metric, size = make_inputs(SHAPE, torch.float32, seed=3)
    got_grads, got = grads_of(compiled, leaves(x, metric, size))
    want_grads, want = grads_of(fn, leaves(x, metric, size))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def test_first_call_under_torch_compile():
    """In a fresh process the first merge_tokens runs under torch.compile(fullgraph=True): the backend is probed and
    loaded then (not traced), for backend cpp (when built), auto and reference, forward and backward."""
    names = (["cpp"] if skip_reason("cpp") is None else []) + ["auto", "reference"]
    code = f"""
import json, warnings
import torch
from fpet_kernels import ops
warnings.simplefilter("ignore")
torch.manual_seed(0)
x, metric, size = (torch.randn(2, 13, 6), torch.randn(2, 13, 4), torch.rand(2, 13) + 0.5)
results = {{}}
for name in {names!r}:
    def merge(x, metric, size):
        return ops.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend=name)
    leaves = [t.clone().requires_grad_() for t in (x, metric, size)]
    out = torch.compile(merge, fullgraph=True, backend="aot_eager")(*leaves)
    (out[0].square().sum() + out[1].sum()).backward()
    want = merge(*[t.clone().requires_grad_() for t in (x, metric, size)])
    results[name] = all(torch.equal(a, b) for a, b in zip(out, want)) and all(t.grad is not None for t in leaves)
print(json.dumps(results))
"""
    assert run_python(code) == {name: True for name in names}


@requires_cuda("torch.compile of the Triton ops needs a CUDA device")
@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.bfloat16,), shapes=[Shape(8, 14, 14, 1, 768, 64)],
                                               backends=("triton",)))
def test_torch_compile_traces_the_triton_ops(case):
    shape = case.shape
    x, metric, size = leaves(*make_inputs(shape, case.dtype, case.device))
    kwargs = dict(grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    compiled = torch.compile(lambda *a: case.impl.merge_tokens(*a, **kwargs), fullgraph=True)
    got_grads, got = grads_of(compiled, [x, metric, size])
    want_grads, want = grads_of(lambda *a: case.impl.merge_tokens(*a, **kwargs), [x, metric, size])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
