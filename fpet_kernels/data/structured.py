"""pocket-VTAB "structured" generators: counting, location, orientation and distance of drawn objects.

Every image is a dark random gradient background (two random dark colours) with bright flat-coloured objects
drawn antialiased (PIL at 4x, box-filtered), plus Gaussian pixel noise (sigma 2-6). Objects are circles, squares,
triangles or diamonds (random kind, rotation and bright colour each). Drawn from scratch from the caller's
``numpy.random.Generator``; ``sample(split, rng, label)`` returns one ``uint8 [64, 64, 3]`` image of class ``label``
and the split does not change the distribution. Continuous quantities that define a label are drawn from the
middle 80% of their bin, so that no label sits on a bin edge.

* :class:`Count` (``count``, 8 classes, like CLEVR-count): 1-8 objects of radius 3.5-6.5 px, not touching.
  Label = number of objects - 1.
* :class:`Location` (``location``, 9 classes, like dSprites-location): one object of radius 3-6.5 px; the image is
  cut into a 3x3 grid of equal cells and the label is the cell holding the object's centre, ``3 row + column``
  (the centre lies at least 2.5 px inside its cell, and the object wholly in the image).
* :class:`Orientation` (``orientation``, 8 classes, like dSprites-orientation): one bar, 24-44 px long and 3-7 px
  wide, centred within 6 px of the image centre. Label = ``floor(angle / 22.5 degrees)`` for the bar's
  undirected angle in ``[0, 180)`` degrees, measured from the +x axis (rightwards) towards +y (downwards, i.e.
  clockwise on screen): label 0 is a nearly horizontal bar, label 4 a nearly vertical one.
* :class:`Distance` (``distance``, 6 classes, like CLEVR-distance): two discs (radius 3-5 px, different colours);
  the distance between their centres, in px, falls in bin ``[8, 15), [15, 22), [22, 29), [29, 36), [36, 43),
  [43, 50)``, which is the label; direction and midpoint are random with both discs wholly in the image.
"""
from __future__ import annotations

import math

import numpy as np

from ._draw import SHAPES, SIZE, Canvas, add_noise, dark_background, hsv_color, place_apart, to_uint8


def _in_bin(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform draw from the middle 80% of ``[low, high)``."""
    pad = 0.1 * (high - low)
    return rng.uniform(low + pad, high - pad)


def _bright(rng: np.random.Generator) -> np.ndarray:
    return hsv_color(rng, value=(0.65, 1.0))


def _finish(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    return to_uint8(add_noise(rng, canvas.image(), rng.uniform(2.0, 6.0)))


def _shape(rng: np.random.Generator, canvas: Canvas, cx: float, cy: float, radius: float) -> None:
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    canvas.shape(kind, cx, cy, radius, rng.uniform(0.0, 2 * math.pi), _bright(rng))


class Count:
    """``count``: how many objects (1-8) are in the image (module docstring)."""

    classes = tuple(str(n) for n in range(1, 9))

    def __init__(self, rng: np.random.Generator) -> None:
        del rng

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        n = label + 1
        centers = None
        while centers is None:
            radii = rng.uniform(3.5, 6.5, size=n)
            centers = place_apart(rng, radii, gap=2.0)
        canvas = Canvas(dark_background(rng))
        for (cx, cy), r in zip(centers, radii):
            _shape(rng, canvas, cx, cy, r)
        return _finish(rng, canvas)


class Location:
    """``location``: which cell of a 3x3 grid holds the object's centre (module docstring)."""

    classes = tuple(f"row{r}-col{c}" for r in range(3) for c in range(3))

    def __init__(self, rng: np.random.Generator) -> None:
        del rng

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        row, col = divmod(label, 3)
        radius = rng.uniform(3.0, 6.5)
        cell = SIZE / 3.0

        def coordinate(index: int) -> float:
            low = max(index * cell + 2.5, radius + 1.0)
            high = min((index + 1) * cell - 2.5, SIZE - radius - 1.0)
            return rng.uniform(low, high)

        cx, cy = coordinate(col), coordinate(row)
        canvas = Canvas(dark_background(rng))
        _shape(rng, canvas, cx, cy, radius)
        return _finish(rng, canvas)


class Orientation:
    """``orientation``: the angle bin (8 bins of 22.5 degrees over [0, 180)) of one bar (module docstring)."""

    classes = tuple(f"{22.5 * k:g}-{22.5 * (k + 1):g}deg" for k in range(8))

    def __init__(self, rng: np.random.Generator) -> None:
        del rng

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        angle = math.radians(_in_bin(rng, 22.5 * label, 22.5 * (label + 1)))
        cx, cy = SIZE / 2 + rng.uniform(-6.0, 6.0, size=2)
        canvas = Canvas(dark_background(rng))
        canvas.bar(cx, cy, rng.uniform(24.0, 44.0), rng.uniform(3.0, 7.0), angle, _bright(rng))
        return _finish(rng, canvas)


DISTANCE_BINS = (8.0, 15.0, 22.0, 29.0, 36.0, 43.0, 50.0)
"""Edges (px) of the ``distance`` task's bins: label ``k`` is a centre distance in ``[bins[k], bins[k + 1])``."""


class Distance:
    """``distance``: the binned distance between the centres of two discs (module docstring)."""

    classes = tuple(f"{DISTANCE_BINS[k]:g}-{DISTANCE_BINS[k + 1]:g}px" for k in range(len(DISTANCE_BINS) - 1))

    def __init__(self, rng: np.random.Generator) -> None:
        del rng

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        distance = _in_bin(rng, DISTANCE_BINS[label], DISTANCE_BINS[label + 1])
        radii = rng.uniform(3.0, 5.0, size=2)
        while True:
            angle = rng.uniform(0.0, 2 * math.pi)
            dx, dy = 0.5 * distance * math.cos(angle), 0.5 * distance * math.sin(angle)
            margin = radii.max() + 1.0
            low_x, high_x = margin + abs(dx), SIZE - margin - abs(dx)
            low_y, high_y = margin + abs(dy), SIZE - margin - abs(dy)
            if low_x < high_x and low_y < high_y:
                break
        mx, my = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
        color_a = _bright(rng)
        color_b = _bright(rng)
        while np.linalg.norm(color_a - color_b) < 80.0:
            color_b = _bright(rng)
        canvas = Canvas(dark_background(rng))
        canvas.shape("circle", mx - dx, my - dy, radii[0], 0.0, color_a)
        canvas.shape("circle", mx + dx, my + dy, radii[1], 0.0, color_b)
        return _finish(rng, canvas)
