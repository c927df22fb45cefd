"""pocket-VTAB: a small offline benchmark suite in the VTAB-1k layout, generated on first use.

Nine tasks over VTAB's three groups, each made of 64x64 RGB PNGs from data that ships inside the installed wheels
(sklearn, scikit-image) or is drawn procedurally; nothing is downloaded. Every task has 1000 training images (800
in ``train800``, 200 in ``val200``, ``train800val200`` both) and 500 test images, class-balanced in each of the
three (class counts differ by at most one), and is written in exactly the VTAB-1k layout of
:mod:`fpet_kernels.data.loaders`, so :class:`~fpet_kernels.data.loaders.VTAB1k` reads it.

======== =========== ============= ===================================================================================
group    task        classes       what the images are / what the label is
======== =========== ============= ===================================================================================
natural  digits      10            sklearn's 8x8 handwritten digit scans upscaled; the digit
natural  photos      8             crops of 8 scikit-image photographs (train/test from disjoint tiles); which photo
natural  faces       2             LFW 25x25 faces vs non-face patches (skimage lfw_subset), augmented; face or not
special. textures    8             procedural textures (stripes, checker, dots, blotches, grain, rings, crosshatch,
                                   Voronoi) in random colours; the texture family
special. cells       6             fluorescence-microscopy-like cells; the morphology (round, elongated, dense,
                                   clustered, ring, budding)
struct.  count       8             1-8 drawn objects (circle/square/triangle/diamond); the count
struct.  location    9             one drawn object; which cell of a 3x3 grid holds its centre
struct.  orientation 8             one bar; its angle in 22.5-degree bins over [0, 180)
struct.  distance    6             two discs; the distance between their centres in 7 px bins from 8 to 50 px
======== =========== ============= ===================================================================================

Exactly which images and labels each generator uses is documented in :mod:`~fpet_kernels.data.natural`,
:mod:`~fpet_kernels.data.specialized` and :mod:`~fpet_kernels.data.structured` (one class per task, registered here
in :data:`POCKET_VTAB`). A pretraining task for a backbone that is evaluated on pocket-VTAB must not use any of
these sources or image families (the sklearn digits, the scikit-image photographs and lfw_subset, and these
procedural textures, cell images and object scenes), or the benchmark measures memorisation.

**Determinism.** A task is a function of its name, the ``seed`` and the sizes: generation draws from numpy
Generators seeded with ``SeedSequence([seed, crc32(task name), stream])``, one stream for the task's setup (which
source images go to train and which to test), one each for train800, val200 and test; no global RNG is used. The
same seed gives the same bytes in every file (for one Pillow/zlib build). Within a task no two images are equal
pixel for pixel (a duplicate draw is replaced by the next one), so train and test share no image; the natural
tasks also take train and test from disjoint source images.

**Cache.** Task ``T`` lives in ``ROOT/T`` with ``ROOT`` the ``root`` argument, else ``$FPET_DATA_DIR``, else
``~/.cache/fpet_kernels/pocket_vtab``. It holds ``train/00000.png ...`` (train800 then val200), ``test/00000.png
...``, the four list files and ``.complete``, a JSON marker with the format version, task, seed and sizes written
last. A task is generated (into a temporary sibling folder, renamed into place when complete) when the marker is
missing or differs from what is asked for; a folder ``ROOT/T`` without the marker is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import natural, specialized, structured
from ._draw import SIZE
from .loaders import VTAB1K_SPLITS, VTAB1k

FORMAT_VERSION = 1
"""Version of the generated files; a cached task with another version is regenerated."""

DEFAULT_SIZES = (800, 200, 500)
"""Default ``(train800, val200, test)`` image counts of every task."""

MARKER = ".complete"


@dataclass(frozen=True)
class TaskInfo:
    """One pocket-VTAB task: name, VTAB group, class count and names, a one-line description, its generator."""

    name: str
    group: str
    num_classes: int
    description: str
    class_names: tuple[str, ...]
    generator: type

    def __repr__(self) -> str:
        return f"TaskInfo({self.name!r}, group={self.group!r}, num_classes={self.num_classes})"


def _task(name: str, group: str, generator: type, description: str) -> TaskInfo:
    return TaskInfo(name, group, len(generator.classes), description, tuple(generator.classes), generator)


POCKET_VTAB: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        _task("digits", "natural", natural.Digits, "sklearn's 8x8 handwritten digit scans, upscaled; label: the digit"),
        _task("photos", "natural", natural.Photos, "crops of 8 scikit-image photographs; label: the source photograph"),
        _task("faces", "natural", natural.Faces, "LFW faces vs non-face patches (skimage lfw_subset), augmented"),
        _task("textures", "specialized", specialized.Textures, "procedural textures in random colours; label: family"),
        _task("cells", "specialized", specialized.Cells, "fluorescence-microscopy-like cells; label: morphology"),
        _task("count", "structured", structured.Count, "1-8 drawn objects; label: their number"),
        _task("location", "structured", structured.Location, "one drawn object; label: its cell of a 3x3 grid"),
        _task("orientation", "structured", structured.Orientation, "one bar; label: its angle in 22.5-degree bins"),
        _task("distance", "structured", structured.Distance, "two discs; label: their centre distance, 7 px bins"),
    )
}
"""The pocket-VTAB tasks by name (module docstring)."""


def list_tasks() -> list[TaskInfo]:
    """The pocket-VTAB tasks, natural first, then specialized, then structured."""
    return list(POCKET_VTAB.values())


def get_task(task: str) -> TaskInfo:
    """The :class:`TaskInfo` of a task name; an unknown name is a ValueError listing the valid ones."""
    if task not in POCKET_VTAB:
        raise ValueError(f"unknown pocket-VTAB task {task!r}; valid tasks: {', '.join(POCKET_VTAB)}")
    return POCKET_VTAB[task]


def default_root() -> str:
    """``$FPET_DATA_DIR`` if set (and not empty), else ``~/.cache/fpet_kernels/pocket_vtab``."""
    env = os.environ.get("FPET_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "fpet_kernels", "pocket_vtab")


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_sizes(sizes) -> tuple[int, int, int]:
    if sizes is None:
        return DEFAULT_SIZES
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 3:
        raise ValueError(f"sizes must be (train800, val200, test) image counts, got {sizes!r}")
    return tuple(_check_int(f"sizes[{i}]", n, 1) for i, n in enumerate(sizes))


def _rng(seed: int, task: str, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(task.encode()), stream])))


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels, each class ``n // num_classes`` or one more times, in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def _marker(task: str, seed: int, sizes: tuple[int, int, int]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "task": task,
        "seed": seed,
        "sizes": dict(zip(("train800", "val200", "test"), sizes)),
    }


def _read_marker(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def generate_task(task: str, directory: str, seed: int = 0, sizes=None, progress: bool = True) -> None:
    """Writes task ``task`` into the (new or empty) folder ``directory`` in the VTAB-1k layout, marker last.

    Low level: :func:`pocket_vtab_dir` is the cached entry point. ``sizes`` is ``(train800, val200, test)``
    (default :data:`DEFAULT_SIZES`).
    """
    from PIL import Image
    from tqdm import tqdm

    info = get_task(task)
    seed = _check_int("seed", seed, 0)
    sizes = _check_sizes(sizes)
    generator = info.generator(_rng(seed, task, 0))
    seen: set[bytes] = set()
    # (list file, image folder and split of the generator, first file number, image count, RNG stream)
    plan = (
        ("train800", "train", 0, sizes[0], 1),
        ("val200", "train", sizes[0], sizes[1], 2),
        ("test", "test", 0, sizes[2], 3),
    )
    lists: dict[str, list[str]] = {}
    for folder in ("train", "test"):
        os.makedirs(os.path.join(directory, folder), exist_ok=True)
    with tqdm(total=sum(sizes), desc=f"pocket-VTAB {task}", unit="img", disable=not progress) as bar:
        for list_name, folder, start, count, stream in plan:
            rng = _rng(seed, task, stream)
            lines = []
            for offset, label in enumerate(_balanced_labels(rng, count, info.num_classes)):
                label = int(label)
                for _ in range(100):
                    image = generator.sample(folder, rng, label)
                    digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
                    if digest not in seen:
                        break
                else:
                    raise RuntimeError(f"pocket-VTAB task {task!r}: 100 draws in a row duplicated earlier images")
                if image.shape != (SIZE, SIZE, 3) or image.dtype != np.uint8:
                    raise AssertionError(f"pocket-VTAB task {task!r} made an image {image.shape} {image.dtype}")
                seen.add(digest)
                rel = f"{folder}/{start + offset:05d}.png"
                Image.fromarray(image, "RGB").save(os.path.join(directory, rel), format="PNG")
                lines.append(f"{rel} {label}\n")
                bar.update(1)
            lists[list_name] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name in VTAB1K_SPLITS:
        with open(os.path.join(directory, f"{name}.txt"), "w", encoding="utf-8") as handle:
            handle.writelines(lists[name])
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as handle:
        json.dump(_marker(task, seed, sizes), handle, sort_keys=True)
        handle.write("\n")


def pocket_vtab_dir(
    task: str, root: Optional[str | os.PathLike] = None, seed: int = 0, sizes=None, progress: bool = True
) -> str:
    """The folder of task ``task`` (``ROOT/task``, module docstring), generated first if it is not there yet.

    ``root`` defaults to :func:`default_root`; ``sizes`` is ``(train800, val200, test)`` (default
    :data:`DEFAULT_SIZES`; smaller sizes are for tests). A cached task whose marker differs from ``seed``,
    ``sizes`` or :data:`FORMAT_VERSION` is regenerated; a folder there without a marker is a FileExistsError
    (it is not ours to delete).
    """
    info = get_task(task)
    seed = _check_int("seed", seed, 0)
    sizes = _check_sizes(sizes)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)) if root is not None else default_root())
    target = os.path.join(root, info.name)
    wanted = _marker(info.name, seed, sizes)
    found = _read_marker(target)
    if found == wanted:
        return target
    if os.path.exists(target) and found is None:
        raise FileExistsError(
            f"pocket-VTAB: {target!r} exists but holds no {MARKER} marker of a generated task; "
            f"move it away or pass another root"
        )
    os.makedirs(root, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{info.name}.partial-", dir=root)
    try:
        generate_task(info.name, partial, seed=seed, sizes=sizes, progress=progress)
        if found is not None:  # ours, made with another seed, size or format version
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(partial, target)
        except OSError:
            if _read_marker(target) != wanted:  # not another process that finished the same task first
                raise
    finally:
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
    return target


def load_pocket_vtab(
    task: str,
    split: str,
    transform: Optional[Callable] = None,
    *,
    root: Optional[str | os.PathLike] = None,
    seed: int = 0,
    sizes=None,
    progress: bool = True,
) -> VTAB1k:
    """``VTAB1k(pocket_vtab_dir(task, root, seed, sizes), split, transform)``: one split of a pocket-VTAB task.

    Without a transform the items are PIL images (use :func:`~fpet_kernels.data.loaders.default_transform`).
    """
    if split not in VTAB1K_SPLITS:
        raise ValueError(f"load_pocket_vtab: split must be one of {', '.join(VTAB1K_SPLITS)}, got {split!r}")
    return VTAB1k(pocket_vtab_dir(task, root=root, seed=seed, sizes=sizes, progress=progress), split, transform)
