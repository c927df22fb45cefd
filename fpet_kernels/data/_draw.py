"""Small drawing helpers shared by the pocket-VTAB generators: colours, backgrounds, shapes, uint8 output.

Every helper takes the caller's ``numpy.random.Generator``; nothing here touches a global RNG. Images are
``[H, W, 3]`` arrays; :func:`to_uint8` rounds and clips float images to ``uint8``.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
"""Side of every pocket-VTAB image, in pixels."""

SUPERSAMPLE = 4
"""Shapes are drawn at ``SUPERSAMPLE`` times the size and box-filtered down, which antialiases their edges."""


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Rounds a float image to ``uint8`` (clipped to ``[0, 255]``), contiguous."""
    return np.ascontiguousarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def hsv_color(rng: np.random.Generator, value: tuple[float, float], saturation=(0.45, 1.0)) -> np.ndarray:
    """A random colour (uniform hue, saturation and value in the given ranges) as float RGB in ``[0, 255]``."""
    h = rng.uniform(0.0, 1.0)
    s = rng.uniform(*saturation)
    v = rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64) * 255.0


def distinct_colors(rng: np.random.Generator, min_distance: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours at least ``min_distance`` apart (Euclidean, in ``[0, 255]^3``)."""
    while True:
        a = rng.uniform(0.0, 255.0, size=3)
        b = rng.uniform(0.0, 255.0, size=3)
        if np.linalg.norm(a - b) >= min_distance:
            return a, b


def dark_background(rng: np.random.Generator) -> np.ndarray:
    """A dark linear gradient between two random dark colours, float ``[SIZE, SIZE, 3]``."""
    c0 = hsv_color(rng, value=(0.05, 0.35), saturation=(0.0, 0.8))
    c1 = hsv_color(rng, value=(0.05, 0.35), saturation=(0.0, 0.8))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1) - 0.5
    t = np.clip(0.5 + xs * math.cos(angle) + ys * math.sin(angle), 0.0, 1.0)[..., None]
    return c0 * (1.0 - t) + c1 * t


def add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` plus independent Gaussian pixel noise of standard deviation ``sigma``."""
    return image + rng.normal(0.0, sigma, size=image.shape)


SHAPES = ("circle", "square", "triangle", "diamond")


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a regular polygon shape (circumradius ``radius``, rotated by ``angle``), None for a circle."""
    sides = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}[kind]
    if sides == 0:
        return None
    offset = angle + (math.pi / 4 if kind == "square" else 0.0)
    radius_x = radius * (0.7 if kind == "diamond" else 1.0)
    angles = [offset + 2 * math.pi * k / sides for k in range(sides)]
    return [(cx + radius_x * math.cos(a), cy + radius * math.sin(a)) for a in angles]


class Canvas:
    """A float background onto which antialiased shapes are drawn (PIL at ``SUPERSAMPLE``x, then a box filter).

    Coordinates are in output pixels: ``(0, 0)`` is the top-left corner of the top-left pixel, ``(SIZE, SIZE)`` the
    bottom-right corner of the image.
    """

    def __init__(self, background: np.ndarray) -> None:
        self._base = Image.fromarray(to_uint8(background)).resize((SIZE * SUPERSAMPLE,) * 2, Image.NEAREST)
        self._draw = ImageDraw.Draw(self._base)

    def shape(self, kind: str, cx: float, cy: float, radius: float, angle: float, color: np.ndarray) -> None:
        """Draws a filled shape of :data:`SHAPES` centred at ``(cx, cy)`` with circumradius ``radius``."""
        fill = tuple(int(c) for c in to_uint8(np.asarray(color)))
        s = SUPERSAMPLE
        polygon = shape_polygon(kind, cx, cy, radius, angle)
        if polygon is None:
            self._draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=fill)
        else:
            self._draw.polygon([(x * s, y * s) for x, y in polygon], fill=fill)

    def bar(self, cx: float, cy: float, length: float, width: float, angle: float, color: np.ndarray) -> None:
        """Draws a filled rectangle of ``length x width`` centred at ``(cx, cy)``, its long axis at ``angle``."""
        fill = tuple(int(c) for c in to_uint8(np.asarray(color)))
        s = SUPERSAMPLE
        ux, uy = math.cos(angle), math.sin(angle)
        hl, hw = length / 2.0, width / 2.0
        corners = [
            (cx + a * hl * ux - b * hw * uy, cy + a * hl * uy + b * hw * ux)
            for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1))
        ]
        self._draw.polygon([(x * s, y * s) for x, y in corners], fill=fill)

    def image(self) -> np.ndarray:
        """The canvas box-filtered down to ``[SIZE, SIZE, 3]`` float."""
        return np.asarray(self._base.resize((SIZE, SIZE), Image.BOX), dtype=np.float64)


def place_apart(
    rng: np.random.Generator, radii: np.ndarray, gap: float, margin: float = 1.0, tries: int = 200
) -> np.ndarray | None:
    """Centres ``[n, 2]`` (x, y) for discs of ``radii``, inside the image and ``gap`` pixels apart, or None.

    Each disc is placed by rejection sampling (up to ``tries`` draws); None when one could not be placed.
    """
    centers = np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        for _ in range(tries):
            c = rng.uniform(r + margin, SIZE - r - margin, size=2)
            if i == 0 or np.all(np.hypot(*(centers[:i] - c).T) >= radii[:i] + r + gap):
                centers[i] = c
                break
        else:
            return None
    return centers


def pil_resize(image: np.ndarray, size: int = SIZE, resample=Image.BILINEAR) -> np.ndarray:
    """Resizes a uint8 ``[H, W]`` or ``[H, W, 3]`` image to ``size x size`` with PIL, as float."""
    return np.asarray(Image.fromarray(image).resize((size, size), resample), dtype=np.float64)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """Stacks a ``[H, W]`` image into three identical channels (an ``[H, W, 3]`` image passes through)."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
