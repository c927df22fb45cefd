"""Pretrains the shipped pocket ViT (fpet_kernels.models.POCKET_VIT) on a formula-driven upstream task, on the CPU.

    python python/pretrain_backbone.py                 # the shipped run (31.5 minutes on 2 CPU cores here)
    python python/pretrain_backbone.py --quick --out /tmp/pv    # a tiny run (< 1 minute), for testing

Upstream task: "fractal IFS attractors" in the style of FractalDB (Kataoka et al., ACCV 2020), written from the
description, not from any released code. Each class is a random iterated function system (IFS) of 2-4 contractive
affine maps ``p -> A_k p + t_k`` of the plane; an image of the class is the attractor of a slightly perturbed copy of
its IFS, drawn by the chaos game:

* a class's maps: ``A_k = R(a) diag(s1, +-s2) R(b)`` with rotation angles ``a, b`` uniform, singular values
  ``s1, s2`` uniform in [0.25, 0.85] (so every map contracts), a random reflection, ``t_k`` uniform in [-1, 1]^2;
  map ``k`` is picked with probability proportional to ``|det A_k| + 0.02``. An IFS is kept only if its
  attractor (40x40 occupancy grid of 6000 chaos-game points, normalised to its bounding box) covers at least 15%
  of the grid, so no class is a point or a thin curve; classes are drawn one after another from one seed.
* an image (the defaults of ``FractalTask``, which the shipped run used): every entry of every ``A_k`` and ``t_k``
  jittered by Gaussian noise (std 0.03), 64 parallel chains of 72 chaos-game steps (the first 8 discarded), the
  point cloud normalised to its robust bounding box, rotated by a random angle in [-10, 10] degrees and placed in
  its class's own box of the canvas (side 60-94% of the image and a position, drawn once per class; per image
  +-10% in scale and +-6% of the side in position); each point takes the colour of the map that produced it (one
  random hue per image plus a hue offset per map), opacity ``1 - exp(-hits / 0.5)`` over one random dark colour;
  a quarter of the images turned grey, a Gaussian blur of sigma uniform in [0, 1.5] pixels, Gaussian pixel noise of
  std up to 4/255; 64x64 RGB. The label is the class. (``multi_prob`` > 0 would add scenes of 2-4 small fractals;
  the shipped run has none.)

This shares no image source, image family or label with pocket-VTAB (fpet_kernels.data): no digits, photographs,
faces, texture families, cells or drawn object scenes; its labels are IFS identities, not counts, positions,
angles or distances. Images are rendered in numpy on the fly, so no training image repeats; a held-out
validation set (fixed stream, never trained on) measures upstream accuracy.

Training: AdamW (lr 1e-3, weight decay 0.05, betas 0.9/0.999), linear warm-up then cosine decay to 1e-5, label
smoothing 0.1, gradient clipping at norm 1, batch 128, timm's initialisation, ``torch.set_num_threads(2)``. Every
random draw comes from ``--seed`` (torch.manual_seed; numpy Generators from SeedSequence([seed, stream])), so a
run is deterministic for a seed on one machine and torch build.

Outputs (``--out``, default fpet_kernels/weights/):

* ``pocket_vit.safetensors``: the backbone without its head, plus the upstream head as ``upstream_head.*``, with
  the metadata of fpet_kernels.models (config, upstream task, training settings and time, final upstream val
  accuracy, and the accuracy and predictions on the fixed sample: 64 images drawn with seed 12345, which
  tests/test_models.py re-renders and checks);
* ``pocket_vit_train_log.jsonl``: one JSON object per block of steps (loss, train accuracy, upstream val accuracy,
  learning rate, seconds, images/s), then a final ``"event": "done"`` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IMG_SIZE = 64
MAX_MAPS = 4
MAX_INSTANCES = 4  # fractals per image at most

FIXED_SAMPLE_SEED = 12345
FIXED_SAMPLE_SIZE = 64

# RNG streams of SeedSequence([seed, stream])
STREAM_CLASSES, STREAM_TRAIN, STREAM_VAL, STREAM_LAYOUT = 0, 1, 2, 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


def _rotation(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


@dataclass(frozen=True)
class IFS:
    """One class: ``n`` affine maps ``p -> linear[k] @ p + shift[k]`` picked with probabilities ``probs``."""

    linear: np.ndarray  # [n, 2, 2]
    shift: np.ndarray  # [n, 2]
    probs: np.ndarray  # [n]


def _random_ifs(rng: np.random.Generator) -> IFS:
    n = int(rng.integers(2, MAX_MAPS + 1))
    singular = rng.uniform(0.25, 0.85, size=(n, 2))
    singular[:, 1] *= rng.choice([-1.0, 1.0], size=n)  # a reflection in half the maps
    linear = _rotation(rng.uniform(-np.pi, np.pi, n)) @ (singular[:, :, None] * np.eye(2)) @ _rotation(
        rng.uniform(-np.pi, np.pi, n)
    )
    shift = rng.uniform(-1.0, 1.0, size=(n, 2))
    weight = np.abs(np.linalg.det(linear)) + 0.02
    return IFS(linear, shift, weight / weight.sum())


def _chaos_game(
    rng: np.random.Generator, linear: np.ndarray, shift: np.ndarray, cum_probs: np.ndarray, chains: int, steps: int,
    burn_in: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Points ``[B, P, 2]`` and the map that produced each ``[B, P]`` of the chaos game of ``B`` IFSs at once
    (``linear [B, M, 2, 2]``, ``shift [B, M, 2]``, cumulative map probabilities ``cum_probs [B, M]``)."""
    batch = linear.shape[0]
    points = rng.uniform(-1.0, 1.0, size=(batch, chains, 2))
    rows = np.arange(batch)[:, None]
    kept_points, kept_maps = [], []
    for step in range(steps):
        u = rng.random((batch, chains))
        which = (u[:, :, None] >= cum_probs[:, None, :-1]).sum(-1)  # [B, K] in [0, M)
        a = linear[rows, which]  # [B, K, 2, 2]
        points = np.einsum("bkij,bkj->bki", a, points) + shift[rows, which]
        if step >= burn_in:
            kept_points.append(points)
            kept_maps.append(which)
    return np.concatenate(kept_points, 1), np.concatenate(kept_maps, 1)


def _occupancy(points: np.ndarray, grid: int) -> float:
    low, high = points.min(0), points.max(0)
    extent = np.maximum(high - low, 1e-9)
    cells = np.clip(((points - low) / extent.max() * (grid - 1)).astype(np.int64), 0, grid - 1)
    occupied = np.zeros((grid, grid), bool)
    occupied[cells[:, 1], cells[:, 0]] = True
    # relative to the bounding box of the attractor's longer side, so elongated shapes are not favoured
    return float(occupied.sum()) / float(grid * grid)


def make_classes(num_classes: int, seed: int, min_occupancy: float = 0.15) -> List[IFS]:
    """``num_classes`` IFS classes drawn from ``seed`` (module docstring), each with an attractor that covers at
    least ``min_occupancy`` of a 40x40 grid of its bounding square."""
    rng = _rng(seed, STREAM_CLASSES)
    classes: List[IFS] = []
    while len(classes) < num_classes:
        ifs = _random_ifs(rng)
        cum = np.cumsum(np.pad(ifs.probs, (0, MAX_MAPS - len(ifs.probs))))[None]
        cum[:, len(ifs.probs) - 1:] = 1.0
        pts, _ = _chaos_game(
            rng, _pad_maps(ifs.linear)[None], _pad_shift(ifs.shift)[None], cum, chains=100, steps=68, burn_in=8
        )
        if _occupancy(pts[0], 40) >= min_occupancy:
            classes.append(ifs)
    return classes


def _pad_maps(linear: np.ndarray) -> np.ndarray:
    out = np.tile(np.eye(2) * 0.5, (MAX_MAPS, 1, 1))
    out[: len(linear)] = linear
    return out


def _pad_shift(shift: np.ndarray) -> np.ndarray:
    out = np.zeros((MAX_MAPS, 2))
    out[: len(shift)] = shift
    return out


def _box_down(a: np.ndarray) -> np.ndarray:
    """2x2 box average over axes 1 and 2."""
    return (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]) * 0.25


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; ``h`` in turns, any shape; returns ``[..., 3]``."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


class FractalTask:
    """The upstream task: ``num_classes`` IFS classes from ``seed``; :meth:`render` draws labelled images.

    ``placement``: ``"class"`` (default) puts every class in its own box of the canvas (side 60-94% of the image,
    a random position, both drawn once per class), varied per image by +-10% in scale and +-6% of the side in
    position; ``"random"`` puts every image in a random box (side 55-95%). ``background``: ``"plain"`` (default,
    one random dark colour) or ``"gradient"`` (a dark linear gradient between two random colours). ``gray_prob``:
    the fraction of images turned grey (luma); ``max_blur``: the largest Gaussian blur sigma (pixels) drawn per
    image, uniform from 0.
    """

    def __init__(self, num_classes: int, seed: int, jitter: float = 0.03, max_rotation_deg: float = 10.0,
                 chains: int = 64, opacity_hits: float = 0.5, supersample: int = 1, placement: str = "class",
                 background: str = "plain", gray_prob: float = 0.25, max_blur: float = 1.5,
                 multi_prob: float = 0.0) -> None:
        if placement not in ("class", "random"):
            raise ValueError(f"placement must be 'class' or 'random', got {placement!r}")
        if background not in ("plain", "gradient"):
            raise ValueError(f"background must be 'plain' or 'gradient', got {background!r}")
        if supersample not in (1, 2, 4):
            raise ValueError(f"supersample must be 1, 2 or 4, got {supersample!r}")
        self.num_classes = num_classes
        self.seed = seed
        self.jitter = jitter
        self.max_rotation_deg = max_rotation_deg
        self.chains = chains
        self.opacity_hits = opacity_hits
        self.supersample = supersample
        self.placement = placement
        self.background = background
        self.gray_prob = gray_prob
        self.max_blur = max_blur
        self.multi_prob = multi_prob
        classes = make_classes(num_classes, seed)
        self.linear = np.stack([_pad_maps(c.linear) for c in classes])  # [C, M, 2, 2]
        self.shift = np.stack([_pad_shift(c.shift) for c in classes])  # [C, M, 2]
        cum = np.zeros((num_classes, MAX_MAPS))
        for k, c in enumerate(classes):
            cum[k, : len(c.probs)] = np.cumsum(c.probs)
            cum[k, len(c.probs) - 1:] = 1.0
        self.cum_probs = cum
        layout = _rng(seed, STREAM_LAYOUT)
        self.class_half = layout.uniform(0.30, 0.47, num_classes)  # half side, fraction of the image side
        self.class_centre = 0.5 + layout.uniform(-1, 1, (num_classes, 2)) * (0.5 - self.class_half)[:, None]

    def description(self) -> Dict[str, object]:
        """The task's parameters, for the weights file's metadata (``FractalTask(**description["params"])``)."""
        return {
            "name": "fractal-ifs",
            "description": (
                "FractalDB-style formula-driven classification: each class is a random iterated function system of "
                "2-4 contractive affine maps; an image is the chaos-game attractor of a jittered copy of its IFS in "
                "the class's own box of the canvas (jittered), coloured per map over a plain dark background, "
                "some grey, some blurred, 64x64 RGB; label: the IFS (python/pretrain_backbone.py docstring)"
            ),
            "params": {
                "num_classes": self.num_classes, "seed": self.seed, "jitter": self.jitter,
                "max_rotation_deg": self.max_rotation_deg, "chains": self.chains,
                "opacity_hits": self.opacity_hits, "supersample": self.supersample, "placement": self.placement,
                "background": self.background, "gray_prob": self.gray_prob, "max_blur": self.max_blur,
                "multi_prob": self.multi_prob,
            },
            "num_classes": self.num_classes,
            "img_size": IMG_SIZE,
            "normalisation": "x / 255 * 2 - 1 (as fpet_kernels.data.default_transform)",
        }

    def draw_labels(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Labels ``[count, MAX_INSTANCES]`` int64, -1 padded: one class (probability ``1 - multi_prob``) or 2-4
        distinct classes per image, uniform over the classes."""
        labels = np.full((count, MAX_INSTANCES), -1, dtype=np.int64)
        multi = rng.random(count) < self.multi_prob
        instances = np.where(multi, rng.integers(2, MAX_INSTANCES + 1, count), 1)
        order = np.argsort(rng.random((count, self.num_classes)), axis=1)[:, :MAX_INSTANCES]  # distinct classes
        keep = np.arange(MAX_INSTANCES)[None] < instances[:, None]
        labels[keep] = order[keep]
        return labels

    def _points(self, labels: np.ndarray, rng: np.random.Generator, chains: int) -> Tuple[np.ndarray, np.ndarray]:
        """Chaos-game points of jittered copies of the IFSs ``labels [N]``, each cloud normalised to its robust
        bounding box (about [-1, 1]^2) and rotated; and the map that produced each point."""
        n = len(labels)
        linear = self.linear[labels] + rng.normal(0.0, self.jitter, size=(n, MAX_MAPS, 2, 2))
        shift = self.shift[labels] + rng.normal(0.0, self.jitter, size=(n, MAX_MAPS, 2))
        points, maps = _chaos_game(rng, linear, shift, self.cum_probs[labels], chains=chains, steps=72, burn_in=8)
        points = np.clip(points, -1e4, 1e4)
        low = np.percentile(points, 0.5, axis=1)
        high = np.percentile(points, 99.5, axis=1)
        centre = (low + high) / 2
        half = np.maximum((high - low).max(-1) / 2, 1e-6)
        unit = (points - centre[:, None]) / half[:, None, None]
        angle = np.deg2rad(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg, n))
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        unit = np.stack([cos * unit[..., 0] - sin * unit[..., 1], sin * unit[..., 0] + cos * unit[..., 1]], -1)
        return unit, maps

    def render(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 images ``[B, 64, 64, 3]`` of the scenes ``labels`` (int ``[B, K]``, -1 padded, as
        :meth:`draw_labels` makes; or ``[B]``: one instance each), every random draw from ``rng``.

        A one-instance image puts its fractal in the class's box (``placement``); in a scene of 2-4 the fractals
        are small (side 24-50% of the image) at random positions, later ones drawn over earlier ones."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim == 1:
            labels = labels[:, None]
        size = IMG_SIZE * self.supersample
        batch = len(labels)
        single = (labels >= 0).sum(1) == 1
        owner_single = np.nonzero(single)[0]
        owner_multi, slot_multi = np.nonzero((labels >= 0) & ~single[:, None])

        # one-instance images: the class's box (or a random big box)
        unit_s, maps_s = self._points(labels[owner_single, 0], rng, self.chains)
        n_s = len(owner_single)
        if self.placement == "class":
            box_s = self.class_half[labels[owner_single, 0]] * rng.uniform(0.9, 1.1, n_s)
            offset_s = self.class_centre[labels[owner_single, 0]] + rng.uniform(-0.06, 0.06, (n_s, 2))
        else:
            box_s = rng.uniform(0.275, 0.475, n_s)
            offset_s = 0.5 + rng.uniform(-1, 1, (n_s, 2)) * (0.5 - box_s)[:, None]
        # scenes: small fractals anywhere, with fewer points each
        unit_m, maps_m = self._points(labels[owner_multi, slot_multi], rng, max(8, self.chains // 2))
        n_m = len(owner_multi)
        box_m = rng.uniform(0.12, 0.25, n_m)
        offset_m = box_m[:, None] + rng.random((n_m, 2)) * (1 - 2 * box_m)[:, None]

        pix_s = np.floor((unit_s * box_s[:, None, None] + offset_s[:, None]) * size).astype(np.int64)
        pix_m = np.floor((unit_m * box_m[:, None, None] + offset_m[:, None]) * size).astype(np.int64)

        # colours: one random hue per instance plus a hue offset per map (grey images are made grey below)
        n_inst = n_s + n_m
        hue = rng.random(n_inst)[:, None] + np.arange(MAX_MAPS)[None] * rng.uniform(0.08, 0.3, n_inst)[:, None]
        sat = rng.uniform(0.4, 1.0, (n_inst, 1)).repeat(MAX_MAPS, 1)
        val = rng.uniform(0.7, 1.0, (n_inst, MAX_MAPS))
        palette = _hsv_to_rgb(hue, sat, val)  # [instances, M, 3]
        colour_s = palette[np.arange(n_s)[:, None], maps_s]
        colour_m = palette[n_s + np.arange(n_m)[:, None], maps_m]

        # splat: later instances over earlier ones (points of one instance after another, last one wins per pixel)
        cells = batch * size * size
        hits = np.zeros(cells, np.float32)
        premult = np.zeros((cells, 3), np.float32)
        layers = [(pix_s, colour_s, owner_single)] + [
            (pix_m[slot_multi == k], colour_m[slot_multi == k], owner_multi[slot_multi == k])
            for k in range(MAX_INSTANCES)
        ]
        for pix, colour, owner in layers:
            if len(owner) == 0:
                continue
            inside = (pix >= 0).all(-1) & (pix < size).all(-1)
            flat = (owner[:, None] * size + pix[..., 1]) * size + pix[..., 0]
            flat, colour = flat[inside], colour[inside]
            layer_hits = np.bincount(flat, minlength=cells).astype(np.float32)
            alpha = 1.0 - np.exp(-layer_hits / self.opacity_hits)
            scale = alpha / np.maximum(layer_hits, 1.0)
            layer = np.stack([np.bincount(flat, weights=colour[:, c], minlength=cells).astype(np.float32) * scale
                              for c in range(3)], -1)
            premult = premult * (1 - alpha)[:, None] + layer
            hits = hits * (1 - alpha) + alpha  # accumulated opacity
        alpha = hits.reshape(batch, size, size)[..., None]
        premult = premult.reshape(batch, size, size, 3)
        for _ in range(self.supersample.bit_length() - 1):  # 2x2 box downsampling to 64x64
            premult, alpha = _box_down(premult), _box_down(alpha)

        if self.background == "plain":
            bg = _hsv_to_rgb(rng.random(batch), rng.uniform(0.0, 0.8, batch), rng.uniform(0.0, 0.25, batch))
            bg = np.broadcast_to(bg[:, None, None].astype(np.float32), premult.shape)
        else:
            bg_from = _hsv_to_rgb(rng.random(batch), rng.uniform(0.2, 0.8, batch), rng.uniform(0.0, 0.3, batch))
            bg_to = _hsv_to_rgb(rng.random(batch), rng.uniform(0.2, 0.8, batch), rng.uniform(0.0, 0.3, batch))
            direction = rng.uniform(-np.pi, np.pi, batch)
            axis = np.linspace(-1, 1, IMG_SIZE)
            ramp = (np.cos(direction)[:, None, None] * axis[None, None, :] + np.sin(direction)[:, None, None]
                    * axis[None, :, None]) / 2.8 + 0.5
            ramp = ramp[..., None].astype(np.float32)
            bg = bg_from[:, None, None].astype(np.float32) * (1 - ramp) + bg_to[:, None, None].astype(np.float32) * ramp
        image = bg * (1 - alpha) + premult

        gray = rng.random(batch) < self.gray_prob
        luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
        image = np.where(gray[:, None, None, None], luma[..., None], image)
        sigma = rng.uniform(0.0, self.max_blur, batch)
        image = _blur(image, sigma)
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        image = image + noise * rng.uniform(0, 4 / 255, batch).astype(np.float32)[:, None, None, None]
        return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)

    def sample(self, count: int, rng: np.random.Generator, batch: int = 256) -> Tuple[np.ndarray, np.ndarray]:
        """``(images uint8 [count, 64, 64, 3], labels int64 [count, MAX_INSTANCES])`` (:meth:`draw_labels`)."""
        labels = self.draw_labels(count, rng)
        images = [self.render(labels[i: i + batch], rng) for i in range(0, count, batch)]
        return np.concatenate(images), labels


def _blur(image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of float images ``[B, H, W, 3]`` with one sigma (pixels) per image; sigma < 0.3 is
    left as is; the borders are renormalised (no darkening)."""
    batch, height, width, _ = image.shape
    coords = np.arange(height, dtype=np.float32)
    s = np.maximum(sigma, 0.3).astype(np.float32)[:, None, None]
    kernel = np.exp(-0.5 * ((coords[None, :, None] - coords[None, None, :]) / s) ** 2)
    kernel /= kernel.sum(-1, keepdims=True)  # [B, H, H], rows sum to 1
    kernel[sigma < 0.3] = np.eye(height, dtype=np.float32)
    out = kernel @ image.reshape(batch, height, width * 3)  # along rows
    out = out.reshape(batch, height, width, 3).transpose(0, 2, 1, 3).reshape(batch, width, height * 3)
    out = (kernel @ out).reshape(batch, width, height, 3).transpose(0, 2, 1, 3)  # along columns
    return np.ascontiguousarray(out)


def fixed_sample(task: FractalTask) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed sample whose accuracy the weights file records: ``FIXED_SAMPLE_SIZE`` images, seed 12345."""
    return task.sample(FIXED_SAMPLE_SIZE, _rng(FIXED_SAMPLE_SEED, 0))


def to_tensor(images: np.ndarray):
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [-1, 1], as ``default_transform`` normalises."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).mul(2.0).sub(1.0).contiguous()


def soft_targets(labels: np.ndarray, num_classes: int):
    """float32 ``[B, num_classes]``: probability spread evenly over the classes present in each image."""
    import torch

    target = np.zeros((len(labels), num_classes), np.float32)
    rows, slots = np.nonzero(labels >= 0)
    target[rows, labels[rows, slots]] = 1.0
    return torch.from_numpy(target / target.sum(1, keepdims=True))


def hits(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool ``[B]``: the predicted class is one of the image's classes (``labels [B, K]``, -1 padded)."""
    return (labels == np.asarray(predictions)[:, None]).any(1)


def predict(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class ``[N]`` of ``model`` on uint8 images, under inference mode, in batches."""
    import torch

    preds = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            preds.append(model(to_tensor(images[i: i + batch])).argmax(-1).numpy())
    return np.concatenate(preds)


def _lr_at(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "fpet_kernels", "weights"),
                        help="output folder (default: fpet_kernels/weights)")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps (default 1800)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100, help="upstream classes (default 100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (default 0.05)")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--val-images", type=int, default=1000, help="held-out upstream validation images")
    parser.add_argument("--log-blocks", type=int, default=12, help="log/validation blocks over the run (default 12)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop after this many minutes even if --steps are not done (the schedule is not "
                             "shortened; the log records the stop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for testing (< 1 minute): 20 steps, batch 32, 20 classes, 200 val images")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.classes, args.val_images, args.log_blocks = 20, 32, 20, 200, 4
    for name in ("steps", "batch_size", "classes", "val_images", "log_blocks", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm

    from fpet_kernels import models

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    weights_path = os.path.join(args.out, "pocket_vit.safetensors")
    log_path = os.path.join(args.out, "pocket_vit_train_log.jsonl")

    t0 = time.perf_counter()
    task = FractalTask(args.classes, args.seed)
    val_images, val_labels = task.sample(args.val_images, _rng(args.seed, STREAM_VAL))
    train_rng = _rng(args.seed, STREAM_TRAIN)
    setup_s = time.perf_counter() - t0

    model = models.build_pocket_vit(args.classes)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n
                                                               and "cls_token" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999),
    )
    warmup = max(1, int(round(args.warmup * args.steps)))
    block = max(1, math.ceil(args.steps / args.log_blocks))
    print(f"pocket-vit: {n_params:,} backbone parameters; upstream fractal-ifs, {args.classes} classes; "
          f"{args.steps} steps x {args.batch_size}; threads {args.threads}; log {log_path}", flush=True)

    log = open(log_path, "w", encoding="utf-8")

    def write(record: Dict[str, object]) -> None:
        log.write(json.dumps(record, sort_keys=True) + "\n")
        log.flush()

    write({"event": "start", "steps": args.steps, "batch_size": args.batch_size, "classes": args.classes,
           "lr": args.lr, "seed": args.seed, "threads": args.threads, "backbone_params": n_params,
           "setup_seconds": round(setup_s, 2), "machine": platform.processor() or platform.machine()})
    start = time.perf_counter()
    render_s = 0.0
    block_loss = block_correct = block_seen = 0.0
    block_start = time.perf_counter()
    stopped_early = False
    steps_done = 0
    model.train()
    bar = tqdm(total=args.steps, desc="pretrain", unit="step", disable=args.no_progress)
    for step in range(args.steps):
        r0 = time.perf_counter()
        labels = task.draw_labels(args.batch_size, train_rng)
        x = to_tensor(task.render(labels, train_rng))
        y = soft_targets(labels, args.classes)
        render_s += time.perf_counter() - r0
        lr = _lr_at(step, args.steps, warmup, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps_done = step + 1
        block_loss += loss.item() * len(y)
        block_correct += hits(logits.argmax(-1).numpy(), labels).sum()
        block_seen += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        over_time = args.time_limit is not None and (time.perf_counter() - start) > args.time_limit * 60
        if steps_done % block == 0 or steps_done == args.steps or over_time:
            train_seconds = time.perf_counter() - block_start
            model.eval()
            val_acc = float(hits(predict(model, val_images), val_labels).mean())
            model.train()
            record = {
                "event": "block", "step": steps_done, "images": steps_done * args.batch_size, "lr": lr,
                "loss": block_loss / block_seen, "train_acc": block_correct / block_seen, "val_acc": val_acc,
                "seconds": round(time.perf_counter() - start, 2),
                "img_per_s": round(block_seen / train_seconds, 1), "render_seconds": round(render_s, 2),
            }
            write(record)
            tqdm.write(f"step {steps_done}: loss {record['loss']:.3f} train acc {record['train_acc']:.3f} "
                       f"val acc {val_acc:.3f} ({record['seconds']:.0f} s, {record['img_per_s']} img/s)")
            block_loss = block_correct = block_seen = 0.0
            block_start = time.perf_counter()
        if over_time:
            stopped_early = True
            break
    bar.close()
    train_seconds = time.perf_counter() - start

    model.eval()
    val_acc = float(hits(predict(model, val_images), val_labels).mean())
    sample_images, sample_labels = fixed_sample(task)
    sample_preds = predict(model, sample_images)
    sample_acc = float(hits(sample_preds, sample_labels).mean())
    metadata = {
        "format": models.WEIGHTS_FORMAT,
        "format_version": models.WEIGHTS_FORMAT_VERSION,
        "config": models.POCKET_VIT,
        "backbone_params": n_params,
        "upstream": task.description(),
        "training": {
            "seed": args.seed, "steps": steps_done, "planned_steps": args.steps, "stopped_early": stopped_early,
            "batch_size": args.batch_size, "optimizer": "AdamW", "lr": args.lr, "min_lr": args.min_lr,
            "weight_decay": args.weight_decay, "warmup_steps": warmup, "schedule": "linear warm-up, cosine decay",
            "label_smoothing": args.label_smoothing, "grad_clip_norm": 1.0, "threads": args.threads,
            "train_seconds": round(train_seconds, 1), "images_seen": steps_done * args.batch_size,
            "torch": torch.__version__, "command": "python python/pretrain_backbone.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
        },
        "upstream_val_accuracy": val_acc,
        "upstream_val_images": args.val_images,
        "fixed_sample": {
            "seed": FIXED_SAMPLE_SEED, "size": FIXED_SAMPLE_SIZE, "accuracy": sample_acc,
            "predictions": [int(p) for p in sample_preds], "labels": sample_labels.tolist(),
        },
    }
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    tensors[models.UPSTREAM_HEAD_PREFIX + "weight"] = model.head.weight.detach().clone().contiguous()
    tensors[models.UPSTREAM_HEAD_PREFIX + "bias"] = model.head.bias.detach().clone().contiguous()
    save_file(tensors, weights_path, metadata={models.WEIGHTS_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    write({"event": "done", "steps": steps_done, "stopped_early": stopped_early, "val_acc": val_acc,
           "fixed_sample_acc": sample_acc, "train_seconds": round(train_seconds, 1),
           "render_seconds": round(render_s, 2), "file_bytes": os.path.getsize(weights_path)})
    log.close()
    print(f"upstream val accuracy {val_acc:.4f} ({args.val_images} images), fixed sample {sample_acc:.4f}; "
          f"{train_seconds / 60:.1f} min; wrote {weights_path} ({os.path.getsize(weights_path) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
