"""pocket-VTAB "natural" generators: real scans and photographs that ship inside the sklearn and scikit-image wheels.

Each generator is a class built from the task's own ``numpy.random.Generator`` (which fixes, once per task and
seed, which source images feed the training split and which the test split: the two never share a source image,
or, for ``photos``, a source pixel) with a ``sample(split, rng, label)`` method returning one ``uint8 [64, 64, 3]``
image of class ``label``; ``split`` is ``"train"`` (train800 and val200) or ``"test"``.

* :class:`Digits` (``digits``): ``sklearn.datasets.load_digits()``, the 1797 8x8 scans of handwritten digits (UCI
  optdigits test set), each used as is, once: upscaled bilinearly to 64x64, grey (white ink on black) in three
  channels. Label = the digit. Per class a third of the scans (shuffled by the task RNG) are test sources, the rest
  training sources.
* :class:`Photos` (``photos``): crops of eight photographs bundled with scikit-image (``skimage.data.astronaut,
  camera, chelsea, coffee, coins, hubble_deep_field, moon, rocket``; grey ones in three channels). Label = the
  source photograph. Each photograph is cut into a 3x3 grid of tiles; the tiles ``(r, c)`` with ``(r + c) % 3 == 1``
  (one per row and column) are test tiles, the other six training tiles. A sample is a square crop inside one tile
  (side 50-100% of the tile's shorter side, random position), randomly mirrored, brightness scaled by
  ``U(0.8, 1.2)``, resized to 64x64.
* :class:`Faces` (``faces``): ``skimage.data.lfw_subset()``, 100 25x25 faces from Labeled Faces in the Wild and 100
  25x25 non-face patches of the same photographs' backgrounds. Label 0 = non-face, 1 = face. Per class 34 sources
  (shuffled by the task RNG) are test sources, 66 training sources. A sample is a random source of its class and
  split, cropped (square, side 19-25 px, random position), randomly mirrored, with brightness scaled by
  ``U(0.8, 1.2)`` and contrast by ``U(0.8, 1.25)``, resized to 64x64, grey in three channels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ._draw import SIZE, gray_to_rgb, pil_resize, to_uint8

SPLITS = ("train", "test")


def _partition(rng: np.random.Generator, indices: np.ndarray, test_fraction: float) -> dict[str, np.ndarray]:
    """Shuffles ``indices`` and splits them into test (the first ``round(test_fraction * n)``) and train."""
    shuffled = rng.permutation(indices)
    n_test = int(round(test_fraction * len(shuffled)))
    return {"test": shuffled[:n_test], "train": shuffled[n_test:]}


class Digits:
    """``digits``: sklearn's 8x8 handwritten digits, each scan used once (module docstring)."""

    classes = tuple(str(d) for d in range(10))

    def __init__(self, rng: np.random.Generator) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self._images = bunch.images  # float 0..16, [1797, 8, 8]
        self._pools = {split: {} for split in SPLITS}
        for label in range(10):
            parts = _partition(rng, np.flatnonzero(bunch.target == label), 1.0 / 3.0)
            for split in SPLITS:
                self._pools[split][label] = list(parts[split])

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        pool = self._pools[split][label]
        if not pool:
            raise ValueError(
                f"pocket-VTAB task 'digits': the {split} split ran out of source scans of digit {label} "
                f"(each scan is used once; sklearn's digits hold about 58 test and 118 training scans per class); "
                f"ask for fewer images"
            )
        scan = self._images[pool.pop(0)] * (255.0 / 16.0)
        return to_uint8(gray_to_rgb(pil_resize(to_uint8(scan), SIZE, Image.BILINEAR)))


class Photos:
    """``photos``: crops of eight scikit-image photographs, train and test from disjoint tiles (module docstring)."""

    classes = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "moon", "rocket")

    def __init__(self, rng: np.random.Generator) -> None:
        from skimage import data as skdata

        self._photos = [gray_to_rgb(getattr(skdata, name)()) for name in self.classes]
        self._tiles = {split: [] for split in SPLITS}
        for photo in self._photos:
            h, w = photo.shape[:2]
            rows, cols = np.linspace(0, h, 4).astype(int), np.linspace(0, w, 4).astype(int)
            tiles = {split: [] for split in SPLITS}
            for r in range(3):
                for c in range(3):
                    split = "test" if (r + c) % 3 == 1 else "train"
                    tiles[split].append((rows[r], rows[r + 1], cols[c], cols[c + 1]))
            for split in SPLITS:
                self._tiles[split].append(tiles[split])

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        tiles = self._tiles[split][label]
        y0, y1, x0, x1 = tiles[rng.integers(len(tiles))]
        short = min(y1 - y0, x1 - x0)
        side = int(rng.integers(short // 2, short + 1))
        y = int(rng.integers(y0, y1 - side + 1))
        x = int(rng.integers(x0, x1 - side + 1))
        crop = self._photos[label][y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = pil_resize(np.ascontiguousarray(crop), SIZE, Image.BILINEAR) * rng.uniform(0.8, 1.2)
        return to_uint8(image)


class Faces:
    """``faces``: LFW faces vs non-faces from ``skimage.data.lfw_subset``, augmented (module docstring)."""

    classes = ("non-face", "face")

    def __init__(self, rng: np.random.Generator) -> None:
        from skimage import data as skdata

        self._images = to_uint8(skdata.lfw_subset() * 255.0)  # [200, 25, 25]; 0-99 faces, 100-199 non-faces
        sources = {1: np.arange(0, 100), 0: np.arange(100, 200)}
        self._pools = {split: {} for split in SPLITS}
        for label in (0, 1):
            parts = _partition(rng, sources[label], 0.34)
            for split in SPLITS:
                self._pools[split][label] = parts[split]

    def sample(self, split: str, rng: np.random.Generator, label: int) -> np.ndarray:
        pool = self._pools[split][label]
        source = self._images[pool[rng.integers(len(pool))]]
        side = int(rng.integers(19, 26))
        y, x = (int(v) for v in rng.integers(0, 25 - side + 1, size=2))
        crop = source[y : y + side, x : x + side].astype(np.float64)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        mean = crop.mean()
        crop = (crop - mean) * rng.uniform(0.8, 1.25) + mean * rng.uniform(0.8, 1.2)
        return to_uint8(gray_to_rgb(pil_resize(to_uint8(crop), SIZE, Image.BILINEAR)))
