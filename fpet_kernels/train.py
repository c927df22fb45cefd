"""The fine-tuning workflow behind ``fpet train`` and ``fpet eval``: train a PET (+ FPET) model, evaluate it.

:func:`train` takes a :class:`TrainConfig` and runs one fine-tuning job on CPU:

* **Data**: a data spec (``pocket-vtab:TASK``, ``vtab1k:DIR``, ``imagefolder:DIR``;
  :func:`~fpet_kernels.data.parse_data_spec`), with :func:`~fpet_kernels.data.default_transform` at the model's
  input size. It trains on ``train`` (``train800``) and reports the ``val`` (``val200``) accuracy after every epoch,
  or with ``final=True`` trains on ``trainval`` (``train800val200``) without a val set; the ``test`` accuracy is
  measured once, at the end.
* **Model**: :func:`fpet_kernels.models.create_model` (``pocket-vit`` or a timm ViT, optional local weights) with a
  head for the task's classes, then :func:`~fpet_kernels.add_pet` with the PET method (``linear``: head only), then,
  if ``fpet``, :func:`~fpet_kernels.apply_fpet` (merge block ``layer``, default ``depth // 2``; the refinement
  defaults of ``apply_fpet``). :func:`~fpet_kernels.mark_trainable` freezes everything else: only the PET
  parameters, the FPET refinement adapter and the head train.
* **Recipe** (the FPET paper's, with fewer epochs by default for a CPU): AdamW (lr ``1e-3``, weight decay ``1e-4`` on
  every trainable parameter, torch's default betas and eps), batch size 64, cross-entropy with optional label
  smoothing, and a per-step schedule: linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first
  ``warmup_epochs`` epochs, then a cosine decay towards 0 over the remaining steps (:func:`learning_rate`).
* **Determinism**: ``seed`` seeds torch (``torch.manual_seed``, before the model is built, so a random-init backbone
  and the PET / head initialisation are a function of the seed), numpy and ``random``; the training order comes from
  a DataLoader with ``num_workers=0`` and a ``torch.Generator`` seeded with ``seed``. On CPU with the same thread
  count the same config gives the same ``pet.safetensors``, byte for byte.

**Distributed** (``torchrun``): when ``WORLD_SIZE`` > 1 (``torchrun --nproc_per_node N -m fpet_kernels train ...``)
every process joins the process group (``env://``; gloo, as the engine trains on CPU, NCCL being the backend for
CUDA) and trains the model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (only the trainable
parameters take part; no buffers, no unused parameters). ``batch_size`` stays the *global* batch and must be a
multiple of N (a :class:`ConfigError` otherwise); each rank gets ``batch_size / N`` images of each step. The global
batches are the single-process loader's, in the same order: every rank runs the same seeded ``RandomSampler`` (one
generator for it and the loader's own seed draw, as ``DataLoader(shuffle=True)``) and takes its contiguous part of
each global batch, so no ``DistributedSampler`` / ``set_epoch`` is needed (the generator moves on every epoch on
every rank alike). A short last batch is split unevenly (an empty part is one image with weight 0) and each part's
loss is its summed per-image losses times ``N / global batch``, so DDP's gradient average is the global batch's mean
gradient: without dropout the trained parameters equal the single process's up to float rounding (the all-reduce
adds the parts in another order; ``tests/test_ddp.py``). Dropout (the FPET refinement's ``refine_dropout`` 0.1,
AdaptFormer's 0.1) draws its own masks on each rank (torch seeded with ``seed + rank``), so with dropout the runs
agree in distribution only. Validation and test accuracy are sharded (each rank a contiguous share, the correct /
total counts all-reduced), so all ranks log the same numbers; only rank 0 prints, shows progress bars and writes
``out`` (``config.json``, ``log.jsonl``, ``pet.safetensors`` of the unwrapped model, ``results.json``, whose
``world_size`` is N) and measures throughput and GFLOPs; a ConfigError found by rank 0 while preparing ``out`` or the
data is raised on every rank, and all ranks return rank 0's results, meet at a barrier and leave the process group.
``threads`` is per process (torchrun sets ``OMP_NUM_THREADS=1`` when N > 1, so the default is 1 thread each). The
epoch's ``seconds`` are rank 0's; ``peak_rss_mib`` is the largest process's.

Outputs, in the folder ``out`` (default ``runs/<data>-<model>-<pet>[-fpet]-s<seed>``):

``config.json``
    the :class:`TrainConfig` with resolved values (``out``, ``threads``, ``layer``, ``img_size``), sorted keys.
``log.jsonl``
    one JSON object per epoch, with the keys :data:`LOG_KEYS` (see there).
``pet.safetensors``
    the trained PET parameters and their configuration (:func:`~fpet_kernels.save_pet`); ``fpet eval`` /
    :func:`evaluate` rebuild the model from it.
``results.json``
    the keys :data:`RESULT_KEYS`: accuracies, eval throughput, trainable parameters, GFLOPs per image, times,
    peak memory and the number of processes.

**Peak memory** (:class:`PeakRSS`): the peak resident set size (RSS) of the whole process, in MiB, during an
epoch's training steps, read from ``VmHWM`` in ``/proc/self/status`` after resetting that high-water mark to the
current RSS at the start of the epoch (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0). RSS counts every
byte the process touches: Python, torch, the model's weights, gradients, optimizer state, activations and the data
pipeline, so it is larger than the tensors a method adds, but it is measured the same way for every variant, covers
memory no allocator statistic sees (torch 2.14 has no CPU allocator statistics), and is what the machine must
provide. Memory freed to the allocator but kept by it still counts. Where ``clear_refs`` cannot be written, the
fallback is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak over the process's whole life (not resettable,
so later epochs report at least the earlier peak); ``results.json`` names the method used.

**Throughput** (:func:`eval_throughput`): eval mode, ``torch.inference_mode()``, the first ``batch_size`` test
images as one batch, :func:`fpet_kernels.tools.benchmark.measure_throughput` with the configured thread count
(``throughput_runs`` timed runs after 2 warm-up runs; images per second of the median run).

Mistakes in a config or in :func:`evaluate`'s arguments (a bad value, an unknown data spec or model, a missing
folder or file, a layer out of range, a PET checkpoint for another model) raise :class:`ConfigError` naming the
field, before anything is trained; errors during training are not ConfigErrors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import resource
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import BACKENDS
from .pet import PET_METHODS, add_pet, mark_trainable

__all__ = [
    "TrainConfig",
    "ConfigError",
    "LOG_KEYS",
    "RESULT_KEYS",
    "PeakRSS",
    "learning_rate",
    "accuracy",
    "eval_throughput",
    "fit",
    "train",
    "evaluate",
    "load_trained",
]

LOG_KEYS: Tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_acc",
    "lr",
    "seconds",
    "img_per_s",
    "peak_rss_mib",
    "start_rss_mib",
    "val_seconds",
)
"""Keys of every ``log.jsonl`` line: ``epoch`` (1-based), ``train_loss`` (mean cross-entropy over the epoch's
training images, as trained: train mode, label smoothing included), ``train_acc`` (fraction of them classified
right by the forward that was trained on), ``val_acc`` (fraction of the val set right after the epoch, eval mode;
null with ``final``), ``lr`` (the learning rate of the epoch's last step), ``seconds`` (wall time of the epoch's
training steps, data loading included, validation excluded), ``img_per_s`` (training images / ``seconds``),
``peak_rss_mib`` (peak RSS during the training steps, :class:`PeakRSS`), ``start_rss_mib`` (RSS when the epoch
started), ``val_seconds`` (wall time of the validation pass; 0 with ``final``)."""

RESULT_KEYS: Tuple[str, ...] = (
    "data",
    "model",
    "pet",
    "fpet",
    "final",
    "num_classes",
    "img_size",
    "train_images",
    "val_images",
    "test_images",
    "trainable_params",
    "total_params",
    "epochs",
    "val_acc",
    "test_acc",
    "test_correct",
    "eval_img_per_s",
    "eval_batch",
    "threads",
    "gflops_per_image",
    "train_seconds",
    "seconds_per_epoch",
    "total_seconds",
    "peak_rss_mib",
    "peak_memory_method",
    "merge_backend",
    "machine",
    "world_size",
)
"""Keys of ``results.json``: the run (``data``, ``model``, ``pet``, ``fpet``, ``final``, ``num_classes``,
``img_size``), the split sizes, ``trainable_params`` / ``total_params``, ``epochs``, ``val_acc`` (last epoch's, null
with ``final``), ``test_acc`` (fraction) and ``test_correct`` (count), ``eval_img_per_s`` (throughput, module
docstring) at batch ``eval_batch`` with ``threads`` threads, ``gflops_per_image`` (one eval forward,
``FlopCounterMode``), ``train_seconds`` (all epochs' training steps), ``seconds_per_epoch`` (their mean),
``total_seconds`` (the whole run), ``peak_rss_mib`` (largest epoch peak) and ``peak_memory_method``,
``merge_backend`` (the FPET kernel backend that ran, null without FPET), ``machine`` (CPU, threads, torch),
``world_size`` (the number of training processes: 1, or torchrun's N)."""

_THROUGHPUT_WARMUP = 2


class ConfigError(ValueError):
    """A mistake in the arguments of :func:`train` / :func:`evaluate`: ``field`` names the argument (a
    :class:`TrainConfig` field or an :func:`evaluate` parameter), ``message`` says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass
class TrainConfig:
    """One fine-tuning run (module docstring); every field has the ``fpet train`` flag of the same name
    (``progress``: ``--no-progress`` turns it off; ``fpet``: ``--fpet`` / ``--no-fpet``).

    Attributes:
        data: data spec, ``pocket-vtab:TASK``, ``vtab1k:DIR`` or ``imagefolder:DIR``.
        model: ``pocket-vit`` or a timm VisionTransformer name (:func:`fpet_kernels.models.create_model`).
        checkpoint: local backbone weights for a timm model (None: random init for timm names).
        img_size: input side in pixels (None: the model's default; images are resized to it).
        pet: PET method, a key of :data:`~fpet_kernels.PET_METHODS` (``linear``: head only), default hparams.
        fpet: apply FPET token merging.
        layer: FPET merge block (None: ``depth // 2``).
        refine_dim, refine_bits, refine_scale, refine_dropout: FPET's key refinement adapter
            (:func:`~fpet_kernels.apply_fpet`'s defaults).
        backend: FPET kernel backend (``auto``: the compiled ``cpp`` kernels on CPU if built).
        epochs: training epochs (the default 10 keeps a CPU run short).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_epochs: linear warm-up length in epochs (may be fractional; at most ``epochs``).
        batch_size: training (and evaluation) batch size.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        seed: seeds the model's initialisation, dropout and the data order.
        threads: torch intra-op threads for training and timing (None: torch's current setting).
        out: output folder (None: ``runs/<data>-<model>-<pet>[-fpet]-s<seed>``).
        overwrite: allow an ``out`` that already holds a run's files (they are replaced).
        final: train on train + val (``train800val200``), no validation.
        progress: show tqdm progress bars (on stderr).
        throughput_runs: timed runs of the eval-throughput measurement (0: skip it).
    """

    data: str
    model: str = "pocket-vit"
    checkpoint: Optional[str] = None
    img_size: Optional[int] = None
    pet: str = "lora"
    fpet: bool = True
    layer: Optional[int] = None
    refine_dim: int = 32
    refine_bits: int = 1
    refine_scale: float = 1.0
    refine_dropout: float = 0.1
    backend: str = "auto"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    batch_size: int = 64
    label_smoothing: float = 0.0
    seed: int = 0
    threads: Optional[int] = None
    out: Optional[str] = None
    overwrite: bool = False
    final: bool = False
    progress: bool = True
    throughput_runs: int = 5

    def validate(self) -> None:
        """Check every field's type and range; a bad one is a :class:`ConfigError` naming it."""
        _check_str("data", self.data)
        _check_str("model", self.model)
        _check_optional_str("checkpoint", self.checkpoint)
        _check_optional_int("img_size", self.img_size, 1)
        if self.pet not in PET_METHODS:
            raise ConfigError("pet", f"expected one of {', '.join(PET_METHODS)}, got {self.pet!r}")
        _check_bool("fpet", self.fpet)
        _check_optional_int("layer", self.layer, 0)
        _check_int("refine_dim", self.refine_dim, 0)
        if self.refine_bits not in (1, 32) or isinstance(self.refine_bits, bool):
            raise ConfigError("refine_bits", f"expected 1 or 32, got {self.refine_bits!r}")
        _check_number("refine_scale", self.refine_scale)
        _check_number("refine_dropout", self.refine_dropout, 0.0, 1.0, high_open=True)
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        _check_int("epochs", self.epochs, 1)
        _check_number("lr", self.lr, 0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("warmup_epochs", self.warmup_epochs, 0.0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError("warmup_epochs", f"expected at most epochs ({self.epochs}), got {self.warmup_epochs!r}")
        _check_int("batch_size", self.batch_size, 1)
        _check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_int("seed", self.seed, 0)
        _check_optional_int("threads", self.threads, 1)
        _check_optional_str("out", self.out)
        for name in ("overwrite", "final", "progress"):
            _check_bool(name, getattr(self, name))
        _check_int("throughput_runs", self.throughput_runs, 0)


# ---------------------------------------------------------------------------------------------- argument checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(name, f"expected an int >= {minimum}, got {value!r}")


def _check_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        _check_int(name, value, minimum)


def _check_number(
    name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
    low_open: bool = False, high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        wanted = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
        raise ConfigError(name, f"expected {wanted}, got {value!r}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"expected a non-empty string, got {value!r}")


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None:
        _check_str(name, value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"expected True or False, got {value!r}")


# ---------------------------------------------------------------------------------------------- measurements
class PeakRSS:
    """Peak resident set size of this process since the last :meth:`reset`, in MiB (module docstring).

    ``method`` is ``"VmHWM after clear_refs"`` where ``/proc/self/clear_refs`` can be written (Linux >= 4.0), else
    ``"ru_maxrss (process lifetime)"``, whose peak cannot be reset."""

    _STATUS = "/proc/self/status"
    _CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs" if self._try_reset() else "ru_maxrss (process lifetime)"

    def _try_reset(self) -> bool:
        try:
            with open(self._CLEAR_REFS, "w") as handle:
                handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            return self._status_kib("VmHWM") is not None
        except OSError:
            return False

    def _status_kib(self, key: str) -> Optional[int]:
        try:
            with open(self._STATUS) as handle:
                match = re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE)
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def reset(self) -> None:
        """Start a new measurement window (a no-op for the ru_maxrss fallback)."""
        if self.method.startswith("VmHWM"):
            self._try_reset()

    def current_mib(self) -> Optional[float]:
        """The current RSS in MiB (None where ``/proc/self/status`` cannot be read)."""
        kib = self._status_kib("VmRSS")
        return None if kib is None else kib / 1024

    def peak_mib(self) -> float:
        """The peak RSS in MiB since :meth:`reset` (fallback: over the process's life)."""
        kib = self._status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if kib is None:
            # ru_maxrss is in KiB on Linux, in bytes on macOS
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
        return kib / 1024


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: linear warm-up
    ``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine from ``peak`` towards 0:
    ``peak * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def _loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
    """The training / evaluation DataLoader: ``num_workers=0``, shuffled by a ``torch.Generator`` seeded with ``seed``.

    With ``world_size > 1`` it is rank ``rank``'s part of the same loader (module docstring, "Distributed"): the
    single-process loader's global batches of ``batch_size``, in the same order, each split into contiguous parts
    (:class:`_GlobalBatchParts`); its batches are ``(images, labels, weights, global_counts)``."""
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if world_size == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)
    # One generator for the loader's base-seed draw and the sampler's permutation, as DataLoader(shuffle=True) does:
    # every rank draws exactly what the single process draws, epoch after epoch.
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        _WeightedItems(dataset), batch_sampler=_GlobalBatchParts(sampler, batch_size, rank, world_size),
        num_workers=0, generator=generator,
    )


class _GlobalBatchParts:
    """Batch sampler: the batches ``BatchSampler(sampler, batch_size, drop_last=False)`` would make (the global
    batches), each cut into ``world_size`` contiguous parts, of which it yields part ``rank``, as
    ``(index, weight, global_count)`` keys of :class:`_WeightedItems`. Part ``r`` of a global batch of ``n`` is
    ``[r * n // world_size, (r + 1) * n // world_size)``; an empty part (``n < world_size``, a short last batch) is
    the batch's first index with weight 0, so that every rank runs every step (DDP's collectives stay in step)."""

    def __init__(self, sampler, batch_size: int, rank: int, world_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        batch: List[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._part(batch)
                batch = []
        if batch:
            yield self._part(batch)

    def _part(self, batch: List[int]) -> List[Tuple[int, float, int]]:
        n = len(batch)
        low, high = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        if low == high:
            return [(batch[0], 0.0, n)]
        return [(index, 1.0, n) for index in batch[low:high]]


class _WeightedItems:
    """``dataset[index]`` as ``(image, label, weight, global_count)`` for the keys of :class:`_GlobalBatchParts`."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, float, int]):
        index, weight, count = key
        image, label = self.dataset[index]
        return image, label, weight, count


def _shard(dataset, rank: int, world_size: int):
    """Rank ``rank``'s contiguous share of an evaluation set, ``[rank * n // world_size, (rank + 1) * n //
    world_size)``: every image is in exactly one share (no padding, so the summed counts are exact)."""
    if world_size == 1:
        return dataset
    from torch.utils.data import Subset

    n = len(dataset)
    return Subset(dataset, range(rank * n // world_size, (rank + 1) * n // world_size))


def _bar(iterable, progress: bool, desc: str, total: Optional[int] = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False, unit="batch", file=sys.stderr)


def accuracy(model: nn.Module, loader, *, progress: bool = False, desc: str = "eval") -> Tuple[int, int]:
    """``(correct, total)`` of ``model`` (put in eval mode, ``torch.inference_mode()``) over ``loader``'s
    ``(images, labels)`` batches; the prediction is the argmax of the logits (lowest index on a tie)."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in _bar(loader, progress, desc):
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    return correct, total


def _first_images(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def eval_throughput(model: nn.Module, images: torch.Tensor, *, threads: int, runs: int) -> Optional[float]:
    """Eval images per second of ``model`` on the batch ``images`` (module docstring: inference mode,
    :func:`~fpet_kernels.tools.benchmark.measure_throughput` with ``threads`` threads, ``runs`` timed runs after 2
    warm-up runs, the median); None for ``runs == 0``."""
    from .tools import benchmark

    if runs == 0:
        return None
    model.eval()
    times = benchmark.measure_throughput(
        {"model": model}, images, runs=runs, warmup=_THROUGHPUT_WARMUP, threads=threads
    )["model"]
    return images.shape[0] / benchmark.median(times)


# ---------------------------------------------------------------------------------------------- building
def _parse_data(field: str, spec: str):
    """The :class:`~fpet_kernels.data.DataSpec` of ``spec``, checked far enough to know its class count."""
    from .data import parse_data_spec

    try:
        parsed = parse_data_spec(spec)
        parsed.num_classes  # reads the class folders / list files: a broken data set fails here
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(field, str(error)) from None
    return parsed


def _build_backbone(
    name: str, num_classes: int, checkpoint: Optional[str], img_size, seed: int
) -> nn.Module:
    """``create_model`` right after ``torch.manual_seed(seed)``: a random-init backbone depends on the seed only."""
    from .models import create_model

    torch.manual_seed(seed)
    try:
        return create_model(name, num_classes, checkpoint=checkpoint, img_size=img_size)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        field = ("checkpoint" if checkpoint is not None and checkpoint in str(error)
                 else "img_size" if "input sides (img_size)" in str(error) else "model")
        raise ConfigError(field, str(error)) from None


def _square_side(model: nn.Module, field: str) -> int:
    from .vit import find_vision_transformer

    size = tuple(int(s) for s in find_vision_transformer(model).patch_embed.img_size)
    if size[0] != size[1]:
        raise ConfigError(field, f"the data pipeline makes square images, but the model takes {size[0]}x{size[1]}")
    return size[0]


def _datasets(spec, split_names: List[str], side: int, field: str, progress: bool) -> Dict[str, Any]:
    """The datasets of ``split_names`` with the default transform at ``side``; a pocket-VTAB task is generated
    first if it is not cached (with a progress bar if ``progress``)."""
    from .data import default_transform, pocket_vtab_dir

    transform = default_transform(side)
    datasets = {}
    if spec.kind == "pocket-vtab":
        try:
            pocket_vtab_dir(spec.target, root=spec.root, seed=spec.seed, sizes=spec.sizes, progress=progress)
        except (ValueError, OSError) as error:
            raise ConfigError(field, str(error)) from None
    for split in split_names:
        try:
            datasets[split] = spec.dataset(split, transform)
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            raise ConfigError(field, str(error)) from None
        if datasets[split] is not None and len(datasets[split]) == 0:
            raise ConfigError(field, f"{spec}: the {split} split holds no images")
    return datasets


def _default_out(config: TrainConfig, spec) -> str:
    target = spec.target if spec.kind == "pocket-vtab" else os.path.basename(os.path.normpath(spec.target))
    name = f"{target}-{config.model}-{config.pet}{'-fpet' if config.fpet else ''}-s{config.seed}"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.-]+", "_", name))


_RUN_FILES = ("config.json", "log.jsonl", "pet.safetensors", "results.json")


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("out", f"{out!r} exists and is not a directory")
    existing = [name for name in _RUN_FILES if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        raise ConfigError(
            "out", f"{out!r} already holds a run ({', '.join(existing)}); pass overwrite (--overwrite) or another out"
        )
    os.makedirs(out, exist_ok=True)
    for name in existing:
        os.remove(os.path.join(out, name))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _merge_backend(model: nn.Module) -> Optional[str]:
    from .backends import resolve_backend
    from .vit_patch import get_fpet_patch

    patch = get_fpet_patch(model)
    if patch is None:
        return None
    return resolve_backend(patch.vit.blocks[patch.layer].token_merger.backend, torch.device("cpu")).name


class _Threads:
    """``torch.set_num_threads(threads)`` inside the block, the previous setting restored after it."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)


# ---------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True)
class _World:
    """The process's place in a ``torchrun`` job: ``size`` processes, this one ``rank`` (``local_rank`` on its
    machine); ``owns_group``: :func:`train` created the process group (and destroys it)."""

    size: int
    rank: int
    local_rank: int
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _torchrun_world() -> Optional[_World]:
    """The :class:`_World` that ``torchrun`` describes in ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; None for a
    single process (no ``WORLD_SIZE``, or 1)."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise RuntimeError(f"fpet train: environment variable {name}={text!r} is not an integer") from None
    if values["WORLD_SIZE"] <= 1:
        return None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise RuntimeError(f"fpet train: RANK={values['RANK']} is outside [0, WORLD_SIZE={values['WORLD_SIZE']})")
    return _World(values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"])


def _dist_backend(device: torch.device) -> str:
    """The process-group backend for training on ``device``: NCCL for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def _init_distributed(world: _World, device: torch.device) -> _World:
    """Join the ``torchrun`` process group (``env://``: ``MASTER_ADDR`` / ``MASTER_PORT`` from torchrun), or use the
    caller's if one is initialised already (it must have ``world.size`` ranks)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_world_size(), dist.get_rank()) != (world.size, world.rank):
            raise RuntimeError(
                f"fpet train: the initialised process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"the environment says rank {world.rank} of {world.size}"
            )
        return world
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=_dist_backend(device))
    return dataclasses.replace(world, owns_group=True)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: List[float], op: str = "sum") -> List[float]:
    """``values`` summed (``op="sum"``) or maximised (``"max"``) over the ranks, in float64."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=_collective_device())
    return holder[0]


def _rank0_first(world: Optional[_World], step: Callable[[], Any], *, everywhere: bool) -> Any:
    """Run ``step`` on rank 0 and then (``everywhere``) on the other ranks, or only on rank 0 (returning None on
    the others): for work that must happen once (writing ``out``, generating a cached data set). A
    :class:`ConfigError` of rank 0's ``step`` is raised on every rank (any other error of rank 0: a RuntimeError on
    the others), so that no rank waits for one that gave up. Without ``world``: just ``step()``."""
    if world is None:
        return step()
    result, error = None, None
    if world.is_main:
        try:
            result = step()
        except BaseException as caught:
            error = caught
    if isinstance(error, ConfigError):
        shared = ("config", error.field, error.message)
    else:
        shared = None if error is None else ("other", f"{type(error).__name__}: {error}")
    shared = _broadcast(shared)
    if error is not None:
        raise error
    if shared is not None:
        if shared[0] == "config":
            raise ConfigError(shared[1], shared[2])
        raise RuntimeError(f"fpet train: rank 0 failed: {shared[1]}")
    if everywhere and not world.is_main:
        result = step()
    return result


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper (else ``model``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _shared_accuracy(model: nn.Module, loader, distributed: bool, **kwargs: Any) -> Tuple[int, int]:
    """:func:`accuracy` of the unwrapped ``model`` on this rank's ``loader``, summed over the ranks if
    ``distributed`` (one all-reduce, made by every rank, whatever its share)."""
    correct, total = accuracy(_unwrap(model), loader, **kwargs)
    if distributed:
        correct, total = (int(round(v)) for v in _all_reduce([correct, total]))
    return correct, total


def _quiet(line: str) -> None:
    """The ``log`` of ranks other than 0."""


# ---------------------------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    train_loader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    val_loader=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    log_path: Optional[str] = None,
    desc: str = "epoch",
) -> Tuple[List[Dict[str, Any]], "PeakRSS"]:
    """The training loop of :func:`train` (module docstring, "Recipe"): AdamW over the parameters that require grad,
    the warm-up + cosine schedule per step (:func:`learning_rate`), cross-entropy; after each epoch the ``val_loader``
    accuracy (if given), one ``log`` line, and a line in ``log_path`` (if given) with the keys :data:`LOG_KEYS`.
    Runs with the current thread setting. Returns the epochs' log entries and the :class:`PeakRSS` used.

    A :class:`~torch.nn.parallel.DistributedDataParallel` ``model`` trains data-parallel (module docstring,
    "Distributed"): ``train_loader`` is this rank's part of the global batches (``_loader`` with ``world_size``),
    the loss of each part is its per-image losses summed and scaled by ``world_size / global batch size``, so that
    DDP's gradient average is the gradient of the global batch's mean loss (exact for unequal parts too); the
    epoch's loss, accuracy and image count are summed over the ranks, the peak RSS is the largest rank's, and the
    ``val_loader`` (this rank's share) accuracy is summed over the ranks (every rank gets the same log entries;
    pass ``log`` / ``log_path`` / ``progress`` on rank 0 only)."""
    from torch.nn.parallel import DistributedDataParallel

    distributed = isinstance(model, DistributedDataParallel)
    world_size = torch.distributed.get_world_size() if distributed else 1
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: no parameter of the model requires grad (call mark_trainable first)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
    memory = PeakRSS()
    epoch_logs: List[Dict[str, Any]] = []
    step = 0
    rate = lr
    for epoch in range(1, epochs + 1):
        model.train()
        memory.reset()
        start_rss = memory.current_mib()
        loss_sum = 0.0
        correct = seen = 0
        epoch_start = time.perf_counter()
        bar = _bar(train_loader, progress, f"{desc} {epoch}/{epochs}", total=steps_per_epoch)
        for batch in bar:
            images, labels = batch[0], batch[1]
            rate = learning_rate(step, total_steps, warmup_steps, lr)
            for group in optimizer.param_groups:
                group["lr"] = rate
            logits = model(images)
            if distributed:
                weights, counts = batch[2], batch[3]
                losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
                weights = weights.to(losses.dtype)
                loss = (losses * weights).sum() * (world_size / int(counts[0]))
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if distributed:
                real = weights > 0
                loss_sum += float((losses.detach() * weights).sum())
                correct += int((logits.detach().argmax(dim=1) == labels)[real].sum())
                seen += int(real.sum())
            else:
                loss_sum += float(loss.detach()) * labels.numel()
                correct += int((logits.detach().argmax(dim=1) == labels).sum())
                seen += int(labels.numel())
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", lr=f"{rate:.2e}", refresh=False)
        seconds = time.perf_counter() - epoch_start
        peak = memory.peak_mib()
        if distributed:
            loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen])
            correct, seen = int(round(correct)), int(round(seen))
            peak, start_rss = _all_reduce([peak, start_rss], op="max")
        val_acc = None
        val_seconds = 0.0
        if val_loader is not None:
            val_start = time.perf_counter()
            val_correct, val_total = _shared_accuracy(model, val_loader, distributed, progress=progress, desc="val")
            val_seconds = time.perf_counter() - val_start
            val_acc = val_correct / val_total
        entry = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_acc": val_acc,
            "lr": rate,
            "seconds": seconds,
            "img_per_s": seen / seconds,
            "peak_rss_mib": peak,
            "start_rss_mib": start_rss,
            "val_seconds": val_seconds,
        }
        epoch_logs.append(entry)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
        val_text = "" if val_acc is None else f", val acc {100 * val_acc:.2f}%"
        log(
            f"{desc} {epoch}/{epochs}: train loss {entry['train_loss']:.4f}, train acc "
            f"{100 * entry['train_acc']:.2f}%{val_text}, lr {rate:.2e}, {seconds:.1f} s ({entry['img_per_s']:.1f} "
            f"img/s), peak RSS {peak:.0f} MiB"
        )

    return epoch_logs, memory


# ---------------------------------------------------------------------------------------------- train
def train(config: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the fine-tuning job ``config`` (module docstring) and return the ``results.json`` object.

    ``log`` receives one-line progress reports (the trainable-parameter count, one summary per epoch, the final
    accuracies). Raises :class:`ConfigError` for a bad config, before any training step.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls it; they train data-parallel (module docstring,
    "Distributed"), only rank 0 logs and writes files, and every rank returns rank 0's results."""
    started = time.perf_counter()
    config.validate()
    world = _torchrun_world()
    if world is None:
        return _train(config, log, None, started)
    if config.batch_size % world.size:
        raise ConfigError(
            "batch_size", f"the global batch size must be a multiple of the number of processes ({world.size}) "
                          f"to split it evenly, got {config.batch_size}"
        )
    world = _init_distributed(world, torch.device("cpu"))  # the engine trains on CPU: gloo
    try:
        results = _train(config, log if world.is_main else _quiet, world, started)
        torch.distributed.barrier()
    finally:
        if world.owns_group:
            torch.distributed.destroy_process_group()
    return results


def _train(config: TrainConfig, log: Callable[[str], None], world: Optional[_World], started: float
           ) -> Dict[str, Any]:
    """The body of :func:`train`; ``world`` None for one process."""
    from .checkpoint import save_pet
    from .tools import benchmark
    from .vit import find_vision_transformer
    from .vit_patch import apply_fpet

    main = world is None or world.is_main
    rank, world_size = (0, 1) if world is None else (world.rank, world.size)
    progress = config.progress and main
    threads = config.threads if config.threads is not None else torch.get_num_threads()
    spec = _parse_data("data", config.data)
    num_classes = spec.num_classes
    model = _build_backbone(config.model, num_classes, config.checkpoint, config.img_size, config.seed)
    side = _square_side(model, "img_size")
    vit = find_vision_transformer(model)
    depth = len(vit.blocks)
    layer = depth // 2 if config.layer is None else config.layer
    if config.fpet and not 0 <= layer < depth:
        raise ConfigError("layer", f"expected a merge block in [0, {depth}) for {config.model} ({depth} blocks), "
                                   f"got {layer}")
    try:
        add_pet(model, config.pet)
        if config.fpet:
            apply_fpet(
                model, layer, refine_dim=config.refine_dim, refine_bits=config.refine_bits,
                refine_scale=config.refine_scale, refine_dropout=config.refine_dropout, backend=config.backend,
            )
    except ValueError as error:
        raise ConfigError("fpet" if config.fpet else "pet", str(error)) from None
    trainable = mark_trainable(model)
    total_params = sum(p.numel() for p in model.parameters())
    train_split = "trainval" if config.final else "train"
    split_names = [train_split] + ([] if config.final else ["val"]) + ["test"]
    splits = _rank0_first(world, lambda: _datasets(spec, split_names, side, "data", progress), everywhere=True)
    if not config.final and splits["val"] is None:
        raise ConfigError("data", f"{spec} has no val split (DIR/val); train with final (--final) instead")
    out = config.out if config.out is not None else _default_out(config, spec)
    resolved = dataclasses.replace(config, out=out, threads=threads, layer=layer if config.fpet else config.layer,
                                   img_size=side)

    def prepare_out() -> None:
        _prepare_out(out, config.overwrite)
        _write_json(os.path.join(out, "config.json"), dataclasses.asdict(resolved))

    _rank0_first(world, prepare_out, everywhere=False)

    random.seed(config.seed)
    try:
        import numpy as np

        np.random.seed(config.seed)
    except ImportError:  # pragma: no cover - numpy ships with torch's requirements here
        pass
    torch.manual_seed(config.seed + rank)  # dropout: each rank draws its own masks
    train_loader = _loader(splits[train_split], config.batch_size, shuffle=True, seed=config.seed, rank=rank,
                           world_size=world_size)
    part = config.batch_size // world_size
    val_loader = None if config.final else _loader(_shard(splits["val"], rank, world_size), part, shuffle=False)
    test_loader = _loader(_shard(splits["test"], rank, world_size), part, shuffle=False)
    trained = model
    if world is not None:
        from torch.nn.parallel import DistributedDataParallel

        # Every trainable parameter gets a gradient in every forward (PET, the FPET refinement adapter, the head):
        # no find_unused_parameters; the frozen backbone takes no part in the gradient all-reduce.
        trained = DistributedDataParallel(model)
    log(
        f"{config.model} + {config.pet}{' + FPET (merge block ' + str(layer) + ')' if config.fpet else ''} on "
        f"{spec} ({num_classes} classes, {len(splits[train_split])} {train_split} images, {side}x{side}); "
        f"trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.2f}%)"
    )
    with _Threads(threads):
        epoch_logs, memory = fit(
            trained, train_loader, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
            warmup_epochs=config.warmup_epochs, label_smoothing=config.label_smoothing, val_loader=val_loader,
            progress=progress, log=log, log_path=os.path.join(out, "log.jsonl") if main else None,
        )
        test_correct, test_total = _shared_accuracy(model, test_loader, world is not None, progress=progress,
                                                    desc="test")

    def finish() -> Dict[str, Any]:
        """Rank 0's part: the checkpoint, throughput, GFLOPs and ``results.json``."""
        save_pet(model, os.path.join(out, "pet.safetensors"))
        images = _first_images(splits["test"], config.batch_size)
        rate = eval_throughput(model, images, threads=threads, runs=config.throughput_runs)
        gflops = benchmark.count_gflops(model.eval(), images[:1])
        train_seconds = sum(e["seconds"] for e in epoch_logs)
        results = {
            "data": str(spec),
            "model": config.model,
            "pet": config.pet,
            "fpet": config.fpet,
            "final": config.final,
            "num_classes": num_classes,
            "img_size": side,
            "train_images": len(splits[train_split]),
            "val_images": None if config.final else len(splits["val"]),
            "test_images": test_total,
            "trainable_params": trainable,
            "total_params": total_params,
            "epochs": config.epochs,
            "val_acc": epoch_logs[-1]["val_acc"],
            "test_acc": test_correct / test_total,
            "test_correct": test_correct,
            "eval_img_per_s": rate,
            "eval_batch": int(images.shape[0]),
            "threads": threads,
            "gflops_per_image": gflops,
            "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / len(epoch_logs),
            "total_seconds": time.perf_counter() - started,
            "peak_rss_mib": max(e["peak_rss_mib"] for e in epoch_logs),
            "peak_memory_method": memory.method,
            "merge_backend": _merge_backend(model),
            "machine": benchmark.machine_description(threads),
            "world_size": world_size,
        }
        _write_json(os.path.join(out, "results.json"), results)
        rate_text = "" if rate is None else f", eval {rate:.1f} img/s"
        log(
            f"test acc {100 * results['test_acc']:.2f}% ({test_correct}/{test_total}){rate_text}, "
            f"{gflops:.4f} GFLOPs/img; wrote {out}/"
        )
        return results

    if world is None:
        return finish()
    results: Any = None
    if main:
        try:
            results = finish()
        except BaseException as error:
            _broadcast(("failed", f"{type(error).__name__}: {error}"))  # the other ranks wait for the results
            raise
    results = _broadcast(results)
    if isinstance(results, tuple):
        raise RuntimeError(f"fpet train: rank 0 failed after training: {results[1]}")
    return results


# ---------------------------------------------------------------------------------------------- evaluate
def _read_meta(pet_checkpoint: str) -> Dict[str, Any]:
    from .checkpoint import read_pet_checkpoint

    try:
        return read_pet_checkpoint(pet_checkpoint)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError("pet_checkpoint", str(error)) from None


def load_trained(
    pet_checkpoint: str, *, model: str = "pocket-vit", checkpoint: Optional[str] = None, seed: int = 0,
    backend: Optional[str] = None,
) -> nn.Module:
    """The model a PET checkpoint was trained as, in eval mode: the backbone ``model`` (+ ``checkpoint``) built by
    :func:`fpet_kernels.models.create_model` after ``torch.manual_seed(seed)`` (so a random-init timm backbone equals
    the one trained with that seed), with the class count and input size stored in the checkpoint, then
    :func:`~fpet_kernels.load_pet` (which checks the architecture and a SHA-256 of the backbone weights).
    ``backend`` replaces the stored FPET kernel backend. Raises :class:`ConfigError` when it does not fit."""
    from .checkpoint import load_pet

    stored = _read_meta(pet_checkpoint)["backbone"]
    img_size = stored.get("img_size")
    net = _build_backbone(model, int(stored["num_classes"]), checkpoint,
                          None if img_size is None else list(img_size), seed)
    try:
        load_pet(net, pet_checkpoint, backend=backend)
    except ValueError as error:
        message = str(error).replace(". Pass check_backbone=False to load anyway", "")  # an API hint, not ours
        raise ConfigError(
            "pet_checkpoint",
            f"{message} (it must be loaded onto the backbone it was trained on: the same model, checkpoint and, for "
            f"random initialisation, seed)",
        ) from None
    return net.eval()


def evaluate(
    pet_checkpoint: str,
    data: str,
    *,
    model: str = "pocket-vit",
    checkpoint: Optional[str] = None,
    split: str = "test",
    batch_size: int = 64,
    seed: int = 0,
    threads: Optional[int] = None,
    backend: Optional[str] = None,
    throughput_runs: int = 5,
    progress: bool = True,
) -> Dict[str, Any]:
    """Accuracy and eval throughput of a trained PET checkpoint on one split of a data set.

    The backbone ``model`` (+ ``checkpoint``) is built by :func:`fpet_kernels.models.create_model` after
    ``torch.manual_seed(seed)`` (so a random-init timm backbone equals the one trained with that seed), with the
    class count and input size stored in the PET checkpoint (:func:`~fpet_kernels.read_pet_checkpoint`); then
    :func:`~fpet_kernels.load_pet` rebuilds the PET / FPET model on it (checking the architecture and a SHA-256 of
    the backbone weights) and ``split`` (``train``, ``val``, ``trainval`` or ``test``) of ``data`` is classified
    (:func:`accuracy`). ``backend`` replaces the stored FPET kernel backend. Throughput as in :func:`train`.

    Returns ``{"split", "accuracy", "correct", "total", "eval_img_per_s", "eval_batch", "threads",
    "gflops_per_image", "pet", "fpet", "merge_backend"}``. Raises :class:`ConfigError` for bad arguments, a data set
    with another class count, or a checkpoint that does not fit the backbone."""
    from .data.spec import SPLITS
    from .tools import benchmark

    _check_str("pet_checkpoint", pet_checkpoint)
    _check_str("data", data)
    _check_str("model", model)
    _check_optional_str("checkpoint", checkpoint)
    if split not in SPLITS:
        raise ConfigError("split", f"expected one of {', '.join(SPLITS)}, got {split!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_optional_int("threads", threads, 1)
    if backend is not None and backend not in BACKENDS:
        raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    _check_int("throughput_runs", throughput_runs, 0)
    threads = threads if threads is not None else torch.get_num_threads()
    meta = _read_meta(pet_checkpoint)
    spec = _parse_data("data", data)
    num_classes = int(meta["backbone"]["num_classes"])
    if spec.num_classes != num_classes:
        raise ConfigError(
            "data", f"{spec} has {spec.num_classes} classes, but {pet_checkpoint} was trained for {num_classes}"
        )
    net = load_trained(pet_checkpoint, model=model, checkpoint=checkpoint, seed=seed, backend=backend)
    side = _square_side(net, "model")
    dataset = _datasets(spec, [split], side, "data", progress)[split]
    if dataset is None:
        raise ConfigError("split", f"{spec} has no {split} split")
    with _Threads(threads):
        correct, total = accuracy(net, _loader(dataset, batch_size, shuffle=False), progress=progress, desc=split)
    images = _first_images(dataset, batch_size)
    rate = eval_throughput(net, images, threads=threads, runs=throughput_runs)
    return {
        "split": split,
        "accuracy": correct / total,
        "correct": correct,
        "total": total,
        "eval_img_per_s": rate,
        "eval_batch": int(images.shape[0]),
        "threads": threads,
        "gflops_per_image": benchmark.count_gflops(net.eval(), images[:1]),
        "pet": [record["method"] for record in meta["pet"]],
        "fpet": meta["fpet"] is not None,
        "merge_backend": _merge_backend(net),
    }
