"""Contrastive losses and their data-parallel form. Kept apart from the model: the model returns features.

Every loss takes L2-normalised image and text features, pair i = (image i, text i), and the logit
scale 1/tau. `contrastive_loss` picks the one named by the config's `loss` section and handles data
parallelism. Formulas, and when to use which: docs/objectives.md.

Each loss is a sum over rows: a query feature against N candidate columns, the positive at column
labels[i]. One process: the batch against itself, (B, B), positives on the diagonal. With
`loss.local_loss` a rank computes only its own b rows against the W*b gathered columns; the
keyword `columns=(all_image, all_text, offset)` selects that form.
"""

from __future__ import annotations

import math
import typing

import mlx.core as mx
import mlx.nn as nn

from ..config import HardNegativeStrategy, LossConfig, LossType
from ..schema import one_of

LOSS_TYPES = typing.get_args(LossType)
STRATEGIES = typing.get_args(HardNegativeStrategy)
Columns = tuple  # (all_image (N, E) | None, all_text (N, E), offset of these rows among the N)


def clip_logits(image_features: mx.array, text_features: mx.array, logit_scale: mx.array):
    """(B, E), (B, E), scalar -> logits_per_image (B, B), logits_per_text (B, B)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


def _directions(image_features, text_features, logit_scale, columns: Columns | None = None):
    """Both directions' logits, (n, N) each, and the positives' columns labels (n,)."""
    if columns is None:
        logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
        offset = 0
    else:
        all_image, all_text, offset = columns
        logits_per_image = logit_scale * image_features @ all_text.T  # (b, W*b)
        logits_per_text = logit_scale * text_features @ all_image.T  # (b, W*b)
    return logits_per_image, logits_per_text, offset + mx.arange(logits_per_image.shape[0])


def _positives(labels: mx.array, n_columns: int) -> mx.array:
    """(n, N) bool, True at (i, labels[i])."""
    return mx.arange(n_columns)[None, :] == labels[:, None]


def _softmax_loss(logits_per_image, logits_per_text, labels, label_smoothing: float) -> mx.array:
    """Mean of the image->text and text->image cross-entropies, each averaged over its rows."""
    kw = {"label_smoothing": label_smoothing, "reduction": "mean"}
    return (
        nn.losses.cross_entropy(logits_per_image, labels, **kw)
        + nn.losses.cross_entropy(logits_per_text, labels, **kw)
    ) / 2


def clip_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    label_smoothing: float = 0.0,
    *,
    columns: Columns | None = None,
) -> mx.array:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy."""
    return _softmax_loss(*_directions(image_features, text_features, logit_scale, columns), label_smoothing)


def siglip_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    logit_bias: mx.array,
    *,
    columns: Columns | None = None,
) -> mx.array:
    """SigLIP's pairwise sigmoid loss: -sum_ij log sigmoid(y_ij (scale s_ij + bias)) / n_images,
    y = +1 for the pairs, -1 elsewhere (open_clip's SigLipLoss normalisation). Image rows only:
    with `columns` only the gathered texts are used."""
    all_text, offset = (text_features, 0) if columns is None else columns[1:]
    logits = logit_scale * image_features @ all_text.T + logit_bias  # (n, N)
    labels = offset + mx.arange(logits.shape[0])
    signs = mx.where(_positives(labels, logits.shape[1]), 1.0, -1.0)
    # log sigmoid(x) = -log(1 + e^-x) = -logaddexp(0, -x): no overflow for large |x|
    return mx.logaddexp(-signs * logits, 0.0).sum() / logits.shape[0]


# ---------------------------------------------------------------------------
# Hard negatives: selected negatives weigh (1 + weight) times more in the softmax denominator


def num_hard(ratio: float, n_negatives: int) -> int:
    """k = max(1, ratio * n_negatives rounded half up), at most n_negatives."""
    return min(n_negatives, max(1, math.floor(ratio * n_negatives + 0.5)))


def hard_negative_mask(
    similarity: mx.array,
    labels: mx.array,
    strategy: str,
    ratio: float,
    margin: float,
    logit_scale: mx.array,
) -> mx.array:
    """How hard each negative is: m in [0, 1], (n, N), 0 at the positives.

    similarity: (n, N) cosine similarities, row i's positive at column labels[i]; k = num_hard(ratio, N-1).
    hard:      1 for the row's k most similar negatives.
    semi-hard: 1 for negatives with s_pos - margin < s_ij < s_pos, at most the k most similar of them.
    weighted:  min(1, k q_ij), q = softmax of logit_scale * s over the row's negatives: at most k
               negatives' worth of weight, spread like the model's own softmax (margin unused).
    A tie at the k-th largest similarity selects every tied negative: the rule needs no sort order,
    so MLX and torch_ref agree (random float features practically never tie).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"hard negative strategy must be {one_of(STRATEGIES)}, got {strategy!r}")
    n_columns = similarity.shape[1]
    k = num_hard(ratio, n_columns - 1)
    pos = _positives(labels, n_columns)
    if k == 0:  # a single column: no negatives
        return mx.zeros_like(similarity)
    if strategy == "weighted":
        q = mx.softmax(mx.where(pos, -mx.inf, logit_scale * similarity), axis=-1)
        return mx.minimum(k * q, 1.0)
    if strategy == "hard":
        candidates = ~pos
    else:  # semi-hard
        s_pos = mx.take_along_axis(similarity, labels[:, None], axis=1)  # (n, 1)
        candidates = ~pos & (similarity > s_pos - margin) & (similarity < s_pos)
    ranked = mx.where(candidates, similarity, -mx.inf)
    kth = mx.sort(ranked, axis=-1)[:, n_columns - k : n_columns - k + 1]  # k-th largest, (n, 1)
    # fewer than k candidates: kth is -inf and every candidate is kept
    return (candidates & (ranked >= kth)).astype(similarity.dtype)


def hard_negative_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    strategy: str,
    ratio: float,
    weight: float,
    margin: float,
    label_smoothing: float = 0.0,
    *,
    columns: Columns | None = None,
) -> mx.array:
    """clip_loss with log(1 + weight * m_ij) added to each negative's logit, m = hard_negative_mask
    of that direction's rows (detached). weight = 0 is clip_loss exactly."""
    logits_per_image, logits_per_text, labels = _directions(
        image_features, text_features, logit_scale, columns
    )
    sim_per_image, sim_per_text, _ = _directions(image_features, text_features, 1.0, columns)

    def shift(similarity):  # the selection is a constant of the step: no gradient through it
        m = hard_negative_mask(similarity, labels, strategy, ratio, margin, logit_scale)
        return mx.stop_gradient(mx.log1p(weight * m))

    return _softmax_loss(
        logits_per_image + shift(sim_per_image),
        logits_per_text + shift(sim_per_text),
        labels,
        label_smoothing,
    )


# ---------------------------------------------------------------------------


def multi_scale_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    scales: list[float],
    weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    *,
    columns: Columns | None = None,
) -> mx.array:
    """sum_s w_s clip_loss(scales[s] * logit_scale), weights normalised to sum 1 (None: equal)."""
    weights = [1.0] * len(scales) if weights is None else list(weights)
    if len(weights) != len(scales) or sum(weights) <= 0:
        raise ValueError(
            f"multi_scale_loss needs one weight per scale with a positive sum: {scales}, {weights}"
        )
    total = sum(weights)
    return sum(
        (w / total)
        * clip_loss(image_features, text_features, s * logit_scale, label_smoothing, columns=columns)
        for s, w in zip(scales, weights, strict=True)
    )


def soft_cross_entropy(teacher_logits: mx.array, student_logits: mx.array) -> mx.array:
    """-sum_j softmax(teacher)_ij log_softmax(student)_ij, averaged over the rows i. The teacher is
    a constant: no gradient flows into it. Equals KL(teacher || student) + the teacher's entropy,
    so it has the KL's gradients."""
    p = mx.stop_gradient(mx.softmax(teacher_logits, axis=-1))
    log_q = student_logits - mx.logsumexp(student_logits, axis=-1, keepdims=True)
    return -(p * log_q).sum(axis=-1).mean()


def distill_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    teacher_image: mx.array,
    teacher_text: mx.array,
    teacher_scale: float,
) -> mx.array:
    """Distillation from a teacher's L2-normalised features of the same pairs ((B, D), any D):
    the student's image->text and text->image softmaxes (its own logit scale) against the
    teacher's (teacher_scale = 1 / the distillation temperature), the mean of the two directions'
    soft cross-entropies (open_clip's DistillClipLoss form)."""
    student_per_image, student_per_text = clip_logits(image_features, text_features, logit_scale)
    teacher_per_image, teacher_per_text = clip_logits(teacher_image, teacher_text, teacher_scale)
    return (
        soft_cross_entropy(teacher_per_image, student_per_image)
        + soft_cross_entropy(teacher_per_text, student_per_text)
    ) / 2


def batch_loss(
    cfg: LossConfig,
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    logit_bias: mx.array | None = None,
    *,
    columns: Columns | None = None,
) -> mx.array:
    """The loss of type cfg.type of these rows, without communication (contrastive_loss gathers)."""
    if cfg.type == "siglip" and logit_bias is None:
        raise ValueError(
            "loss.type=siglip needs a learnable logit bias, but the model has none: set "
            "model.init_logit_bias (SigLIP: -10; the config sets it for siglip unless overridden)"
        )
    args = (image_features, text_features, logit_scale)
    if cfg.type == "clip":
        return clip_loss(*args, cfg.label_smoothing, columns=columns)
    if cfg.type == "siglip":
        return siglip_loss(*args, logit_bias, columns=columns)
    if cfg.type == "hard_negative":
        hard = (cfg.strategy, cfg.ratio, cfg.weight, cfg.margin, cfg.label_smoothing)
        return hard_negative_loss(*args, *hard, columns=columns)
    if cfg.type == "multi_scale":
        return multi_scale_loss(*args, cfg.scales, cfg.scale_weights, cfg.label_smoothing, columns=columns)
    raise ValueError(f"loss.type must be {one_of(LOSS_TYPES)}, got {cfg.type!r}")


def contrastive_loss(
    cfg: LossConfig,
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    logit_bias: mx.array | None = None,
    group=None,
) -> mx.array:
    """This rank's loss of type cfg.type; group=None: the plain loss of these features.

    Data parallel ((b, E) features per rank): the features are gathered with `gather_with_grad`.
    Default: every rank computes the loss of the whole gathered batch (the same value everywhere).
    cfg.local_loss: this rank's rows against all gathered columns, scaled so that the global loss
    is the mean over ranks. Either way the mean over ranks of the value is the global-batch loss
    and the mean of the parameter gradients is the single-process gradient (docs/distributed.md).
    """
    if group is None:
        return batch_loss(cfg, image_features, text_features, logit_scale, logit_bias)
    # local siglip has image rows only: it needs the gathered texts, not the images
    local_siglip = cfg.local_loss and cfg.type == "siglip"
    all_image = None if local_siglip else gather_with_grad(image_features, group)  # (W*b, E)
    all_text = gather_with_grad(text_features, group)  # (W*b, E)
    if not cfg.local_loss:
        return batch_loss(cfg, all_image, all_text, logit_scale, logit_bias)
    columns = (all_image, all_text, group.rank() * image_features.shape[0])
    return batch_loss(cfg, image_features, text_features, logit_scale, logit_bias, columns=columns)


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
