"""Contrastive losses. Kept apart from the model: the model returns features."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def clip_logits(image_features: mx.array, text_features: mx.array, logit_scale: mx.array):
    """(B, E), (B, E), scalar -> logits_per_image (B, B), logits_per_text (B, B)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


def clip_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    label_smoothing: float = 0.0,
) -> mx.array:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy."""
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    labels = mx.arange(logits_per_image.shape[0])
    kw = {"label_smoothing": label_smoothing, "reduction": "mean"}
    return (
        nn.losses.cross_entropy(logits_per_image, labels, **kw)
        + nn.losses.cross_entropy(logits_per_text, labels, **kw)
    ) / 2
