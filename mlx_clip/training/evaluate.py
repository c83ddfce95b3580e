"""A run's held-out evaluation: zero-shot and retrieval metrics, and the training loss on val."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import Config
from ..data.run_data import RunData
from ..evaluation.metrics import evaluate_run
from ..models.model import CLIP, encode_pair
from .build import make_loss_parts


def evaluate(model: CLIP, data: RunData, cfg: Config | None = None) -> dict:
    """Zero-shot and retrieval metrics of `model` on the run's held-out sets, and with `cfg` the
    training loss on the val set (`val_loss`)."""
    metrics = evaluate_run(
        data,
        encode_image=lambda images: np.array(model.encode_image(mx.array(images))),
        encode_text=lambda tokens: np.array(model.encode_text(mx.array(tokens))),
    )
    if cfg is not None and "val" in data.evals:
        metrics["val_loss"] = val_loss(model, data, cfg)
    return metrics


def val_loss(model: CLIP, data: RunData, cfg: Config) -> float:
    """The training objective on the val set, in float32 at the current temperature."""
    _, features_loss = make_loss_parts(cfg)  # one process: rank 0 evaluates alone
    losses = [
        (features_loss(model, *encode_pair(model, mx.array(images), mx.array(tokens))).item(), len(tokens))
        for images, tokens in data.val_pairs()
    ]
    return float(np.average([x for x, _ in losses], weights=[n for _, n in losses])) if losses else math.nan


def pick_best_metric(cfg: Config, metrics: dict) -> str | None:
    """The metric that picks the best checkpoint: train.best_metric, or with "auto" zero-shot top-1
    (else image-to-text R@1) when the evaluation has it."""
    if cfg.train.best_metric != "auto":
        return cfg.train.best_metric
    for name in ("zeroshot_top1", "i2t_R@1"):
        if name in metrics:
            return name
    return None
