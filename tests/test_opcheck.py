"""``torch.library.opcheck`` over every forward op of both op libraries, ``fpet::`` (the C++ extension: CPU, and
CUDA where built and available) and ``fpet_triton::`` (the Triton kernels, under the interpreter without a GPU),
with and without the optional tensors; and their schemas, which are the contract's (the same in both)."""
import pytest
import torch

from fpet_kernels import reference as ref
from fpet_kernels.backends import OPS, get_backend

from tests.helpers import Shape, adapter_weights, backend_marks, leaves, make_inputs, requires_backend, skip_reason

# (op, variant): every forward op; the optional tensors present and absent.
OP_CASES = [
    ("refine_keys", "no_dropout"),
    ("refine_keys", "keep_mask"),
    ("checkerboard_similarity", ""),
    ("ste_match", ""),
    ("scatter_mean_merge", "size"),
    ("scatter_mean_merge", "no_size"),
    ("scatter_mean_merge_dense", "size"),
    ("merge_tokens", "size"),
    ("merge_tokens", "no_size"),
]
SHAPE = Shape(2, 3, 4, 1, 6, 5)


def opcheck_args(op, variant, device):
    """Tiny float32 inputs on ``device`` requiring grad, in the order of the op's schema."""
    x, metric, size = leaves(*make_inputs(SHAPE, torch.float32, device))
    grid = (SHAPE.height, SHAPE.width, SHAPE.prefix)
    scores = ref.checkerboard_similarity(metric.detach(), SHAPE.grid, SHAPE.prefix)
    if op == "refine_keys":
        w_down, w_up = leaves(*adapter_weights(SHAPE.dim, 3, torch.float32, device))
        if variant == "keep_mask":
            keep = ref.dropout_keep_mask((*metric.shape[:-1], 3), 0.3, device)
            return metric, w_down, w_up, keep, 0.7, 0.3
        return metric, w_down, w_up, None, 0.7, 0.0
    if op == "checkerboard_similarity":
        return (metric, *grid)
    if op == "ste_match":
        return (scores.masked_fill(torch.isinf(scores), -1e4).requires_grad_(),)
    size = size if variant == "size" else None
    if op == "scatter_mean_merge":
        return (x, size, scores.argmax(-1), *grid)
    if op == "scatter_mean_merge_dense":
        return (x, size, torch.softmax(scores, -1).requires_grad_(), *grid)
    return (x, metric, size, *grid)


# Where the kernels compile, every opcheck test. Under TRITON_INTERPRET=1 only the schema and autograd registration
# tests: there ``torch.library.wrap_triton`` returns the kernel itself (an ``InterpretedFunction``, which lacks the
# JIT metadata the traceable wrapper needs) rather than a wrapper that becomes a ``triton_kernel_wrapper_*``
# higher-order op under fake and tracing modes. So the op's Python body, which ``triton_op`` also registers as its
# fake kernel, launches the interpreted kernel on whatever tensors it gets, and the interpreter copies every tensor
# argument's storage to the host: on the FakeTensors of ``test_faketensor`` that fails ("Attempted to set the storage
# of a tensor on device meta to a storage on different device cpu"), and so it does on the fake, functionalized
# tensors ``test_aot_dispatch_dynamic`` traces with ("Attempted to access the data pointer on an invalid python
# storage"); even past that, no kernel launch would be recorded in the AOT graph.
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETER_UTILS = ("test_schema", "test_autograd_registration")


def libraries():
    """``(namespace, backend)`` params: ``fpet`` on CPU (cpp) and CUDA (cuda), ``fpet_triton`` (triton)."""
    return [pytest.param(namespace, backend, id=f"{namespace}-{backend}",
                         marks=backend_marks(backend))
            for namespace, backend in (("fpet", "cpp"), ("fpet", "cuda"), ("fpet_triton", "triton"))]


def test_cases_cover_every_forward_op():
    assert {op for op, _ in OP_CASES} == set(OPS)


@pytest.mark.parametrize("op,variant", OP_CASES, ids=[f"{op}-{v}" if v else op for op, v in OP_CASES])
@pytest.mark.parametrize("namespace,backend", libraries())
def test_opcheck(namespace, backend, op, variant):
    entry = get_backend(backend)
    entry.implementation()  # loads the extension / registers the Triton ops
    device = entry.devices[0]
    interpreted = namespace == "fpet_triton" and device == "cpu"
    utils = INTERPRETER_UTILS if interpreted else ALL_UTILS
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), op).default, opcheck_args(op, variant, device),
                          test_utils=utils)


def _triton_op_honours_schema() -> bool:
    """Whether this torch's ``triton_op`` registers the ``schema`` it is given (torch 2.11 and older infer one from
    the annotations instead, with ``SymInt`` for ``int``)."""
    from torch.library import triton_op

    def probe(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.clone()

    if not hasattr(torch.ops.fpet_schema_probe, "probe"):
        triton_op("fpet_schema_probe::probe", mutates_args=(), schema="(Tensor x, int n) -> Tensor")(probe)
    return "int n" in str(torch.ops.fpet_schema_probe.probe.default._schema)


@pytest.mark.parametrize("namespace,backend", libraries())
def test_forward_schemas_match_the_contract(namespace, backend):
    """The forward ops are registered with the contract's schemas (``library.SCHEMAS``, word for word the same for
    ``fpet`` and ``fpet_triton``: ``int`` grid arguments, not inferred ``SymInt``). Where torch's ``triton_op``
    ignores the schema it is given (torch <= 2.11), the ``fpet_triton`` schemas differ only by ``SymInt``."""
    if skip_reason("triton") is not None:
        pytest.skip("the contract's schemas are written in fpet_kernels.backends.triton_backend.library (no triton)")
    from fpet_kernels.backends.triton_backend import library

    get_backend(backend).implementation()
    assert set(library.SCHEMAS) == set(library.OPS) == set(OPS)
    inferred = namespace == "fpet_triton" and not _triton_op_honours_schema()
    for name, schema in library.SCHEMAS.items():
        registered = str(getattr(getattr(torch.ops, namespace), name).default._schema)
        if inferred:
            registered = registered.replace("SymInt ", "int ")
        assert registered == f"{namespace}::{name}{schema}"


@requires_backend("cpp")
def test_the_extension_registers_each_forward_op_and_its_backward():
    from fpet_kernels.backends import compiled

    assert set(compiled.registered_ops()) == set(OPS) | {f"{op}_backward" for op in OPS}
