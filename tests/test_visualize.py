"""Merge pictures (fpet_kernels/visualize.py): the matching read from the model's forward, and its drawing."""
import numpy as np
import pytest
import torch
from PIL import Image

import fpet_kernels as fk
from fpet_kernels import ops
from fpet_kernels.geometry import Checkerboard
from fpet_kernels.visualize import default_scale, draw_merge_groups, merge_assignment, visualize
from fpet_kernels.vit_patch import get_fpet_patch

from tests.helpers import images, tiny_vit

GRID = Checkerboard(8, 8, 1)  # tiny_vit: 64x64 input, 8x8 grid of 8-pixel patches, one class token


def _merger(model):
    patch = get_fpet_patch(model)
    return patch.vit.blocks[patch.layer].token_merger


def _strong_refinement(model):
    """Give the key refinement adapter weights large enough to change the matching (a 'trained' adapter)."""
    merger = _merger(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        merger.down.weight.copy_(torch.randn(merger.down.weight.shape, generator=generator))
        merger.up.weight.copy_(torch.randn(merger.up.weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("refine", ["untrained", "strong", "registers"])
def test_assignment_reproduces_the_blocks_merge(refine):
    model = fk.apply_fpet(tiny_vit(reg_tokens=2) if refine == "registers" else tiny_vit(), refine_bits=32)
    if refine != "untrained":
        _strong_refinement(model)
    expected = Checkerboard(8, 8, 3) if refine == "registers" else GRID
    x = images(model)
    seen = {}
    handle = _merger(model).register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    try:
        index, grid = merge_assignment(model, x)  # one forward: the test's hook sees the same merge
    finally:
        handle.remove()
    assert grid == expected
    assert index.dtype == torch.int64 and tuple(index.shape) == (2, grid.num_a)
    assert int(index.min()) >= grid.prefix and int(index.max()) < grid.num_b  # never into a prefix token
    tokens, metric, size, grid_size, prefix = seen["args"]
    merged, merged_size = ops.scatter_mean_merge(tokens, size, index, grid_size, prefix)
    assert torch.allclose(merged, seen["out"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(merged_size, seen["out"][1])
    if refine == "strong":  # the refined keys matter: the raw keys would have matched differently
        _, raw = ops.ste_match(ops.checkerboard_similarity(metric, grid_size, prefix))
        assert not torch.equal(raw, index)


def test_assignment_restores_modes_and_removes_its_hook():
    model = fk.apply_fpet(tiny_vit()).train()
    model.head.eval()
    merger = _merger(model)
    index, _ = merge_assignment(model, images(model)[0])  # one [3, H, W] image
    assert tuple(index.shape) == (1, GRID.num_a)
    assert model.training and merger.training and not model.head.training
    with pytest.raises(ValueError, match="images are 48x48 but this model takes 64x64"):
        merge_assignment(model, torch.randn(1, 3, 48, 48))
    assert model.training and get_fpet_patch(model).state.get("recorder") is None  # recording ended


def test_model_without_fpet_is_refused():
    with pytest.raises(ValueError, match="apply_fpet"):
        merge_assignment(tiny_vit(), images(tiny_vit()))
    with pytest.raises(ValueError, match="float tensor"):
        merge_assignment(fk.apply_fpet(tiny_vit()), torch.zeros(1, 64, 64, dtype=torch.uint8))


def _centre(picture, cell, patch=8):
    """RGB of the pixel at the centre of grid cell ``cell = r * W + c``."""
    scale = picture.size[0] // (GRID.width * patch)
    r, c = divmod(cell, GRID.width)
    return picture.getpixel(((c * patch + patch // 2) * scale, (r * patch + patch // 2) * scale))


def _groups(index):
    """Cell -> its group's B token, from a [NA] index."""
    idx_a, idx_b = GRID.indices()
    owner = {int(t) - GRID.prefix: j for j, t in enumerate(idx_b.tolist()) if j >= GRID.prefix}
    owner.update({int(t) - GRID.prefix: int(j) for t, j in zip(idx_a, index)})
    return owner


def test_draw_writes_the_png_and_colours_groups(tmp_path):
    # Every A token merges into the B token to its right (its left at the end of a row): groups are horizontal pairs.
    idx_a, idx_b = GRID.indices()
    token_to_b = {int(t): j for j, t in enumerate(idx_b.tolist())}
    index = torch.tensor(
        [token_to_b[int(t) + 1] if (int(t) - 1) % 8 < 7 else token_to_b[int(t) - 1] for t in idx_a]
    )
    gray = np.full((64, 64, 3), 128, dtype=np.uint8)
    out = tmp_path / "sub" / "groups.png"
    picture = draw_merge_groups(gray, index, GRID, out, patch_size=8)
    assert picture.size == (256, 256) and default_scale(64) == 4
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.size == (256, 256)
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(picture))
    owner = _groups(index)
    colour = {cell: _centre(picture, cell) for cell in range(GRID.cells)}
    for cell in range(GRID.cells):
        for other in (cell + 1, cell + GRID.width):  # right and lower neighbours
            if other >= GRID.cells or (other == cell + 1 and other % GRID.width == 0):
                continue
            same = owner[cell] == owner[other]
            assert (colour[cell] == colour[other]) == same, (cell, other)
    assert all(c != (128, 128, 128) for c in colour.values())  # every patch is coloured
    # A border line between the two groups (0, 1) and (2, 3) of row 0; none inside a group.
    assert picture.getpixel((16 * 4, 16)) == (0, 0, 0)
    assert picture.getpixel((8 * 4, 16)) != (0, 0, 0)
    # alpha = 0 shows the image (and borders) only; scale is honoured.
    plain = draw_merge_groups(gray, index, GRID, patch_size=8, alpha=0.0, scale=2)
    assert plain.size == (128, 128) and plain.getpixel((8, 8)) == (128, 128, 128)


def test_draw_real_assignment_and_normalised_tensor(tmp_path):
    model = _strong_refinement(fk.apply_fpet(tiny_vit(), refine_bits=32))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.full((3, 64, 64), 128 / 255)
    normalised = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    index, grid = merge_assignment(model, images(model, 1))
    picture = draw_merge_groups(normalised, index, grid, patch_size=8, mean=mean, std=std)
    uint8 = draw_merge_groups(torch.full((3, 64, 64), 128, dtype=torch.uint8), index, grid, patch_size=8)
    assert np.array_equal(np.asarray(picture), np.asarray(uint8))  # un-normalised to the same uniform gray
    owner = _groups(index[0])
    by_group = {}
    for cell in range(GRID.cells):
        by_group.setdefault(owner[cell], set()).add(_centre(picture, cell))
    assert len(by_group) == GRID.num_b - GRID.prefix  # every B patch is a group, unmatched ones too
    assert all(len(colours) == 1 for colours in by_group.values())  # one colour per group


def test_draw_rejects_bad_inputs():
    index = torch.full((GRID.num_a,), GRID.prefix, dtype=torch.int64)
    gray = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="resize"):
        draw_merge_groups(np.zeros((60, 64, 3), dtype=np.uint8), index, GRID, patch_size=8)
    with pytest.raises(ValueError, match="int64"):
        draw_merge_groups(gray, index[:-1], GRID, patch_size=8)
    with pytest.raises(ValueError, match=r"\[P, NB\)"):
        draw_merge_groups(gray, index - 1, GRID, patch_size=8)  # into the class token
    with pytest.raises(ValueError, match="alpha"):
        draw_merge_groups(gray, index, GRID, patch_size=8, alpha=1.5)


def test_visualize_an_image_file(tmp_path):
    array = np.zeros((90, 120, 3), dtype=np.uint8)
    array[:, :60] = (220, 180, 40)
    array[45:] = (20, 60, 200)
    source = tmp_path / "input.jpg"
    Image.fromarray(array).save(source)
    model = fk.apply_fpet(tiny_vit())
    result = visualize(source, model, tmp_path / "merge.png")
    assert result["groups"] == 32 and 1 <= result["merged_groups"] <= 32
    assert 2 <= result["largest_group"] <= 1 + GRID.num_a and result["tokens"] == (65, 33)
    assert result["output_size"] == (256, 256)
    with Image.open(tmp_path / "merge.png") as saved:
        assert saved.size == (256, 256)
    with pytest.raises(ValueError, match="input size"):
        visualize(source, model, tmp_path / "bad.png", transform=lambda image: torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="apply_fpet"):
        visualize(source, tiny_vit(), tmp_path / "none.png")


def test_fpet_visualize_command(tmp_path, capsys):
    """`fpet visualize IMAGE --out PNG` on an untrained FPET model: a PNG of the drawn size, one summary line; a
    missing image is one error line (exit 2)."""
    from fpet_kernels import cli

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "merge.png"
    argv = ["visualize", str(image), "--model", "vit_tiny_patch16_224", "--img-size", "64", "--out", str(out)]
    assert cli.main(argv) == 0
    assert Image.open(out).size == (256, 256)
    assert "17 -> 9 tokens" in capsys.readouterr().out
    assert cli.main(["visualize", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "argument IMAGE" in capsys.readouterr().err
