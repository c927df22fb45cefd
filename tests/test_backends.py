"""The backend registry and the public functional API (docs/design.md §4): entries, dispatch (``auto`` and by
name), errors for bad input and for unavailable backends, the fallback warning, and lazy discovery (importing
fpet_kernels imports neither triton nor the extension)."""
import warnings

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import ops, reference as ref
from fpet_kernels.backends import (
    BACKENDS,
    OPS,
    Backend,
    BackendUnavailableError,
    Tolerance,
    _probe,
    available_backends,
    get_backend,
    resolve_backend,
)
from fpet_kernels.backends import compiled

from tests.helpers import (
    COMPILED_SHAPES,
    TRITON_SHAPES,
    Shape,
    make_inputs,
    requires_backend,
    requires_cuda,
    run_python,
    skip_reason,
)

def inputs(grid=(3, 4), prefix=1, batch=2, channels=6, head_dim=4):
    return make_inputs(Shape(batch, *grid, prefix, channels, head_dim), torch.float32)


# ---------------------------------------------------------------------------------------------- the registry
def test_registry_entries():
    assert BACKENDS == ("auto", "reference", "cpp", "cuda", "triton")
    for name in BACKENDS[1:]:
        entry = get_backend(name)
        assert isinstance(entry, Backend) and entry.name == name
        assert set(entry.forward) == set(entry.grad) == set(entry.dtypes)
        assert all(isinstance(t, Tolerance) for t in (*entry.forward.values(), *entry.grad.values()))
        assert set(entry.devices) <= {"cpu", "cuda"}
    assert get_backend("cpp").devices == ("cpu",) and get_backend("cuda").devices == ("cuda",)
    assert torch.float64 not in get_backend("triton").dtypes
    assert all(t == Tolerance(0.0, 0.0) for t in get_backend("reference").forward.values())
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("fast")


@pytest.mark.parametrize("name", BACKENDS[1:])
def test_implementation_has_the_six_ops_or_says_why_not(name):
    entry = get_backend(name)
    reason = skip_reason(name)
    if reason is None:
        module = entry.implementation()
        assert all(callable(getattr(module, op)) for op in OPS)
        assert name in available_backends()
    else:
        assert name not in available_backends() and not entry.available
        with pytest.raises(BackendUnavailableError, match=f"backend {name!r} is not available"):
            entry.implementation()


def test_reference_backend_matches_reference_module():
    x, metric, size = inputs()
    got = fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend="reference")
    want = ref.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    scores = fk.checkerboard_similarity(metric, (3, 4), 1, backend="reference")
    assert torch.equal(scores, ref.checkerboard_similarity(metric, (3, 4), 1))
    matching, index = fk.ste_match(scores, backend="reference")
    merged = fk.scatter_mean_merge(x, size, index, (3, 4), 1, backend="reference")
    assert torch.equal(merged[0], want[0])
    dense = fk.scatter_mean_merge_dense(x, size, matching, (3, 4), 1, backend="reference")
    assert torch.equal(dense[0], ref.scatter_mean_merge_dense(x, size, matching, (3, 4), 1)[0])
    w_down, w_up = torch.randn(8, 4), torch.randn(4, 8)
    got = fk.refine_keys(metric, w_down, w_up, 0.5, backend="reference")
    assert torch.equal(got, ref.refine_keys(metric, w_down, w_up, 0.5))


def test_auto_resolves_to_an_available_backend():
    assert "reference" in fk.available_backends()
    assert ops.resolve_backend("auto", torch.device("cpu")).name in fk.available_backends()


@requires_backend("cpp")
def test_auto_picks_cpp_on_cpu():
    assert "cpp" in ops.available_backends()
    assert ops.resolve_backend("auto", torch.device("cpu")).name == "cpp"
    shape = COMPILED_SHAPES[2]
    x, metric, size = make_inputs(shape, torch.float32)
    kwargs = dict(grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    got = ops.merge_tokens(x, metric, size, backend="cpp", **kwargs)
    for a, b in zip(got, ref.merge_tokens(x, metric, size, **kwargs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "cuda", "triton") if skip_reason(b) is not None])
def test_unavailable_backend_says_how_to_get_it(backend):
    x, metric, size = inputs()
    with pytest.raises(fk.BackendUnavailableError, match=backend):
        fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend=backend)


def test_unknown_backend():
    x, metric, size = inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend="fast")


@requires_backend("cpp")
@requires_cuda("needs a CUDA device")
def test_cpp_backend_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        ops.checkerboard_similarity(torch.randn(1, 3, 4, device="cuda"), (1, 2), 1, backend="cpp")


@requires_backend("triton")
def test_float64_is_refused_with_a_pointer_to_other_backends():
    shape = TRITON_SHAPES[0]
    x, metric, size = make_inputs(shape, torch.float64, get_backend("triton").devices[0])
    with pytest.raises(TypeError, match="float64"):
        get_backend("triton").implementation().merge_tokens(x, metric, size, grid_size=shape.grid,
                                                            num_prefix_tokens=shape.prefix)
    with pytest.raises(TypeError, match=r"got torch.float64; use backend='reference' or 'cpp' or 'cuda' for float64"):
        ops.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix, backend="triton")


# ---------------------------------------------------------------------------------------------- the fallback
@pytest.fixture
def simulated_missing_extension(monkeypatch):
    """The extension as if it failed to load: the registry probes again, and again after the test."""
    monkeypatch.setattr(compiled, "load_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(compiled, "_warned", type(compiled._warned)())
    _probe.cache_clear()
    yield
    _probe.cache_clear()


def test_fallback_warns_once(simulated_missing_extension):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled.warn_fallback_once()
        compiled.warn_fallback_once()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]
    reasons = {name: get_backend(name).unavailable_reason() for name in ("cpp", "cuda")}
    assert all(reasons.values()) and "pip install" in reasons["cpp"]
    assert "cpp" not in available_backends() and "cuda" not in available_backends()


def test_auto_falls_back_to_the_reference_with_one_warning(simulated_missing_extension):
    x, metric, size = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", torch.device("cpu")).name == "reference"
        got = fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falls back to the pure-PyTorch reference" in messages[0]
    want = ref.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(BackendUnavailableError, match="ImportError: simulated"):
        fk.merge_tokens(x, metric, size, grid_size=(3, 4), num_prefix_tokens=1, backend="cpp")


# ---------------------------------------------------------------------------------------------- lazy discovery
LAZY_MODULES = ("triton", "fpet_kernels._C", "timm", "fpet_kernels.tools")


def test_import_is_lazy_and_auto_loads_cpp_on_the_first_cpu_op():
    state = run_python(f"""
import json, sys
import torch
import fpet_kernels
lazy = {LAZY_MODULES!r}
after_import = [m for m in lazy if m in sys.modules]
x, metric = torch.randn(1, 5, 3), torch.randn(1, 5, 4)
fpet_kernels.merge_tokens(x, metric, grid_size=(2, 2), num_prefix_tokens=1)
from fpet_kernels.backends import compiled, resolve_backend
print(json.dumps(dict(after_import=after_import, after_op=[m for m in lazy if m in sys.modules],
                      auto=resolve_backend("auto", torch.device("cpu")).name, loaded=compiled.load_error() is None)))
""")
    assert state["after_import"] == []
    cpp_ok = skip_reason("cpp") is None
    assert state["loaded"] == cpp_ok
    assert state["auto"] == ("cpp" if cpp_ok else "reference")
    # A CPU op asks for cpp only: triton, timm and the tools stay unimported.
    if cpp_ok:
        assert state["after_op"] == ["fpet_kernels._C"]
    else:
        assert [m for m in state["after_op"] if m != "fpet_kernels._C"] == []


def test_a_stale_extension_gives_a_reason_not_an_error():
    """An extension that imports but lacks the ops (built from older sources; here an empty module standing in for
    it) makes cpp and cuda unavailable with a reason: probing it never raises, and auto falls back."""
    state = run_python("""
import json, sys, types, warnings
import torch
sys.modules["fpet_kernels._C"] = types.ModuleType("fpet_kernels._C")  # imports, registers no fpet op
import fpet_kernels
from fpet_kernels.backends import available_backends, compiled, get_backend
warnings.simplefilter("ignore")
x, metric = torch.randn(1, 5, 3), torch.randn(1, 5, 4)
fpet_kernels.merge_tokens(x, metric, grid_size=(2, 2), num_prefix_tokens=1)
print(json.dumps(dict(error=compiled.load_error(), available=list(available_backends()),
                      reason=get_backend("cpp").unavailable_reason())))
""")
    assert "does not exist" in state["error"] and "reference" in state["available"]
    assert "cpp" not in state["available"] and "cuda" not in state["available"]
    assert "fpet_kernels._C" in state["reason"] and "pip install" in state["reason"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(metric=torch.randn(2, 13)), r"metric must have shape \[B, N, D\]"),
        (dict(metric=torch.randn(2, 12, 4)), "metric must have shape"),
        (dict(grid_size=(3, 3)), "N=13 tokens but num_prefix_tokens"),
        (dict(num_prefix_tokens=2), "N=13 tokens but num_prefix_tokens"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0"),
        (dict(grid_size=(3,)), "grid_size must be two positive ints"),
        (dict(size=torch.ones(2, 12)), r"size must have shape \[B, N\]"),
        (dict(x=torch.ones(2, 13, 6, dtype=torch.int32)), "x must be float64, float32, bfloat16 or float16"),
        (dict(metric=torch.randn(2, 13, 4, device="meta")), "all inputs must be on one device"),
    ],
)
def test_merge_tokens_bad_input(change, match):
    x, metric, size = inputs()
    kwargs = dict(x=x, metric=metric, size=size, grid_size=(3, 4), num_prefix_tokens=1)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fk.merge_tokens(kwargs.pop("x"), kwargs.pop("metric"), kwargs.pop("size"), **kwargs)


def test_grid_with_one_patch_is_refused():
    x, metric, _ = inputs(grid=(1, 1), prefix=1)
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        fk.merge_tokens(x, metric, grid_size=(1, 1), num_prefix_tokens=1)


def test_other_ops_bad_input():
    x, metric, size = inputs()
    with pytest.raises(ValueError, match=r"w_down must have shape \[d, Dh=4\]"):
        fk.refine_keys(metric, torch.randn(8, 5), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"w_up must have shape \[Dh, d\]"):
        fk.refine_keys(metric, torch.randn(8, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        fk.refine_keys(metric, torch.randn(8, 4), torch.randn(4, 8), dropout_p=1.0)
    with pytest.raises(ValueError, match=r"scores must have shape \[B, NA, NB\]"):
        fk.ste_match(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"matching must have shape \[B, NA, NB\] = \[2, 6, 7\]"):
        fk.scatter_mean_merge_dense(x, size, torch.rand(2, 6, 6), (3, 4), 1)
    with pytest.raises(ValueError, match=r"matching index values must lie in \[P, NB\)"):
        fk.scatter_mean_merge(x, size, torch.zeros(2, 6, dtype=torch.int64), (3, 4), 1)
    with pytest.raises(ValueError, match=r"matching index must have shape \[B, NA\] = \[2, 6\]"):
        fk.scatter_mean_merge(x, size, torch.ones(2, 5, dtype=torch.int64), (3, 4), 1)
    with pytest.raises(TypeError, match="for a float matching .* use scatter_mean_merge_dense"):
        fk.scatter_mean_merge(x, size, torch.rand(2, 6, 7), (3, 4), 1)
    with pytest.raises(ValueError, match="fewer than 2 patches"):
        fk.checkerboard_similarity(metric[:, :2], (1, 1), 1)


def test_triton_older_than_the_supported_minimum_is_refused_with_a_reason(monkeypatch):
    triton = pytest.importorskip("triton")
    from fpet_kernels.backends.triton_backend import availability

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    reason = availability.unavailable_reason()
    assert reason is not None and "triton 3.2.0 is older than 3.3" in reason
