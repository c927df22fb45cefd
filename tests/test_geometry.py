"""The checkerboard geometry (docs/design.md §2 step 3): :class:`fpet_kernels.geometry.Checkerboard` against a
brute-force ``(r + c) % 2`` construction, and every backend's own checkerboard (``fpet::Checkerboard`` of
``csrc/fpet_math.h``, the Triton kernels' in-kernel maps) against it through the ops."""
import pytest
import torch

from fpet_kernels import reference as ref
from fpet_kernels.geometry import Checkerboard

from tests.helpers import Shape, assert_close, backend_cases, make_inputs

GRIDS = [(h, w) for h in range(1, 8) for w in range(1, 8) if h * w >= 2] + [(14, 14), (16, 16), (14, 9), (9, 14)]
PREFIXES = [0, 1, 2, 3, 5]


def brute_force(height, width, prefix):
    """A tokens: the cells with r + c even, row-major; B tokens: the P prefix tokens, then the cells with r + c
    odd, row-major. Token of cell (r, c): P + r * W + c."""
    cells = [(r, c) for r in range(height) for c in range(width)]
    a = [prefix + r * width + c for r, c in cells if (r + c) % 2 == 0]
    b = list(range(prefix)) + [prefix + r * width + c for r, c in cells if (r + c) % 2 == 1]
    return a, b


def test_checkerboard_order():
    idx_a, idx_b = ref.checkerboard_indices((3, 4), 2)
    # cells (r, c) with r + c even: (0,0) (0,2) (1,1) (1,3) (2,0) (2,2) -> tokens 2 + r*4 + c
    assert idx_a.tolist() == [2, 4, 7, 9, 10, 12]
    assert idx_b.tolist() == [0, 1, 3, 5, 6, 8, 11, 13]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_token_maps_match_the_brute_force_construction(grid, prefix):
    height, width = grid
    board = Checkerboard.of(grid, prefix)
    want_a, want_b = brute_force(height, width, prefix)
    assert board.size == grid and board.cells == height * width
    assert board.num_a == len(want_a) == (height * width + 1) // 2
    assert board.num_b == len(want_b) == prefix + height * width // 2
    assert board.num_tokens == prefix + height * width == board.num_a + board.num_b
    assert [board.a_token(i) for i in range(board.num_a)] == want_a
    assert [board.b_token(j) for j in range(board.num_b)] == want_b
    idx_a, idx_b = board.indices()
    assert idx_a.dtype == idx_b.dtype == torch.int64
    assert idx_a.tolist() == want_a and idx_b.tolist() == want_b
    assert [t.tolist() for t in ref.checkerboard_indices(grid, prefix)] == [want_a, want_b]
    # The rank of cell q among the cells of its own set is q // 2 (both parities of W).
    assert all((t - prefix) // 2 == i for i, t in enumerate(want_a))
    assert all((t - prefix) // 2 == j for j, t in enumerate(want_b[prefix:]))


def test_indices_are_cached_per_device_and_usable_by_autograd_after_inference_mode():
    board = Checkerboard(13, 17, 5)  # a grid no other test uses: the first call is this one, in inference mode
    with torch.inference_mode():
        idx_a, idx_b = board.indices("cpu")
    assert not idx_a.is_inference() and not idx_b.is_inference()
    again = board.indices(torch.device("cpu"))
    assert again[0] is idx_a and again[1] is idx_b
    x = torch.randn(1, board.num_tokens, 2, requires_grad=True)
    x[:, idx_a].sum().backward()
    assert x.grad.sum().item() == board.num_a * 2


@pytest.mark.parametrize(
    "grid_size,prefix,match",
    [((1, 1), 0, "fewer than 2 patches"), ((3,), 1, "grid_size must be two positive ints"),
     ((0, 4), 1, "grid_size must be two positive ints"), ((2.5, 2), 1, "grid_size must be two positive ints"),
     ((2, 2), -1, "num_prefix_tokens must be an int >= 0")],
)
def test_of_validates(grid_size, prefix, match):
    with pytest.raises(ValueError, match=match):
        Checkerboard.of(grid_size, prefix)


def test_check_tokens_names_the_tensor():
    Checkerboard(3, 4, 1).check_tokens(13, "x")
    with pytest.raises(ValueError, match=r"metric has N=12 tokens but num_prefix_tokens \+ H\*W = 1 \+ 3\*4 = 13"):
        Checkerboard(3, 4, 1).check_tokens(12, "metric")


# Every backend's geometry against the reference's (which uses Checkerboard): a wrong A or B token anywhere moves
# a score and a merged token. The compiled backends: all grids up to 5x5 (both parities of W, one B patch) with
# P = 0, 1, 3; Triton (the interpreter is slow): twelve of them, P cycling through 0, 1, 3.
BACKEND_GRIDS = [Shape(1, h, w, p, 3, 4) for h in range(1, 6) for w in range(1, 6) if h * w >= 2 for p in (0, 1, 3)]
TRITON_GRIDS = [Shape(1, h, w, (0, 1, 3)[k % 3], 3, 4) for k, (h, w) in enumerate(
    [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3), (4, 4), (4, 5), (5, 4), (2, 5)])]


@pytest.mark.parametrize("case", backend_cases(dtypes=(torch.float32,), shapes={
    "cpp": BACKEND_GRIDS, "cuda": BACKEND_GRIDS, "triton": TRITON_GRIDS}))
def test_backend_checkerboard_matches_the_reference(case):
    shape = case.shape
    x, metric, size = make_inputs(shape, case.dtype, case.device, seed=shape.height * 10 + shape.width + shape.prefix)
    scores = case.impl.checkerboard_similarity(metric, shape.grid, shape.prefix)
    assert_close(scores, ref.checkerboard_similarity(metric, shape.grid, shape.prefix), case.forward, "scores")
    got = case.impl.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    want = ref.merge_tokens(x, metric, size, grid_size=shape.grid, num_prefix_tokens=shape.prefix)
    assert_close(got[0], want[0], case.forward, "x'")
    assert_close(got[1], want[1], case.forward, "size'")
    # The index merge with the identity-like matching "A token i -> B patch column P + i mod (NB - P)".
    board = shape.checkerboard
    index = (shape.prefix + torch.arange(board.num_a) % (board.num_b - shape.prefix)).expand(1, -1).to(case.device)
    got = case.impl.scatter_mean_merge(x, size, index, shape.grid, shape.prefix)
    want = ref.scatter_mean_merge(x, size, index, shape.grid, shape.prefix)
    for a, b in zip(got, want):
        assert_close(a, b, case.forward)
