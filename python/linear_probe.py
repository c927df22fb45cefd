"""Linear probe of the pocket ViT on pocket-VTAB: the pretrained backbone against the same architecture at random init.

    python python/linear_probe.py                      # the shipped weights; writes fpet_kernels/weights/pocket_vit_linear_probe.json
    python python/linear_probe.py --weights /tmp/pv/pocket_vit.safetensors --out /tmp/pv/probe.json

For each of the nine pocket-VTAB tasks (fpet_kernels.data; generated into its cache on first use) and each of the
two backbones, the frozen backbone (eval mode, ``torch.inference_mode``) maps every image (``default_transform``:
64x64, [-1, 1]) to a feature vector; a linear classifier is fitted on the ``train800val200`` features and scored
(top-1 accuracy, %) on ``test``.

Features (``--pool``, every one by default, through timm's ``get_intermediate_layers(..., norm=True)``): ``token`` is
the class token after the final norm, i.e. exactly what the pocket ViT's head reads; ``avg`` is the mean of the 64
patch tokens after the final norm; ``last4`` is the DINO linear-evaluation protocol for small ViTs (Caron et al.,
2021): the class tokens of the last 4 blocks, each after the final norm, concatenated with the last block's mean
patch token (5 x 128 features). The headline is ``token``, the model's own pooled
output; ``last4`` was added because the single-vector probes of early, short trial runs did not beat random weights
(random ViT features are a strong baseline on these tasks: at init the blocks are close to the identity, so the
output is a normalised random projection of the 8x8 patches). Every pooling is reported.

Classifier: scikit-learn ``StandardScaler`` then ``LogisticRegression(C=--C, max_iter=2000)`` (lbfgs, multinomial),
one fixed C for every task and both backbones, no search on the test split. The random backbone is
``fpet_kernels.models.build_pocket_vit()`` after ``torch.manual_seed(--seed)``: timm's own initialisation.

Prints a markdown table per pooling (task, pretrained, random, difference; then the mean) and writes the results as
JSON (``--out``, default next to the weights file: ``pocket_vit_linear_probe.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

POOLS = ("token", "avg", "last4")
POOL_HELP = {
    "token": "class token after the final norm",
    "avg": "mean of patch tokens after the final norm",
    "last4": "class tokens of the last 4 blocks (each after the final norm) and the mean patch token of the last "
             "block, concatenated (the DINO linear-evaluation protocol for ViT-S)",
}
LAST_BLOCKS = 4
HEADLINE_POOL = "token"


def extract_features(model, dataset, batch_size: int = 250) -> Dict[str, np.ndarray]:
    """``{"token": [N, D], "avg": [N, D], "last4": [N, 5 D], "labels": [N]}`` of a frozen ViT over a dataset of
    (image, label); see ``POOL_HELP``."""
    import torch
    from torch.utils.data import DataLoader

    features: Dict[str, List[np.ndarray]] = {pool: [] for pool in POOLS + ("labels",)}
    with torch.inference_mode():
        for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            # timm's own API: outputs of the last blocks, final norm applied, split into patch and prefix tokens
            layers = model.get_intermediate_layers(images, n=LAST_BLOCKS, return_prefix_tokens=True, norm=True)
            patches, prefix = layers[-1]  # the last block: [B, 64, D], [B, 1, D]
            features["token"].append(prefix[:, 0].numpy())
            features["avg"].append(patches.mean(1).numpy())
            features["last4"].append(torch.cat([p[:, 0] for _, p in layers] + [patches.mean(1)], dim=-1).numpy())
            features["labels"].append(targets.numpy())
    return {key: np.concatenate(value) for key, value in features.items()}


def probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                   C: float) -> float:
    """Test accuracy (%) of a standardised logistic regression fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    classifier.fit(train, train_labels)
    return 100.0 * float((classifier.predict(test) == test_labels).mean())


def markdown_table(results: Dict[str, Dict[str, float]], tasks: List[str]) -> str:
    """``| task | pretrained | random | difference |`` rows, then the mean; accuracies in %."""
    lines = ["| task | pretrained | random | difference |", "|---|---:|---:|---:|"]
    for task in tasks + ["mean"]:
        p, r = results["pretrained"][task], results["random"][task]
        name = f"**{task}**" if task == "mean" else task
        lines.append(f"| {name} | {p:.1f} | {r:.1f} | {p - r:+.1f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="pocket ViT weights (default: the shipped file)")
    parser.add_argument("--out", default=None,
                        help="JSON results (default: pocket_vit_linear_probe.json next to the weights)")
    parser.add_argument("--pool", choices=POOLS + ("all",), default="all",
                        help="features: class token, patch-token mean, the last-4-blocks protocol, or all (default; "
                             "'token' is the headline)")
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random-init backbone")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all nine)")
    parser.add_argument("--data-root", default=None, help="pocket-VTAB cache root (default: $FPET_DATA_DIR or "
                                                          "~/.cache/fpet_kernels/pocket_vtab)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from fpet_kernels import models
    from fpet_kernels.data import default_transform, get_task, list_tasks, load_pocket_vtab

    torch.set_num_threads(args.threads)
    weights = os.path.abspath(args.weights) if args.weights else models.pocket_vit_path()
    out = args.out or os.path.join(os.path.dirname(weights), "pocket_vit_linear_probe.json")
    tasks = [get_task(t.strip()).name for t in args.tasks.split(",")] if args.tasks else [t.name for t in list_tasks()]
    pools = list(POOLS) if args.pool == "all" else [args.pool]

    pretrained = models.pocket_vit(0, weights=weights)
    torch.manual_seed(args.seed)
    random_init = models.build_pocket_vit(0).eval()
    backbones = {"pretrained": pretrained, "random": random_init}
    transform = default_transform()

    results = {pool: {name: {} for name in backbones} for pool in pools}
    start = time.perf_counter()
    for task in tasks:
        train_set = load_pocket_vtab(task, "train800val200", transform, root=args.data_root)
        test_set = load_pocket_vtab(task, "test", transform, root=args.data_root)
        for name, model in backbones.items():
            train, test = extract_features(model, train_set), extract_features(model, test_set)
            for pool in pools:
                results[pool][name][task] = probe_accuracy(train[pool], train["labels"], test[pool], test["labels"],
                                                           args.C)
        print(f"{task}: " + ", ".join(
            f"{pool} {results[pool]['pretrained'][task]:.1f} vs {results[pool]['random'][task]:.1f}" for pool in pools
        ), flush=True)
    for pool in pools:
        for name in backbones:
            results[pool][name]["mean"] = float(np.mean([results[pool][name][t] for t in tasks]))

    _, metadata = models.read_pocket_vit_weights(weights)
    for pool in pools:
        print(f"\nLinear probe, {pool} features (test accuracy %, logistic regression C={args.C} on standardised "
              f"features fitted on train800val200):\n")
        print(markdown_table(results[pool], tasks))
    report = {
        "weights": os.path.basename(weights),
        "upstream": metadata.get("upstream", {}).get("name"),
        "upstream_val_accuracy": metadata.get("upstream_val_accuracy"),
        "protocol": {
            "fit": "train800val200", "score": "test", "metric": "top-1 accuracy %",
            "classifier": f"StandardScaler + LogisticRegression(C={args.C}, max_iter=2000)",
            "features": {pool: POOL_HELP[pool] for pool in pools},
            "headline_pool": HEADLINE_POOL,
            "random_backbone": f"fpet_kernels.models.build_pocket_vit() after torch.manual_seed({args.seed})",
            "threads": args.threads,
        },
        "tasks": tasks,
        "results": results,
        "difference_mean": {pool: results[pool]["pretrained"]["mean"] - results[pool]["random"]["mean"]
                            for pool in pools},
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
