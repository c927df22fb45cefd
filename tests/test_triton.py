"""The Triton backend against the reference: every op, forward and backward, over odd / non-square grids,
P = 0..3, a single B patch and masked tails (C, Dh, NA, NB not powers of two).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before they are first
imported) on CPU tensors: tiny shapes. With CUDA they run on the GPU, and a ViT-B-sized bfloat16 set runs too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fpet_kernels as fk  # noqa: E402
import fpet_kernels.triton as ft  # noqa: E402
from fpet_kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(ft.unavailable_reason() is not None, reason=str(ft.unavailable_reason()))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (H, W, P, C, Dh): odd and non-square grids, P = 0..3, one B patch (1x2, 1x3), masked tails.
SHAPES = [
    (3, 4, 1, 7, 5),
    (3, 3, 0, 6, 4),
    (2, 5, 2, 9, 3),
    (1, 2, 0, 5, 4),
    (1, 3, 3, 6, 7),
    (5, 3, 3, 10, 6),
    (4, 4, 1, 33, 17),
]
SHAPE_IDS = [f"{h}x{w}-P{p}-C{c}-D{d}" for h, w, p, c, d in SHAPES]
# More than one block of B columns in the similarity kernel (its running top-2 merge) and of A rows.
WIDE = (12, 11, 1, 20, 8)
# Largest error allowed, relative to the reference's largest magnitude (atol, rtol), per dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def make_inputs(shape, dtype=torch.float32, batch=2, seed=0):
    """x [B, N, C], metric [B, N, Dh], size [B, N] (in [0.5, 2.5)) on DEVICE, each requiring grad."""
    height, width, prefix, channels, head_dim = shape
    tokens = prefix + height * width
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen)
    metric = torch.randn(batch, tokens, head_dim, generator=gen)
    size = torch.rand(batch, tokens, generator=gen) * 2 + 0.5
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, metric, size)]


def assert_close(got, want, dtype=torch.float32, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    atol, rtol = TOLERANCE[dtype]
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], want[~finite]), name
    got, want = got[finite].double(), want[finite].double()
    if want.numel():
        error = (got - want).abs().max().item()
        bound = atol + rtol * want.abs().max().item()
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def grads(outputs, inputs, seed=1):
    """Gradients of ``sum <output, random>`` (plus the random weights) w.r.t. the inputs that require grad."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum() for out in outputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted)


def clone_leaves(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------------- op by op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_checkerboard_similarity(shape, dtype):
    _, metric, _ = make_inputs(shape, dtype)
    grid, prefix = shape[:2], shape[2]
    got = ft.checkerboard_similarity(metric, grid, prefix)
    want = ref.checkerboard_similarity(metric, grid, prefix)
    assert_close(got, want, torch.float32, "scores")
    assert_close(grads([got], [metric])[0], grads([want], [metric])[0], dtype, "dmetric")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [WIDE], ids=SHAPE_IDS + ["wide"])
def test_ste_match(shape, dtype):
    height, width, prefix = shape[:3]
    num_a, num_b = (height * width + 1) // 2, prefix + height * width // 2
    # Distinct values, exact in bfloat16, so that the top-2 has no ties (torch.topk's tie order is unspecified).
    gen = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(num_b, generator=gen) for _ in range(2 * num_a)]).view(2, num_a, num_b)
    scores = (scores / 128.0 - 0.5).masked_fill(torch.arange(num_b) < prefix, float("-inf"))
    scores = scores.to(DEVICE, dtype).requires_grad_()
    matching, index = ft.ste_match(scores)
    want_matching, want_index = ref.ste_match(scores)
    assert torch.equal(index, want_index) and torch.equal(matching, want_matching)
    assert_close(grads([matching], [scores])[0], grads([want_matching], [scores])[0], dtype, "dscores")


@pytest.mark.parametrize("with_size", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scatter_mean_merge_index(shape, dtype, with_size):
    x, metric, size = make_inputs(shape, dtype)
    size = size if with_size else None
    index = ref.checkerboard_similarity(metric.detach(), shape[:2], shape[2]).argmax(-1)
    got = ft.scatter_mean_merge(x, size, index, shape[:2], shape[2])
    want = ref.scatter_mean_merge(x, size, index, shape[:2], shape[2])
    for a, b, name in zip(got, want, ("x'", "size'")):
        assert_close(a, b, dtype, name)
    for a, b, name in zip(grads(got, [x, size]), grads(want, [x, size]), ("dx", "dsize")):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("soft", [False, True], ids=["one_hot", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scatter_mean_merge_dense(shape, dtype, soft):
    x, metric, size = make_inputs(shape, dtype)
    scores = ref.checkerboard_similarity(metric.detach(), shape[:2], shape[2])
    if soft:  # any float matching, not only the one-hot of ste_match: the dense path is a real GEMM
        matching = torch.softmax(scores, dim=-1).to(dtype).requires_grad_()
    else:
        matching = ref.ste_match(scores.requires_grad_())[0].detach().requires_grad_()
    got = ft.scatter_mean_merge(x, size, matching, shape[:2], shape[2])
    want = ref.scatter_mean_merge(x, size, matching, shape[:2], shape[2])
    for a, b, name in zip(got, want, ("x'", "size'")):
        assert_close(a, b, dtype, name)
    for a, b, name in zip(grads(got, [x, size, matching]), grads(want, [x, size, matching]), ("dx", "dsize", "dM")):
        assert_close(a, b, dtype, name)


# Every shape with and without sizes, with only the metric requiring grad, and with batch 1; the wide grid once.
MERGE_CASES = [
    pytest.param(shape, case, id=f"{shape_id}-{case}")
    for shape, shape_id in zip(SHAPES, SHAPE_IDS)
    for case in ("size", "no_size", "metric_only", "batch1")
] + [pytest.param(WIDE, "size", id="wide-size")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,case", MERGE_CASES)
def test_merge_tokens_forward_and_fused_backward(shape, dtype, case):
    x, metric, size = make_inputs(shape, dtype, batch=1 if case == "batch1" else 2)
    if case == "no_size":
        size = None
    if case == "metric_only":
        x.requires_grad_(False)
        size.requires_grad_(False)
    kwargs = dict(grid_size=shape[:2], num_prefix_tokens=shape[2])
    got = ft.merge_tokens(x, metric, size, **kwargs)
    want = ref.merge_tokens(x, metric, size, **kwargs)
    for a, b, name in zip(got, want, ("x'", "size'")):
        assert_close(a, b, dtype, name)
    names = [n for n, t in zip(("dx", "dmetric", "dsize"), (x, metric, size)) if t is not None and t.requires_grad]
    for a, b, name in zip(grads(got, [x, metric, size]), grads(want, [x, metric, size]), names):
        assert_close(a, b, dtype, name)


def test_merge_tokens_metric_not_requiring_grad():
    """refine_dim = 0 detaches the metric: the fused metric backward is skipped, x and size grads still flow."""
    x, metric, size = make_inputs(SHAPES[0])
    metric = metric.detach()
    kwargs = dict(grid_size=SHAPES[0][:2], num_prefix_tokens=SHAPES[0][2])
    got = grads(ft.merge_tokens(x, metric, size, **kwargs), [x, size])
    want = grads(ref.merge_tokens(x, metric, size, **kwargs), [x, size])
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_merge_tokens_fast_path(mode):
    shape = SHAPES[5]
    x, metric, size = (t.detach() for t in make_inputs(shape))
    kwargs = dict(grid_size=shape[:2], num_prefix_tokens=shape[2])
    want = ref.merge_tokens(x, metric, size, **kwargs)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        got = ft.merge_tokens(x, metric, size, **kwargs)
    assert not got[0].requires_grad
    for a, b in zip(got, want):
        assert_close(a, b)


def test_forward_is_deterministic():
    shape = WIDE
    x, metric, size = (t.detach() for t in make_inputs(shape, batch=3))
    kwargs = dict(grid_size=shape[:2], num_prefix_tokens=shape[2])
    first = ft.merge_tokens(x, metric, size, **kwargs)
    second = ft.merge_tokens(x, metric, size, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_exact_ties_pick_the_lowest_column_and_merge_every_token():
    """Identical B keys tie exactly: the lowest column wins and no A token is lost (SPEC step 5)."""
    shape = (2, 4, 1, 6, 4)
    x, metric, size = (t.detach() for t in make_inputs(shape, batch=1))
    metric[:] = metric[:, :1]  # every token has the same key
    kwargs = dict(grid_size=shape[:2], num_prefix_tokens=shape[2])
    got = ft.merge_tokens(x, metric, size, **kwargs)
    want = ref.merge_tokens(x, metric, size, **kwargs)
    assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[1].sum(), size.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,hidden", [(5, 3), (16, 32), (17, 9)])
def test_refine_keys(head_dim, hidden, dtype):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 11, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    w_down = (torch.randn(hidden, head_dim, generator=gen) / head_dim**0.5).to(DEVICE, dtype).requires_grad_()
    w_up = (torch.randn(head_dim, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype).requires_grad_()
    got = ft.refine_keys(metric, w_down, w_up, 0.7, 0.1, False)
    want = ref.refine_keys(metric, w_down, w_up, 0.7, 0.1, False)
    assert_close(got, want, dtype, "refined")
    for a, b, name in zip(grads([got], [metric, w_down, w_up]), grads([want], [metric, w_down, w_up]),
                          ("dmetric", "dw_down", "dw_up")):
        assert_close(a, b, dtype, name)


def test_refine_keys_dropout_uses_torch_generator_keep_mask():
    from fpet_kernels.triton.refine import keep_mask

    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 9, 8, generator=gen).to(DEVICE).requires_grad_()
    w_down = torch.randn(6, 8, generator=gen).to(DEVICE).requires_grad_()
    w_up = torch.randn(8, 6, generator=gen).to(DEVICE).requires_grad_()
    torch.manual_seed(3)
    got = ft.refine_keys(metric, w_down, w_up, 0.5, 0.4, True)
    torch.manual_seed(3)
    keep = keep_mask(18, 6, 0.4, metric.device).view(2, 9, 6).to(metric.dtype)
    hidden = torch.relu(metric @ w_down.t()) * keep / 0.6
    want = metric + 0.5 * hidden @ w_up.t()
    assert 0 < keep.mean() < 1
    assert_close(got, want)
    for a, b in zip(grads([got], [metric, w_down, w_up]), grads([want], [metric, w_down, w_up])):
        assert_close(a, b)


def test_float64_is_refused_with_a_pointer_to_other_backends():
    x, metric, size = make_inputs(SHAPES[0], torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ft.merge_tokens(x, metric, size, grid_size=SHAPES[0][:2], num_prefix_tokens=SHAPES[0][2])


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_apply_fpet_triton_matches_reference(reg_tokens):
    from test_timm import images, tiny_vit

    outputs, parameter_grads = {}, {}
    for backend in ("reference", "triton"):
        model = fk.apply_fpet(tiny_vit(reg_tokens=reg_tokens, img_size=(64, 56)), layer=1, backend=backend)
        inputs = images(model).to(DEVICE)
        model.to(DEVICE)
        with torch.no_grad():
            outputs[backend] = model(inputs)
        model(inputs).square().sum().backward()  # eval mode: no dropout, so both backends see the same function
        parameter_grads[backend] = {n: p.grad for n, p in model.named_parameters() if "token_merger" in n}
    assert_close(outputs["triton"], outputs["reference"], torch.float32, "logits")
    assert parameter_grads["triton"].keys() == parameter_grads["reference"].keys()
    for name, grad in parameter_grads["reference"].items():
        assert_close(parameter_grads["triton"][name], grad, torch.float32, name)


# ---------------------------------------------------------------------------------------------- full size, GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size shapes need a CUDA device")
@pytest.mark.parametrize("model_shape", [(14, 14, 1, 768, 64), (16, 16, 1, 1024, 64)], ids=["vit_b", "vit_l"])
def test_full_size_bfloat16(model_shape):
    x, metric, size = make_inputs(model_shape, torch.bfloat16, batch=64)
    kwargs = dict(grid_size=model_shape[:2], num_prefix_tokens=model_shape[2])
    got = ft.merge_tokens(x, metric, size, **kwargs)
    want = ref.merge_tokens(x, metric, size, **kwargs)
    for a, b, name in zip(got, want, ("x'", "size'")):
        assert_close(a, b, torch.bfloat16, name)
    for a, b, name in zip(grads(got, [x, metric, size]), grads(want, [x, metric, size]), ("dx", "dmetric", "dsize")):
        assert_close(a, b, torch.bfloat16, name)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ft.merge_tokens(x, metric, size, **kwargs), got))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the Triton ops needs a CUDA device")
def test_torch_compile_traces_the_triton_ops():
    shape = (14, 14, 1, 768, 64)
    x, metric, size = make_inputs(shape, torch.bfloat16, batch=8)
    kwargs = dict(grid_size=shape[:2], num_prefix_tokens=shape[2])
    compiled = torch.compile(lambda *a: ft.merge_tokens(*a, **kwargs), fullgraph=True)
    got = compiled(x, metric, size)
    want = ft.merge_tokens(x, metric, size, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for a, b in zip(grads(got, [x, metric, size]), grads(want, [x, metric, size])):
        assert torch.equal(a, b)
