"""PyTorch mirror of mlx_clip/loss.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


def clip_loss(image_features, text_features, logit_scale, label_smoothing: float = 0.0) -> torch.Tensor:
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2
