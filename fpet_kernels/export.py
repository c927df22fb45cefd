"""ONNX export of timm ViTs with PET and FPET (docs/design.md §11), checked in onnxruntime.

:func:`export_onnx` exports a deep copy of the model in eval mode, so the model itself is left as it is:

* LoRA is folded into the qkv weights (:func:`fpet_kernels.fold_pet`, ``strict=False``); AdaptFormer and VPT stay as
  modules, which export as they are;
* the FPET merge runs through the pure-PyTorch reference ops on their no-grad path, an ONNX-friendly graph: cosine
  scores (``MatMul``), ``ArgMax``, ``ScatterElements(reduction="add")`` of the size-weighted tokens and of the sizes,
  one ``Div``; no custom op and no ``scatter_reduce`` mean. The cpp / cuda / triton kernels compute the same values;
* attention runs timm's non-fused path (``fused_attn = False``: ``q @ k^T``, ``+ attn_mask``, softmax, ``@ v``), the
  same math SDPA does and what ONNX runs anyway; proportional attention's ``log(size)`` mask is an ``Add``.

The exporter is torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript), with a dynamic batch
dimension by default. The export is checked in onnxruntime against the PyTorch model (under ``torch.no_grad``) on
random images at batch sizes other than the one traced. :func:`onnx_gflops` counts the matrix-multiply FLOPs of an
exported graph and :func:`time_onnx` times exported files in onnxruntime, alternately.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import os
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .vit import find_vision_transformer

__all__ = ["OnnxExport", "export_onnx", "onnx_gflops", "time_onnx", "onnx_session"]

PathLike = Union[str, "os.PathLike[str]"]
_INSTALL = "pip install onnx onnxruntime onnxscript (the versions of requirements.txt)"


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and checked.

    ``path`` the .onnx file; ``opset``; ``dynamic_batch``; ``input_shape`` of the traced example ``(B, 3, H, W)``;
    ``folded`` the PET methods folded into the weights; ``fpet`` whether the graph merges tokens (its merge block);
    ``checked_batches`` the batch sizes run in onnxruntime, ``max_abs_diff`` the largest difference of its outputs
    from PyTorch's there (None when not checked), within ``atol + rtol * |PyTorch|``; ``gflops`` the
    matrix-multiply GFLOPs per image of the graph (:func:`onnx_gflops`)."""

    path: str
    opset: int
    dynamic_batch: bool
    input_shape: Tuple[int, int, int, int]
    folded: Tuple[str, ...]
    fpet_layer: Optional[int]
    checked_batches: Tuple[int, ...]
    max_abs_diff: Optional[float]
    atol: float
    rtol: float
    gflops: float

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as error:
        raise ImportError(f"ONNX export needs {name}: {_INSTALL}") from error


def _input_size(vit: nn.Module, img_size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int]:
    fixed = tuple(int(s) for s in vit.patch_embed.img_size)
    if img_size is None:
        return fixed
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"img_size must be a positive int or (H, W), got {img_size!r}")
    if size != fixed and not getattr(vit, "dynamic_img_size", False):
        raise ValueError(f"img_size {size} is not the model's input size {fixed} (a fixed patch grid); call "
                         "model.set_input_size(img_size=...) first")
    return size


def _export_copy(model: nn.Module, fold: bool) -> Tuple[nn.Module, Tuple[str, ...], Optional[int]]:
    """The deep copy that is exported: eval mode, no parameter requires grad (so FPET takes its no-grad path),
    LoRA folded, the FPET / ToMe merge on the reference ops, timm's non-fused attention."""
    from .checkpoint import fold_pet
    from .merger import TokenMerger
    from .pet import pet_config
    from .vit_patch import _is_eva

    net = copy.deepcopy(model).eval().requires_grad_(False)
    vit = find_vision_transformer(net, allow_eva=True)
    if getattr(vit, "_tome_patch", None) is not None:
        raise ValueError("export_onnx: ToMe-patched models are not exported (its sort-based matching is an "
                         "inference baseline); call remove_tome(model) first")
    records = [] if _is_eva(vit) else pet_config(vit)  # fpet_kernels adds no PET to Eva models
    folded = tuple(r["method"] for r in records if r["method"].endswith("lora")) if fold else ()
    if folded:
        fold_pet(net, strict=False)

    for module in net.modules():
        if isinstance(module, TokenMerger):
            module.backend = "reference"
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False
    patch = getattr(vit, "_fpet_patch", None)
    return net, folded, None if patch is None else patch.layer


def onnx_session(path: PathLike, threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` of ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    ort = _import("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: nn.Module,
    path: PathLike,
    *,
    batch_size: int = 2,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    dynamic_batch: bool = True,
    opset: int = 18,
    fold: bool = True,
    check: bool = True,
    check_batches: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> OnnxExport:
    """Export a timm ViT (with PET, FPET) to ONNX at ``path`` and check it in onnxruntime (module docstring).

    Args:
        model: a timm VisionTransformer or Eva, or a module wrapping one, with or without PET / FPET; it is not
            changed (a deep copy is exported).
        batch_size: the batch of the traced example; >= 2 with ``dynamic_batch`` (torch.export specialises 1).
        img_size: the input size, default the model's.
        dynamic_batch: a symbolic batch dimension; ``False`` fixes it to ``batch_size``.
        opset: the ONNX opset, 18 or newer.
        fold: fold LoRA into the qkv weights (the graph then has no LoRA branch).
        check: run the export in onnxruntime on random images at ``check_batches`` (``batch_size`` when the
            batch is static) and compare with the PyTorch model under ``torch.no_grad``.
        atol, rtol: the check's tolerance, ``|onnx - torch| <= atol + rtol * |torch|`` elementwise.
        seed: seed of the check's images.
    Raises:
        ValueError: bad arguments, a ToMe-patched model, or (``check``) outputs that differ beyond the tolerance.
        ImportError: onnx, onnxruntime or onnxscript missing.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < (2 if dynamic_batch else 1):
        raise ValueError(f"batch_size must be an int >= {2 if dynamic_batch else 1}"
                         f"{' with dynamic_batch (torch.export specialises a batch of 1)' if dynamic_batch else ''}, "
                         f"got {batch_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an int >= 18, got {opset!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    checks = tuple(check_batches) if dynamic_batch else (batch_size,)
    if check and (not checks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in checks)):
        raise ValueError(f"check_batches must be ints >= 1, got {check_batches!r}")
    path = os.fspath(path)
    vit = find_vision_transformer(model, allow_eva=True)
    height, width = _input_size(vit, img_size)
    _import("onnx")
    _import("onnxscript")
    net, folded, layer = _export_copy(model, fold)
    param = next(net.parameters())
    example = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed),
                          dtype=param.dtype).to(param.device)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (example,), path, dynamo=True, dynamic_shapes=dynamic_shapes,
                              opset_version=opset, external_data=False)
        except Exception as error:  # the exporter's errors are long reports: keep the first line and the log
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(f"export_onnx: torch.onnx.export failed: {first}\n{log.getvalue()}") from error
    diff = None
    if check:
        diff = _check_outputs(model, path, checks, (height, width), atol, rtol, seed, param)
    return OnnxExport(
        path=path, opset=opset, dynamic_batch=dynamic_batch, input_shape=(batch_size, 3, height, width),
        folded=folded, fpet_layer=layer, checked_batches=checks if check else (), max_abs_diff=diff,
        atol=float(atol), rtol=float(rtol), gflops=onnx_gflops(path),
    )


def _check_outputs(model: nn.Module, path: str, batches: Sequence[int], hw: Tuple[int, int], atol: float,
                   rtol: float, seed: int, param: torch.Tensor) -> float:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed + 1)
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for batch in batches:
            images = torch.randn(batch, 3, *hw, generator=generator, dtype=param.dtype)
            with torch.no_grad():
                expected = model(images.to(param.device)).float().cpu()
            got = torch.from_numpy(session.run(None, {name: images.numpy()})[0]).float()
            if got.shape != expected.shape:
                raise ValueError(f"export_onnx: onnxruntime output {tuple(got.shape)} at batch {batch}, "
                                 f"PyTorch {tuple(expected.shape)}")
            error = (got - expected).abs()
            worst = max(worst, float(error.max()) if error.numel() else 0.0)
            if not bool((error <= atol + rtol * expected.abs()).all()):
                raise ValueError(f"export_onnx: onnxruntime output differs from PyTorch by up to {worst:.3g} at "
                                 f"batch {batch} (tolerance atol={atol}, rtol={rtol})")
    finally:
        model.train(was_training)
    return worst


# ---------------------------------------------------------------------------------------------- FLOPs and timing
def _shape(value_info) -> Optional[List[Any]]:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]


def onnx_gflops(path: PathLike, batch: int = 1) -> float:
    """Matrix-multiply GFLOPs per image of an ONNX graph: ``MatMul``, ``Gemm`` and ``Conv`` nodes, 2 FLOPs per
    multiply-add (attention's ``q @ k^T`` and ``@ v`` included, elementwise ops and softmax not), with every
    symbolic dimension set to ``batch``, divided by ``batch``."""
    onnx = _import("onnx")
    graph = onnx.shape_inference.infer_shapes(onnx.load(os.fspath(path))).graph
    shapes: Dict[str, List[Any]] = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        shape = _shape(info)
        if shape is not None:
            shapes[info.name] = [d if isinstance(d, int) and d > 0 else batch for d in shape]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    def known(*names: str) -> bool:
        return all(n in shapes for n in names)

    total = 0
    for node in graph.node:
        if node.op_type == "MatMul" and known(node.input[0], node.output[0]):
            total += 2 * math.prod(shapes[node.output[0]]) * shapes[node.input[0]][-1]
        elif node.op_type == "Gemm" and known(node.input[0], node.output[0]):
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = shapes[node.input[0]]
            total += 2 * math.prod(shapes[node.output[0]]) * (a[0] if trans_a else a[1])
        elif node.op_type == "Conv" and known(node.input[1], node.output[0]):
            total += 2 * math.prod(shapes[node.output[0]]) * math.prod(shapes[node.input[1]][1:])
        elif node.op_type in ("MatMul", "Gemm", "Conv"):
            raise ValueError(f"onnx_gflops: no shape for {node.op_type} node {node.name!r} of {path}")
    return total / batch / 1e9


def time_onnx(paths: Sequence[PathLike], images: torch.Tensor, *, runs: int = 20, warmup: int = 3,
              threads: Optional[int] = None) -> List[Dict[str, float]]:
    """Time ONNX files in onnxruntime on ``images``, alternately (run ``k`` of every file, then run ``k + 1``), so
    that load on the machine affects them alike. Returns per file ``{"median_ms", "p10_ms", "p90_ms",
    "img_per_s"}`` (img/s from the median)."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    sessions = [onnx_session(p, threads) for p in paths]
    feeds = [{s.get_inputs()[0].name: images.numpy()} for s in sessions]
    for _ in range(warmup):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for column, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            times[column].append(1e3 * (time.perf_counter() - start))
    out = []
    for samples in times:
        deciles = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
        median = statistics.median(samples)
        out.append({"median_ms": median, "p10_ms": deciles[0], "p90_ms": deciles[-1],
                    "img_per_s": images.shape[0] / (median / 1e3)})
    return out
