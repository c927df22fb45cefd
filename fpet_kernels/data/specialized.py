"""pocket-VTAB "specialized" generators: procedural textures and fluorescence-microscopy-like cell images.

Both are drawn from scratch with numpy from the caller's ``numpy.random.Generator`` (no source images, so train
and test differ only in their random draws; duplicates are rejected by the writer). ``sample(split, rng, label)``
returns one ``uint8 [64, 64, 3]`` image of class ``label``; the split does not change the distribution.

* :class:`Textures` (``textures``, 8 classes). A scalar pattern ``t`` in ``[0, 1]`` (the geometric ones computed
  at 128x128 and box-averaged to 64x64, the two noises at 64x64) is coloured ``c0 + t (c1 - c0)`` with two random
  RGB colours at least 90 apart, plus Gaussian pixel noise (sigma 2-8). Classes, by how ``t`` is made:
  0 ``stripes``: a sine grating, random orientation, period 5-14 px, random phase;
  1 ``checker``: a checkerboard of 4-11 px squares, randomly rotated;
  2 ``dots``: 15-40 discs of radius 1.5-3.2 px at uniform random positions;
  3 ``blotches``: smooth noise (Gaussian noise on a 4x4 to 8x8 grid, bicubically upsampled, min-max scaled);
  4 ``grain``: independent uniform noise per 64x64 pixel;
  5 ``rings``: concentric sine rings, period 5-12 px, around a random centre in or near the image;
  6 ``crosshatch``: two perpendicular families of thin lines (period 6-14 px, width 1-2.5 px), randomly rotated;
  7 ``voronoi``: a Voronoi partition of 6-20 random seeds, each region a uniform random level.
* :class:`Cells` (``cells``, 6 classes). A dark uniform background (level 5-30, tinted like the stain) with
  fluorescent "cells": soft-edged ellipses whose intensity profile is brighter in the middle, in one random stain
  colour per image (green, red, blue, yellow or magenta hue with jitter), plus Gaussian noise (sigma 3-8). Classes:
  0 ``round``: 4-10 round cells, radius 3.5-6 px, scattered without touching;
  1 ``elongated``: 4-10 rod-shaped cells, aspect ratio 2.2-3.5, random orientations;
  2 ``dense``: 18-30 small round cells, radius 2-3.5 px;
  3 ``clustered``: 6-12 round cells, radius 3-5 px, packed inside one disc of radius 11-16 px;
  4 ``ring``: 4-10 round cells that are bright rims around a dark interior;
  5 ``budding``: 4-8 round cells, each with a small bud (0.35-0.55 of its radius) on its rim.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ._draw import SIZE, add_noise, distinct_colors, place_apart, to_uint8


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` of a ``size x size`` grid, in output (64 px) units."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) * (SIZE / size)
    return np.meshgrid(coords, coords)


def _box_down(field: np.ndarray) -> np.ndarray:
    """Averages 2x2 blocks: a ``[2S, 2S]`` field to ``[S, S]``."""
    s = field.shape[0] // 2
    return field.reshape(s, 2, s, 2).mean(axis=(1, 3))


def _rotated(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates rotated by a random angle and shifted by a random offset."""
    angle = rng.uniform(0.0, math.pi)
    ox, oy = rng.uniform(0.0, SIZE, size=2)
    ca, sa = math.cos(angle), math.sin(angle)
    return (x - ox) * ca + (y - oy) * sa, -(x - ox) * sa + (y - oy) * ca


class Textures:
    """``textures``: eight procedural texture families (module docstring)."""

    classes = ("stripes", "checker", "dots", "blotches", "grain", "rings", "crosshatch", "voronoi")

    def __init__(self, rng: np.random.Generator) -> None:
        del rng  # nothing to set up: every image is drawn from its own random draws

    def _pattern(self, rng: np.random.Generator, label: int) -> np.ndarray:
        x, y = _grid(2 * SIZE)
        name = self.classes[label]
        if name == "stripes":
            u, _ = _rotated(rng, x, y)
            return _box_down(0.5 + 0.5 * np.sin(2 * math.pi * u / rng.uniform(5.0, 14.0)))
        if name == "checker":
            u, v = _rotated(rng, x, y)
            cell = rng.uniform(4.0, 11.0)
            return _box_down(((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64))
        if name == "dots":
            n = int(rng.integers(15, 41))
            centers = rng.uniform(0.0, SIZE, size=(n, 1, 1, 2))
            radius = rng.uniform(1.5, 3.2)
            dist = np.hypot(x - centers[..., 0], y - centers[..., 1]).min(axis=0)
            return _box_down((dist < radius).astype(np.float64))
        if name == "blotches":
            g = int(rng.integers(4, 9))
            coarse = rng.normal(size=(g, g)).astype(np.float32)
            field = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float64)
            return (field - field.min()) / max(field.max() - field.min(), 1e-6)
        if name == "grain":
            return rng.uniform(0.0, 1.0, size=(SIZE, SIZE))
        if name == "rings":
            cx, cy = rng.uniform(-16.0, SIZE + 16.0, size=2)
            r = np.hypot(x - cx, y - cy)
            return _box_down(0.5 + 0.5 * np.sin(2 * math.pi * r / rng.uniform(5.0, 12.0) + rng.uniform(0, 2 * math.pi)))
        if name == "crosshatch":
            u, v = _rotated(rng, x, y)
            period, width = rng.uniform(6.0, 14.0), rng.uniform(1.0, 2.5)
            line_u = np.abs((u % period) - period / 2) < width / 2
            line_v = np.abs((v % period) - period / 2) < width / 2
            return _box_down((line_u | line_v).astype(np.float64))
        if name == "voronoi":
            n = int(rng.integers(6, 21))
            seeds = rng.uniform(0.0, SIZE, size=(n, 1, 1, 2))
            levels = rng.uniform(0.0, 1.0, size=n)
            nearest = np.hypot(x - seeds[..., 0], y - seeds[..., 1]).argmin(axis=0)
            return _box_down(levels[nearest])
        raise AssertionError(name)

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        t = self._pattern(rng, label)
        c0, c1 = distinct_colors(rng, 90.0)
        image = c0 + t[..., None] * (c1 - c0)
        return to_uint8(add_noise(rng, image, rng.uniform(2.0, 8.0)))


_STAINS = (1 / 3, 0.0, 2 / 3, 1 / 6, 5 / 6)  # hues: green, red, blue, yellow, magenta


class Cells:
    """``cells``: fluorescence-microscopy-like images, six cell morphologies (module docstring)."""

    classes = ("round", "elongated", "dense", "clustered", "ring", "budding")

    def __init__(self, rng: np.random.Generator) -> None:
        del rng

    @staticmethod
    def _cell(x, y, cx, cy, a, b, angle, ring=False):
        """Intensity in ``[0, 1]`` of one cell: an ellipse with semi-axes ``a >= b``, long axis at ``angle``."""
        ca, sa = math.cos(angle), math.sin(angle)
        u = (x - cx) * ca + (y - cy) * sa
        v = -(x - cx) * sa + (y - cy) * ca
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        edge = np.clip((1.0 - d) * b + 0.5, 0.0, 1.0)  # ~1 px soft edge
        if ring:
            return edge * np.clip(1.25 - 6.0 * np.abs(d - 0.8), 0.15, 1.0)
        return edge * (0.7 + 0.3 * np.exp(-(d**2) / 0.3))

    def _field(self, rng: np.random.Generator, label: int) -> np.ndarray:
        x, y = _grid(SIZE)
        name = self.classes[label]
        field = np.zeros((SIZE, SIZE))
        if name in ("round", "ring", "budding", "elongated"):
            n = int(rng.integers(4, 9 if name == "budding" else 11))
            radii = rng.uniform(3.5, 6.0, size=n)
            if name == "elongated":
                aspect = rng.uniform(2.2, 3.5, size=n)
                semi_a, semi_b = radii * np.sqrt(aspect) * 0.9, radii / np.sqrt(aspect) * 0.9
                extent = semi_a
            else:
                semi_a = semi_b = radii
                extent = radii * (1.6 if name == "budding" else 1.0)
            centers = place_apart(rng, extent, gap=1.5)
            while centers is None:  # retry with fewer cells (the label does not depend on the exact count)
                n -= 1
                centers = place_apart(rng, extent[:n], gap=1.0)
            for i in range(n):
                angle = rng.uniform(0.0, math.pi)
                cx, cy = centers[i]
                cell = self._cell(x, y, cx, cy, semi_a[i], semi_b[i], angle, ring=name == "ring")
                if name == "budding":
                    direction = rng.uniform(0.0, 2 * math.pi)
                    rb = semi_a[i] * rng.uniform(0.35, 0.55)
                    bx = cx + (semi_a[i] + 0.6 * rb) * math.cos(direction)
                    by = cy + (semi_a[i] + 0.6 * rb) * math.sin(direction)
                    cell = np.maximum(cell, self._cell(x, y, bx, by, rb, rb, 0.0))
                field = np.maximum(field, cell * rng.uniform(0.7, 1.0))
            return field
        if name == "dense":
            n = int(rng.integers(18, 31))
            radii = rng.uniform(2.0, 3.5, size=n)
            centers = place_apart(rng, radii, gap=0.5)
            if centers is None:
                centers = rng.uniform(4.0, SIZE - 4.0, size=(n, 2))
        else:  # clustered
            n = int(rng.integers(6, 13))
            radii = rng.uniform(3.0, 5.0, size=n)
            spread = rng.uniform(11.0, 16.0)
            center = rng.uniform(spread, SIZE - spread, size=2)
            angles, dist = rng.uniform(0.0, 2 * math.pi, size=n), spread * np.sqrt(rng.uniform(0.0, 1.0, size=n))
            centers = center + np.stack([dist * np.cos(angles), dist * np.sin(angles)], axis=1)
        for (cx, cy), r in zip(centers, radii):
            field = np.maximum(field, self._cell(x, y, cx, cy, r, r, 0.0) * rng.uniform(0.7, 1.0))
        return field

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        import colorsys

        field = self._field(rng, label)
        hue = (_STAINS[int(rng.integers(len(_STAINS)))] + rng.uniform(-0.04, 0.04)) % 1.0
        stain = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), 1.0)) * rng.uniform(170.0, 255.0)
        background = rng.uniform(5.0, 30.0) * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.0, 0.5), 1.0))
        image = background + field[..., None] * (stain - background)
        return to_uint8(add_noise(rng, image, rng.uniform(3.0, 8.0)))
