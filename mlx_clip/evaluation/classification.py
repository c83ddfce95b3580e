"""Classification results as CLIP_benchmark reports them (top-1, top-5, mean per-class recall),
with the recall of every class, a confusion matrix and its PNG (numpy; matplotlib for the PNG).

Zero-shot and the linear probe both end in (N, C) class scores and share these numbers. The one
difference from CLIP_benchmark is the tie rule of metrics.label_ranks: a label tied with a rival
for a place is a miss there, where CLIP_benchmark takes torch's order. On tie-free scores they agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import all_finite, label_ranks, zero_shot_logits


def predictions(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) predicted class per row, consistent with the tie rule: the label where it ranks first,
    else the best rival (a label tied for first predicts the tied rival, so it is not a hit)."""
    rank, _ = label_ranks(logits, labels)
    rows = np.arange(len(labels))
    rivals = logits.astype(np.float64, copy=True)
    rivals[rows, labels] = -np.inf
    return np.where(rank == 1, labels, rivals.argmax(axis=1))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(predicted)), 1)
    return out


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, classnames: list[str], topk=(1, 5)
) -> dict:
    """Metrics of class scores `logits` (N, C) against integer `labels` (N,).

    Returns {"top1", "top5": share of rows whose label ranks within k (a k above C is left out;
    CLIP_benchmark writes NaN there), "mean_per_class_recall": the mean over the classes that have
    images of their top-1 recall (sklearn's balanced_accuracy_score, as CLIP_benchmark),
    "per_class_recall": {class name: recall, or None for a class with no images},
    "confusion": (C, C) int64 counts}. Non-finite scores make every number NaN."""
    labels = np.asarray(labels)
    n_classes = logits.shape[1]
    if len(classnames) != n_classes:
        raise ValueError(f"{n_classes} classes scored but {len(classnames)} class names")
    names = [k for k in topk if k <= n_classes]
    if not all_finite(logits):
        label_ranks(logits, labels)  # still reject labels that name no class
        return {
            **{f"top{k}": math.nan for k in names},
            "mean_per_class_recall": math.nan,
            "per_class_recall": {c: math.nan for c in classnames},
            "confusion": np.zeros((n_classes, n_classes), dtype=np.int64),
        }
    rank, _ = label_ranks(logits, labels)
    confusion = confusion_matrix(labels, predictions(logits, labels), n_classes)
    images = confusion.sum(axis=1)  # (C,) images per class
    recall = np.diag(confusion) / np.maximum(images, 1)
    out = {f"top{k}": float(np.mean(rank <= k)) for k in names}
    out["mean_per_class_recall"] = float(recall[images > 0].mean()) if images.any() else math.nan
    out["per_class_recall"] = {
        c: (float(r) if n else None) for c, r, n in zip(classnames, recall, images, strict=True)
    }
    out["confusion"] = confusion
    return out


def zero_shot_metrics(
    image_features: np.ndarray, classifier: np.ndarray, labels: np.ndarray, classnames: list[str], topk=(1, 5)
) -> dict:
    """classification_metrics of images (N, E) against the class weights (C, E) of
    metrics.zero_shot_classifier (the prompt ensemble); NaN when a feature is not finite."""
    if not all_finite(image_features, classifier):
        nan = np.full((len(image_features), len(classifier)), np.nan)
        return classification_metrics(nan, labels, classnames, topk)
    return classification_metrics(zero_shot_logits(image_features, classifier), labels, classnames, topk)


def write_confusion_png(
    confusion: np.ndarray, classnames: list[str], path: str | Path, title: str = ""
) -> None:
    """Confusion matrix as a PNG: rows true, columns predicted, colour = share of the row (so the
    diagonal reads as per-class recall). Class names and counts are drawn while they stay legible
    (up to 50 and 25 classes); a 1000-class matrix is drawn as an image only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {confusion.shape} for {n} class names")
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.3 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set(xlabel="predicted", ylabel="true", title=title or f"confusion ({int(confusion.sum())} images)")
    if n <= 50:
        ax.set_xticks(range(n), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classnames, fontsize=7)
    if n <= 25:
        for i, j in zip(*np.nonzero(confusion), strict=True):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
