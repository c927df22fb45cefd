"""Dataset loaders: an ImageFolder tree, the VTAB-1k list-file layout, and the default transform.

The VTAB-1k layout (the one PET papers use for VTAB-1k) is a folder holding images and four list files::

    ROOT/train800.txt         800 training samples
    ROOT/val200.txt           200 validation samples (disjoint from train800)
    ROOT/train800val200.txt   both (the training set of the final run)
    ROOT/test.txt             the test set
    ROOT/<any relative path to an image>

Each non-blank line of a list file is ``relative/path label``: two whitespace-separated fields, the image path
relative to ROOT (so a path cannot contain whitespace) and an integer label ``>= 0``. Blank lines are skipped.
A path may not be absolute nor lead out of ROOT through ``..`` (checked on the text of the path, so a symlinked
image folder inside ROOT is fine). pocket-VTAB (:mod:`fpet_kernels.data.pocket_vtab`) writes exactly this layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset

VTAB1K_SPLITS = ("train800", "val200", "train800val200", "test")
"""The split names of the VTAB-1k layout; split ``S`` is listed in ``ROOT/S.txt``."""

DEFAULT_IMG_SIZE = 64
"""Side of the square images the default transform produces (the small backbone's input size)."""


def default_transform(img_size: int = DEFAULT_IMG_SIZE):
    """The one transform for training and evaluation: resize to ``img_size x img_size``, ``ToTensor``, normalise.

    Resizing is bilinear (with antialiasing) to exactly ``img_size x img_size``, ignoring the aspect ratio (pocket-VTAB
    images are stored at 64x64, so at the default size it changes nothing). ``ToTensor`` gives float32 ``[3, H, W]``
    in ``[0, 1]``; normalising with mean 0.5 and std 0.5 per channel maps that to ``[-1, 1]``. There is no
    augmentation, so the same function serves train and eval.
    """
    from torchvision import transforms

    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    return transforms.Compose(
        [
            transforms.Resize(
                (img_size, img_size), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True
            ),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )


def load_rgb(path: str) -> Image.Image:
    """Opens an image file with PIL and returns it converted to RGB (fully loaded, file closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def imagefolder(root: str | os.PathLike, transform: Optional[Callable] = None):
    """``torchvision.datasets.ImageFolder(root, transform)``: images in ``root/<class name>/<file>``.

    Class indices are the sorted class folder names, as torchvision assigns them; images are loaded as RGB PIL
    images. A missing root, or one with no class folder holding an image, is a FileNotFoundError naming the path.
    """
    from torchvision.datasets import ImageFolder

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"imagefolder: {root!r} is not a directory; expected a folder laid out as ROOT/<class name>/<image file>"
        )
    try:
        return ImageFolder(root, transform=transform)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"imagefolder: {root!r} holds no images; expected a folder laid out as ROOT/<class name>/<image file> "
            f"(torchvision: {error})"
        ) from None


@dataclass(frozen=True)
class ListEntry:
    """One line of a VTAB-1k list file: the image path relative to the root, and its label."""

    path: str
    label: int
    line: int


def read_list_file(list_file: str, root: str, check_images: bool = True) -> list[ListEntry]:
    """Parses a VTAB-1k list file (module docstring): one ``relative/path label`` per non-blank line.

    Raises FileNotFoundError for a missing list file or (with ``check_images``) a missing image, ValueError for a
    malformed line; both name the list file and the 1-based line number and say what was expected. An empty file
    (no samples) is a ValueError too.
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"VTAB-1k list file {list_file!r} does not exist")
    entries = []
    with open(list_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{list_file}, line {number}"
            if len(fields) != 2:
                raise ValueError(
                    f"{where}: expected 2 whitespace-separated fields 'relative/path label', got {len(fields)}: "
                    f"{line.rstrip()!r}"
                )
            rel, text = fields
            label = int(text) if text.isascii() and text.isdigit() else None
            if label is None:
                raise ValueError(f"{where}: expected an integer label >= 0, got {text!r}")
            norm = os.path.normpath(rel)
            if os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
                raise ValueError(
                    f"{where}: expected an image path relative to {root!r} and inside it, got {rel!r}"
                )
            if check_images and not os.path.isfile(os.path.join(root, norm)):
                raise FileNotFoundError(
                    f"{where}: image {rel!r} does not exist (looked for {os.path.join(root, norm)!r})"
                )
            entries.append(ListEntry(norm, label, number))
    if not entries:
        raise ValueError(f"VTAB-1k list file {list_file!r} holds no samples; expected lines 'relative/path label'")
    return entries


class VTAB1k(Dataset):
    """One split of a folder in the VTAB-1k layout (module docstring): ``(image, label)`` pairs.

    ``split`` is one of :data:`VTAB1K_SPLITS`. An item is ``(transform(image), label)`` with the image loaded with
    PIL and converted to RGB (without a transform, the PIL image itself). Attributes: ``root``, ``split``,
    ``list_file``, ``samples`` (``(absolute path, label)`` pairs in file order), ``targets`` (the labels) and
    ``num_classes``, the largest label in any of the four list files present, plus one (so every split of one
    folder agrees on it). Every line of the split's list file is checked when the dataset is built, including that
    its image exists; the other list files are checked for their format and labels only.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Optional[Callable] = None) -> None:
        root = os.fspath(root)
        if split not in VTAB1K_SPLITS:
            raise ValueError(f"VTAB1k: split must be one of {', '.join(VTAB1K_SPLITS)}, got {split!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"VTAB1k: {root!r} is not a directory; expected a folder holding images and the list files "
                f"{', '.join(s + '.txt' for s in VTAB1K_SPLITS)}"
            )
        self.root = root
        self.split = split
        self.transform = transform
        self.list_file = os.path.join(root, f"{split}.txt")
        entries = read_list_file(self.list_file, root, check_images=True)
        self.samples = [(os.path.join(root, entry.path), entry.label) for entry in entries]
        self.targets = [entry.label for entry in entries]
        max_label = max(self.targets)
        for other in VTAB1K_SPLITS:
            other_file = os.path.join(root, f"{other}.txt")
            if other != split and os.path.isfile(other_file):
                max_label = max(max_label, max(e.label for e in read_list_file(other_file, root, check_images=False)))
        self.num_classes = max_label + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return f"VTAB1k(root={self.root!r}, split={self.split!r}, samples={len(self)}, num_classes={self.num_classes})"
