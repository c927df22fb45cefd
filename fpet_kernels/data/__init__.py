"""fpet_kernels.data: dataset loaders and the offline pocket-VTAB benchmark suite.

Not imported by ``import fpet_kernels``; use ``from fpet_kernels import data``. Contents:

* :mod:`~fpet_kernels.data.loaders`: :func:`imagefolder` (torchvision's ImageFolder), :class:`VTAB1k` (the
  VTAB-1k list-file layout of PET papers) and :func:`default_transform` (resize to 64x64, ToTensor, normalise
  with mean = std = 0.5).
* :mod:`~fpet_kernels.data.pocket_vtab`: nine small tasks in VTAB's natural / specialized / structured groups,
  generated deterministically on first use into ``$FPET_DATA_DIR`` or ``~/.cache/fpet_kernels/pocket_vtab``
  (:data:`POCKET_VTAB`, :func:`pocket_vtab_dir`, :func:`load_pocket_vtab`); the generators are in
  :mod:`~fpet_kernels.data.natural`, :mod:`~fpet_kernels.data.specialized` and
  :mod:`~fpet_kernels.data.structured`.
* :mod:`~fpet_kernels.data.spec`: :func:`parse_data_spec` for ``pocket-vtab:TASK``, ``vtab1k:DIR`` and
  ``imagefolder:DIR``.
"""
from .loaders import DEFAULT_IMG_SIZE, VTAB1K_SPLITS, VTAB1k, default_transform, imagefolder, read_list_file
from .pocket_vtab import (
    DEFAULT_SIZES,
    FORMAT_VERSION,
    POCKET_VTAB,
    TaskInfo,
    default_root,
    get_task,
    list_tasks,
    load_pocket_vtab,
    pocket_vtab_dir,
)
from .spec import DataSpec, DataSplits, parse_data_spec

__all__ = [
    "DEFAULT_IMG_SIZE",
    "VTAB1K_SPLITS",
    "VTAB1k",
    "default_transform",
    "imagefolder",
    "read_list_file",
    "DEFAULT_SIZES",
    "FORMAT_VERSION",
    "POCKET_VTAB",
    "TaskInfo",
    "default_root",
    "get_task",
    "list_tasks",
    "load_pocket_vtab",
    "pocket_vtab_dir",
    "DataSpec",
    "DataSplits",
    "parse_data_spec",
]
