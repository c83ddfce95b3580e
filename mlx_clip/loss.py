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


# ---------------------------------------------------------------------------
# Data parallel: the global contrastive batch (see docs/distributed.md for the scaling proof)

_GATHERS: dict[int, tuple] = {}  # id(group) -> (gather function, group)


def gather_with_grad(x: mx.array, group) -> mx.array:
    """all_gather over `group` (rank order along axis 0) whose VJP sums the cotangent over the ranks.

    MLX's own all_gather VJP hands each rank only its slice of its OWN cotangent. Rank r's loss
    L_r depends on every rank's features, so the gradient of sum_s L_s with respect to rank r's
    features is sum_s dL_s/dF[slice r]: an all_sum of the cotangents, then this rank's slice.
    """
    key = id(group)
    if key not in _GATHERS:
        rank = group.rank()

        @mx.custom_function
        def gather(x):
            return mx.distributed.all_gather(x, group=group)

        @gather.vjp
        def gather_vjp(primals, cotangent, output):
            n = output.shape[0] // group.size()  # this rank's rows
            grad = mx.distributed.all_sum(cotangent, group=group)[rank * n : (rank + 1) * n]
            return (grad,) if isinstance(primals, (tuple, list)) else grad  # mirrors the primals

        _GATHERS[key] = (gather, group)  # the group is kept alive with its id
    return _GATHERS[key][0](x)


def clip_loss_distributed(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    group,
    local_loss: bool = False,
    label_smoothing: float = 0.0,
) -> mx.array:
    """This rank's contrastive loss over the GLOBAL batch; (b, E) local features, W = group.size().

    local_loss=False: every rank computes the whole (W*b, W*b) loss, identical everywhere.
    local_loss=True: this rank's b rows against all W*b columns, both directions (as open_clip's
    --local-loss --gather-with-grad): (b, W*b) logits instead of (W*b, W*b).
    Either way the mean over ranks of this value is the single-process loss, so with
    `gather_with_grad` the mean over ranks of the parameter gradients is the single-process
    gradient.
    """
    all_image = gather_with_grad(image_features, group)  # (W*b, E)
    all_text = gather_with_grad(text_features, group)  # (W*b, E)
    if not local_loss:
        return clip_loss(all_image, all_text, logit_scale, label_smoothing)
    b = image_features.shape[0]
    labels = group.rank() * b + mx.arange(b)  # this rank's samples sit at rows rank*b ... rank*b + b
    kw = {"label_smoothing": label_smoothing, "reduction": "mean"}
    logits_per_image = logit_scale * image_features @ all_text.T  # (b, W*b)
    logits_per_text = logit_scale * text_features @ all_image.T  # (b, W*b)
    return (
        nn.losses.cross_entropy(logits_per_image, labels, **kw)
        + nn.losses.cross_entropy(logits_per_text, labels, **kw)
    ) / 2
