"""Data specs for command lines: ``pocket-vtab:TASK``, ``vtab1k:DIR``, ``imagefolder:DIR``.

:func:`parse_data_spec` turns such a string into a :class:`DataSpec`, which builds the train / val / test datasets
and knows the number of classes:

* ``pocket-vtab:TASK``: a pocket-VTAB task (generated on first use, :mod:`fpet_kernels.data.pocket_vtab`);
  train = ``train800``, val = ``val200``, trainval = ``train800val200``, test = ``test``.
* ``vtab1k:DIR``: a folder in the VTAB-1k layout (:mod:`fpet_kernels.data.loaders`), the same split mapping.
* ``imagefolder:DIR``: ``DIR/train``, ``DIR/val`` (optional) and ``DIR/test``, each a torchvision ImageFolder tree
  (``<split>/<class name>/<image>``). All present splits must have the same class folders (a test tree lacking
  a class would shift the labels, so it is an error). trainval = train + val (train alone without ``DIR/val``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from torch.utils.data import ConcatDataset, Dataset

from .loaders import DEFAULT_IMG_SIZE, VTAB1k, default_transform, imagefolder
from .pocket_vtab import get_task, pocket_vtab_dir

SPEC_FORMS = ("pocket-vtab:TASK", "vtab1k:DIR", "imagefolder:DIR")
SPLITS = ("train", "val", "trainval", "test")
_VTAB_SPLIT = {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"}


@dataclass(frozen=True)
class DataSplits:
    """The datasets of one spec: ``train``, ``val`` (None where the source has none), ``test``, ``num_classes``."""

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec (module docstring): ``kind`` is ``pocket-vtab``, ``vtab1k`` or ``imagefolder``,
    ``target`` the task name or directory; ``root``, ``seed`` and ``sizes`` (train800, val200, test image counts;
    None for the default) apply to pocket-VTAB only (:func:`~fpet_kernels.data.pocket_vtab.pocket_vtab_dir`)."""

    kind: str
    target: str
    root: Optional[str] = None
    seed: int = 0
    sizes: Optional[tuple[int, int, int]] = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    def _directory(self) -> str:
        if self.kind == "pocket-vtab":
            return pocket_vtab_dir(self.target, root=self.root, seed=self.seed, sizes=self.sizes)
        return self.target

    def _imagefolder_split(self, name: str, transform) -> Optional[Dataset]:
        """``imagefolder(DIR/name)`` (None for a missing ``DIR/val``), checked to have train's class folders."""
        path = os.path.join(self.target, name)
        if name == "val" and not os.path.isdir(path):
            return None
        dataset = imagefolder(path, transform)
        if name != "train":
            train_classes = self._train_classes()
            if dataset.classes != train_classes:
                raise ValueError(
                    f"imagefolder:{self.target}: {path!r} has class folders {dataset.classes}, but "
                    f"{os.path.join(self.target, 'train')!r} has {train_classes}; every split must have the same "
                    f"class folders (else the labels would not match)"
                )
        return dataset

    def _train_classes(self) -> list[str]:
        from torchvision.datasets.folder import find_classes

        path = os.path.join(self.target, "train")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"imagefolder:{self.target}: {path!r} is not a directory; expected DIR/train/<class>/<image>"
            )
        try:
            return find_classes(path)[0]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"imagefolder:{self.target}: {path!r} holds no class folders; expected DIR/train/<class>/<image>"
            ) from None

    def dataset(self, split: str, transform: Optional[Callable] = None, img_size: int = DEFAULT_IMG_SIZE):
        """The dataset of ``split`` (``train``, ``val``, ``trainval`` or ``test``), with ``transform`` or, if None,
        :func:`~fpet_kernels.data.loaders.default_transform` of ``img_size``. ``val`` is None for an imagefolder
        without ``DIR/val``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if transform is None:
            transform = default_transform(img_size)
        if self.kind in ("pocket-vtab", "vtab1k"):
            return VTAB1k(self._directory(), _VTAB_SPLIT[split], transform)
        if split == "trainval":
            train, val = self._imagefolder_split("train", transform), self._imagefolder_split("val", transform)
            return train if val is None else ConcatDataset([train, val])
        return self._imagefolder_split(split, transform)

    def datasets(
        self, transform: Optional[Callable] = None, img_size: int = DEFAULT_IMG_SIZE, final: bool = False
    ) -> DataSplits:
        """Train, val and test datasets and the class count. ``final=True`` trains on train + val (the VTAB-1k
        protocol's final run: ``train800val200``) and returns no val set."""
        if transform is None:
            transform = default_transform(img_size)
        train = self.dataset("trainval" if final else "train", transform)
        val = None if final else self.dataset("val", transform)
        test = self.dataset("test", transform)
        return DataSplits(train, val, test, self.num_classes)

    @property
    def num_classes(self) -> int:
        """The number of classes (pocket-VTAB: from the task table, without generating anything)."""
        if self.kind == "pocket-vtab":
            return get_task(self.target).num_classes
        if self.kind == "vtab1k":
            return VTAB1k(self.target, "test").num_classes
        return len(self._train_classes())


def parse_data_spec(
    spec: str, *, root: Optional[str] = None, seed: int = 0, sizes: Optional[tuple[int, int, int]] = None
) -> DataSpec:
    """Parses ``pocket-vtab:TASK``, ``vtab1k:DIR`` or ``imagefolder:DIR`` (module docstring) into a DataSpec.

    An unknown form is a ValueError naming the accepted ones; an unknown pocket-VTAB task one listing the tasks;
    a missing DIR a FileNotFoundError naming it. ``root``, ``seed`` and ``sizes`` are passed to pocket-VTAB.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"data spec must be one of {', '.join(SPEC_FORMS)}, got {spec!r}")
    kind, target = spec.split(":", 1)
    if kind not in ("pocket-vtab", "vtab1k", "imagefolder") or not target:
        raise ValueError(f"data spec must be one of {', '.join(SPEC_FORMS)}, got {spec!r}")
    if kind == "pocket-vtab":
        get_task(target)
        return DataSpec(kind, target, root=root, seed=seed, sizes=None if sizes is None else tuple(sizes))
    target = os.path.expanduser(target)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"data spec {spec!r}: {target!r} is not a directory")
    return DataSpec(kind, target)
