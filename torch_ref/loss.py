"""PyTorch mirror of mlx_clip/training/loss.py: same names and semantics, single process only."""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F

from mlx_clip.config import HardNegativeStrategy, LossConfig, LossType
from mlx_clip.schema import one_of

LOSS_TYPES = typing.get_args(LossType)
STRATEGIES = typing.get_args(HardNegativeStrategy)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


def _softmax_loss(logits_per_image, logits_per_text, label_smoothing: float) -> torch.Tensor:
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2


def clip_loss(image_features, text_features, logit_scale, label_smoothing: float = 0.0) -> torch.Tensor:
    return _softmax_loss(*clip_logits(image_features, text_features, logit_scale), label_smoothing)


def siglip_loss(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, B)
    n = logits.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def num_hard(ratio: float, n_negatives: int) -> int:
    return min(n_negatives, max(1, math.floor(ratio * n_negatives + 0.5)))


@torch.no_grad()
def hard_negative_mask(similarity, labels, strategy: str, ratio: float, margin: float, logit_scale):
    if strategy not in STRATEGIES:
        raise ValueError(f"hard negative strategy must be {one_of(STRATEGIES)}, got {strategy!r}")
    n_columns = similarity.shape[1]
    k = num_hard(ratio, n_columns - 1)
    pos = torch.arange(n_columns, device=similarity.device)[None, :] == labels[:, None]
    if k == 0:
        return torch.zeros_like(similarity)
    if strategy == "weighted":
        q = torch.softmax((logit_scale * similarity).masked_fill(pos, -math.inf), dim=-1)
        return torch.clamp(k * q, max=1.0)
    if strategy == "hard":
        candidates = ~pos
    else:  # semi-hard
        s_pos = similarity.gather(1, labels[:, None])  # (n, 1)
        candidates = ~pos & (similarity > s_pos - margin) & (similarity < s_pos)
    ranked = similarity.masked_fill(~candidates, -math.inf)
    kth = torch.sort(ranked, dim=-1).values[:, n_columns - k : n_columns - k + 1]  # k-th largest
    return (candidates & (ranked >= kth)).to(similarity.dtype)


def hard_negative_loss(
    image_features,
    text_features,
    logit_scale,
    strategy: str,
    ratio: float,
    weight: float,
    margin: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    sim_per_image = (image_features @ text_features.T).detach()
    labels = torch.arange(sim_per_image.shape[0], device=sim_per_image.device)

    def shift(similarity):
        m = hard_negative_mask(similarity, labels, strategy, ratio, margin, logit_scale.detach())
        return torch.log1p(weight * m)

    return _softmax_loss(
        logits_per_image + shift(sim_per_image), logits_per_text + shift(sim_per_image.T), label_smoothing
    )


def multi_scale_loss(
    image_features, text_features, logit_scale, scales, weights=None, label_smoothing: float = 0.0
) -> torch.Tensor:
    weights = [1.0] * len(scales) if weights is None else list(weights)
    if len(weights) != len(scales) or sum(weights) <= 0:
        raise ValueError(
            f"multi_scale_loss needs one weight per scale with a positive sum: {scales}, {weights}"
        )
    total = sum(weights)
    return sum(
        (w / total) * clip_loss(image_features, text_features, s * logit_scale, label_smoothing)
        for s, w in zip(scales, weights, strict=True)
    )


def soft_cross_entropy(teacher_logits, student_logits) -> torch.Tensor:
    p = torch.softmax(teacher_logits.detach(), dim=-1)
    return -(p * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


def distill_loss(
    image_features, text_features, logit_scale, teacher_image, teacher_text, teacher_scale: float
) -> torch.Tensor:
    student_per_image, student_per_text = clip_logits(image_features, text_features, logit_scale)
    teacher_per_image, teacher_per_text = clip_logits(teacher_image, teacher_text, teacher_scale)
    return (
        soft_cross_entropy(teacher_per_image, student_per_image)
        + soft_cross_entropy(teacher_per_text, student_per_text)
    ) / 2


def contrastive_loss(
    cfg: LossConfig, image_features, text_features, logit_scale, logit_bias=None, group=None
) -> torch.Tensor:
    if group is not None:
        raise NotImplementedError("torch_ref has no data parallel: group must be None")
    if cfg.type == "siglip" and logit_bias is None:
        raise ValueError(
            "loss.type=siglip needs a learnable logit bias, but the model has none: set "
            "model.init_logit_bias (SigLIP: -10; the config sets it for siglip unless overridden)"
        )
    args = (image_features, text_features, logit_scale)
    if cfg.type == "clip":
        return clip_loss(*args, cfg.label_smoothing)
    if cfg.type == "siglip":
        return siglip_loss(*args, logit_bias)
    if cfg.type == "hard_negative":
        return hard_negative_loss(*args, cfg.strategy, cfg.ratio, cfg.weight, cfg.margin, cfg.label_smoothing)
    if cfg.type == "multi_scale":
        return multi_scale_loss(*args, cfg.scales, cfg.scale_weights, cfg.label_smoothing)
    raise ValueError(f"loss.type must be {one_of(LOSS_TYPES)}, got {cfg.type!r}")
