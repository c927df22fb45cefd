"""Merge pictures: which patches an FPET-patched ViT merges together, drawn over the input image.

At the merge block every A patch of the checkerboard is merged into one B token (docs/design.md §2 steps 3-6). A
*merge group* is one B patch together with the A patches merged into it; this module recovers the groups from the
model's own forward pass (:func:`merge_assignment`), draws them (:func:`draw_merge_groups`) and does both for an
image file (:func:`visualize`, what ``fpet visualize`` runs).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .geometry import Checkerboard
from .vit_patch import get_fpet_patch, record_merge

__all__ = ["merge_assignment", "draw_merge_groups", "visualize", "default_scale"]

PathLike = Union[str, "os.PathLike[str]"]

#: Width in pixels that the default ``scale`` of :func:`draw_merge_groups` reaches at least.
MIN_WIDTH = 256
_BORDER_RGB = (0, 0, 0)


# ---------------------------------------------------------------------------------------------- the assignment
def merge_assignment(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, Checkerboard]:
    """The matching of the merge block: for every image, the B token that each A patch was merged into.

    Runs ``model(images)`` once, in eval mode and without gradients (the mode of every submodule is restored
    afterwards), under :func:`~fpet_kernels.vit_patch.record_merge`: the assignment is the one that merge used.

    Args:
        model: a timm VisionTransformer (or a module wrapping one) patched with :func:`~fpet_kernels.apply_fpet`.
        images: ``[B, 3, H, W]`` (or one ``[3, H, W]`` image) as the model takes them (normalised), on the
            model's device.
    Returns:
        ``(index, grid)``: ``index`` int64 ``[B, NA]`` on the CPU, ``index[b, i]`` the B token (a column of the
        similarity, in ``[P, NB)``: the ``P`` prefix tokens come first, nothing merges into them) that A token ``i``
        of image ``b`` merged into; ``grid`` the :class:`~fpet_kernels.geometry.Checkerboard` of that forward
        (patch grid ``H x W`` and ``P``), whose ``a_token`` / ``b_token`` / ``indices`` map A and B tokens to
        token positions ``P + r * W + c``.
    Raises:
        ValueError: the model holds no timm VisionTransformer, or it is not patched with FPET (apply_fpet first),
            or ``images`` is not a ``[B, 3, H, W]`` / ``[3, H, W]`` float tensor.
    """
    patch = get_fpet_patch(model)  # ValueError if there is no timm VisionTransformer at all
    if patch is None:
        raise ValueError(
            "merge_assignment needs a model patched with FPET: call fpet_kernels.apply_fpet(model) first "
            "(or load an FPET checkpoint, which applies it)"
        )
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W] or [3, H, W], got {shape}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), record_merge(model) as merges:
            model(images)
    finally:
        for module, training in modes:
            module.training = training
    if not merges:
        raise RuntimeError("the forward pass did not reach the FPET merge block; no matching was captured")
    info = merges[-1]
    return info.index.cpu(), Checkerboard.of(info.grid_size, info.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------- drawing
def default_scale(width: int) -> int:
    """The default integer upscale of a picture ``width`` pixels wide: the smallest one reaching ``MIN_WIDTH``
    (256) pixels, at least 1 (so 64 -> 4, 224 -> 2, 384 -> 1)."""
    return max(1, math.ceil(MIN_WIDTH / width))


def _palette(cmap: str) -> np.ndarray:
    """``[K, 3]`` uint8 colours of a qualitative matplotlib colormap; for ``tab20`` the ten strong colours come
    before their ten light partners, so the colouring tries strong, well separated hues first."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}; use a qualitative one such as 'tab20'") from None
    colors = getattr(colormap, "colors", None)
    if colors is None:  # a continuous colormap: sample it
        colors = [colormap(k / 19) for k in range(20)]
    rgb = np.asarray([c[:3] for c in colors], dtype=np.float64)
    if cmap == "tab20":
        rgb = np.concatenate([rgb[0::2], rgb[1::2]])
    return np.round(rgb * 255).astype(np.uint8)


def _group_labels(index: torch.Tensor, grid: Checkerboard) -> np.ndarray:
    """``[H, W]`` int: the B patch (rank among the B cells, ``0 .. NB - P - 1``) of every cell's merge group."""
    labels = np.empty(grid.cells, dtype=np.int64)
    idx_a, idx_b = grid.indices()
    b_cells = idx_b[grid.prefix:].numpy() - grid.prefix
    labels[b_cells] = np.arange(b_cells.size)
    labels[idx_a.numpy() - grid.prefix] = index.numpy() - grid.prefix
    return labels.reshape(grid.height, grid.width)


def _group_colours(labels: np.ndarray, num_groups: int, palette: np.ndarray) -> np.ndarray:
    """``[num_groups]`` palette indices: a greedy colouring of the groups' 4-neighbour adjacency, most connected
    group first, each group taking the first colour none of its coloured neighbours has; when every colour is taken
    (more neighbours than colours) the one least used among the neighbours."""
    neighbours: List[set] = [set() for _ in range(num_groups)]
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        for u, v in zip(a.ravel().tolist(), b.ravel().tolist()):
            if u != v:
                neighbours[u].add(v)
                neighbours[v].add(u)
    colour = np.full(num_groups, -1, dtype=np.int64)
    for group in sorted(range(num_groups), key=lambda g: (-len(neighbours[g]), g)):
        counts = np.bincount([colour[n] for n in neighbours[group] if colour[n] >= 0], minlength=len(palette))
        free = np.flatnonzero(counts == 0)
        colour[group] = free[0] if free.size else int(np.argmin(counts))
    return colour


def _as_rgb_array(
    image: Any, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a PIL image, a uint8 array ``[H, W, 3]``, or a tensor ``[3, H, W]`` / ``[1, 3, H,
    W]`` (uint8, or float in [0, 1] after undoing ``(x - mean) / std`` when they are given)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            if mean is not None or std is not None:
                raise ValueError("mean / std apply to a float tensor, not to a uint8 image")
            return t.permute(1, 2, 0).numpy().copy()
        if not t.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 or float, got {t.dtype}")
        t = t.double()
        if std is not None:
            t = t * torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
        if mean is not None:
            t = t + torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"image must be a PIL image, a uint8 array [H, W, 3] or a tensor [3, H, W]; got "
            f"{type(image).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}"
        )
    return array


def draw_merge_groups(
    image: Any,
    index: torch.Tensor,
    grid: Checkerboard,
    out_path: Optional[PathLike] = None,
    *,
    patch_size: Union[int, Sequence[int]],
    alpha: float = 0.45,
    scale: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    cmap: str = "tab20",
):
    """Draw the merge groups of one image over it and return the picture (a PIL RGB image).

    A merge group is one B patch and the A patches merged into it. Every patch of a group is filled with the
    group's colour at opacity ``alpha`` over the (upscaled) image, and a thin black line separates neighbouring
    patches of different groups. A B patch that nothing merged into is a group of one and has its own colour too.
    Colours come from a qualitative colormap (``cmap``, matplotlib's ``tab20`` by default, its strong hues first),
    given out by a greedy colouring so that touching groups get different colours whenever the palette allows
    (a group may be split in several pieces: A patches can merge into any B patch); colours repeat across the
    picture. Prefix tokens (class, register, prompt tokens) are not patches and are not drawn.

    Args:
        image: the model's input picture, ``H * ph`` x ``W * pw`` pixels: a PIL image, a uint8 array ``[h, w, 3]``,
            or a tensor ``[3, h, w]`` (``[1, 3, h, w]``), uint8 or float; a float tensor is taken as in [0, 1] once
            ``mean`` / ``std`` (the model's normalisation, if given) are undone.
        index: int64 ``[NA]`` (or ``[1, NA]``): the B token of every A token, as one row of
            :func:`merge_assignment`'s index (values in ``[P, NB)``).
        grid: the :class:`~fpet_kernels.geometry.Checkerboard` of the forward pass (from :func:`merge_assignment`).
        out_path: where to write the picture as a PNG (parent folders are created); None writes nothing.
        patch_size: the patch size in input pixels, an int or ``(ph, pw)``.
        alpha: opacity of the group colour, in [0, 1].
        scale: integer upscale; the picture is ``scale * h`` x ``scale * w`` pixels. Default
            :func:`default_scale`: the smallest making it at least 256 pixels wide (64 -> 4x, 224 -> 2x).
        mean, std: per-channel normalisation to undo on a float tensor image.
        cmap: a qualitative matplotlib colormap name.
    Returns:
        The picture, a ``PIL.Image.Image`` in RGB mode.
    Raises:
        ValueError: an image whose size is not the grid times the patch size, an index of the wrong shape or out of
            ``[P, NB)``, ``alpha`` outside [0, 1], ``scale`` not a positive int.
    """
    from PIL import Image

    if not isinstance(grid, Checkerboard):
        raise ValueError(f"grid must be a Checkerboard (from merge_assignment), got {type(grid).__name__}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = _as_rgb_array(image, mean, std)
    height, width = pixels.shape[:2]
    if (height, width) != (grid.height * ph, grid.width * pw):
        raise ValueError(
            f"the image is {height}x{width} pixels but the {grid.height}x{grid.width} grid of {ph}x{pw} patches "
            f"covers {grid.height * ph}x{grid.width * pw}; resize the image to the model's input size"
        )
    index = torch.as_tensor(index).detach().cpu()
    if index.dim() == 2 and index.shape[0] == 1:
        index = index[0]
    if index.dim() != 1 or index.shape[0] != grid.num_a or index.dtype != torch.int64:
        raise ValueError(
            f"index must be int64 [NA] = [{grid.num_a}] (one row of merge_assignment's index), "
            f"got {index.dtype} {tuple(index.shape)}"
        )
    if index.numel() and not bool(((index >= grid.prefix) & (index < grid.num_b)).all()):
        raise ValueError(f"index values must lie in [P, NB) = [{grid.prefix}, {grid.num_b})")
    scale = default_scale(width) if scale is None else scale
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")

    labels = _group_labels(index, grid)
    palette = _palette(cmap)
    colours = palette[_group_colours(labels, grid.num_b - grid.prefix, palette)]
    cell_h, cell_w = ph * scale, pw * scale
    base = np.asarray(
        Image.fromarray(pixels).resize((width * scale, height * scale), Image.Resampling.BICUBIC), dtype=np.float64
    )
    overlay = colours[labels].repeat(cell_h, axis=0).repeat(cell_w, axis=1).astype(np.float64)
    out = np.round((1.0 - alpha) * base + alpha * overlay).astype(np.uint8)

    # Borders between different groups: a line of `line` pixels centred on each cell edge.
    line = max(1, scale // 2)
    border = np.zeros(out.shape[:2], dtype=bool)
    vertical = labels[:, :-1] != labels[:, 1:]  # [H, W - 1]: edge right of cell (r, c)
    for c in range(grid.width - 1):
        x0 = (c + 1) * cell_w - line // 2
        border[:, x0:x0 + line] |= vertical[:, c].repeat(cell_h)[:, None]
    horizontal = labels[:-1, :] != labels[1:, :]  # [H - 1, W]: edge below cell (r, c)
    for r in range(grid.height - 1):
        y0 = (r + 1) * cell_h - line // 2
        border[y0:y0 + line, :] |= horizontal[r, :].repeat(cell_w)[None, :]
    out[border] = _BORDER_RGB

    picture = Image.fromarray(out, mode="RGB")
    if out_path is not None:
        folder = os.path.dirname(os.fspath(out_path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        picture.save(out_path, format="PNG")
    return picture


# ---------------------------------------------------------------------------------------------- one image file
def visualize(
    image_path: PathLike,
    model: nn.Module,
    out_path: PathLike,
    *,
    transform: Any = None,
    scale: Optional[int] = None,
    alpha: float = 0.45,
) -> Dict[str, Any]:
    """Draw which patches an FPET model merges for one image file, and save the picture as a PNG.

    The image is read (PIL, converted to RGB) and resized (bicubic) to the model's input size
    (``patch_embed.img_size``, ignoring the aspect ratio); the model sees it as a tensor normalised with the
    mean / std of its timm data config (ImageNet's when the model has none), or as ``transform(resized image)``
    when ``transform`` is given. One forward pass in eval mode yields the matching of the merge block
    (:func:`merge_assignment`); the picture (:func:`draw_merge_groups`) shows the resized image with every merge
    group (a B patch and the A patches merged into it) in one semi-transparent colour and thin lines between
    groups. It works for trained and untrained models alike: an untrained key refinement adapter is close to the
    identity, so the groups then follow the backbone's own keys.

    Args:
        image_path: the input image file (any format PIL reads).
        model: a timm ViT patched with ``apply_fpet`` (e.g. loaded from an FPET checkpoint); any device.
        out_path: the PNG to write (parent folders are created).
        transform: optional callable, resized PIL image -> float tensor ``[3, H, W]`` of the model's input size.
        scale: integer upscale of the picture, default the smallest making it at least 256 pixels wide.
        alpha: opacity of the group colours.
    Returns:
        ``{"groups": merge groups (one per B patch, singletons included), "merged_groups": groups with at least
        one A patch merged in, "largest_group": patches in the largest group, "tokens": (tokens before, after
        the merge), "output_size": (width, height) of the picture in pixels, "out_path": str}``.
    Raises:
        ValueError: the model is not FPET-patched, or ``transform`` returns a tensor of another size.
        OSError: the image cannot be read.
    """
    from PIL import Image

    patch = get_fpet_patch(model)
    if patch is None:
        raise ValueError("visualize needs a model patched with FPET: call fpet_kernels.apply_fpet(model) first")
    vit = patch.vit
    in_h, in_w = (int(s) for s in vit.patch_embed.img_size)
    with Image.open(image_path) as file:
        resized = file.convert("RGB").resize((in_w, in_h), Image.Resampling.BICUBIC)
    if transform is None:
        mean, std = _normalisation(vit)
        pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0
        tensor = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    else:
        tensor = transform(resized)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape[-3:]) != (3, in_h, in_w):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"transform must return a tensor [3, {in_h}, {in_w}] (the model's input size), got {got}")
    parameter = next(vit.parameters(), None)
    if parameter is not None:
        tensor = tensor.to(device=parameter.device, dtype=parameter.dtype)
    index, grid = merge_assignment(model, tensor)
    picture = draw_merge_groups(
        resized, index[0], grid, out_path, patch_size=tuple(vit.patch_embed.patch_size), alpha=alpha, scale=scale
    )
    members = torch.bincount(index[0] - grid.prefix, minlength=grid.num_b - grid.prefix)
    return {
        "groups": grid.num_b - grid.prefix,
        "merged_groups": int((members > 0).sum()),
        "largest_group": int(members.max()) + 1,
        "tokens": (grid.num_tokens, grid.num_b),
        "output_size": picture.size,
        "out_path": os.fspath(out_path),
    }


def _normalisation(vit: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) of the model's timm data config: its pretrained config's, else timm's ImageNet default."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(vit)
    return tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])
