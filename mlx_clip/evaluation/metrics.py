"""Zero-shot classification and retrieval metrics on numpy features (framework-free)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zero_shot_classifier(class_text_features: np.ndarray) -> np.ndarray:
    """(C, T, E) features of C classes x T prompt templates -> (C, E) ensembled class weights.

    Prompt ensembling as in CLIP: average the normalised template embeddings, renormalise.
    """
    return l2_normalize(l2_normalize(class_text_features).mean(axis=1))


def all_finite(*arrays: np.ndarray) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def _rank(scores: np.ndarray, true: np.ndarray, rivals: np.ndarray) -> np.ndarray:
    """1-based rank of each row's correct score `true` (R, 1) among its `rivals` (a mask over
    `scores`' columns, (R, K)). A tie or a non-finite rival counts as ranking above (the correct
    score is not strictly greater), and a non-finite correct score ranks last: a constant or
    NaN model scores no hits."""
    above = rivals & ~(scores < true)  # (R, K)
    last = 1 + rivals.sum(axis=1)
    return np.where(np.isfinite(true[:, 0]), 1 + above.sum(axis=1), last)


def _recall(rank: np.ndarray, true: np.ndarray, k: int) -> float:
    """Share of rows whose correct score is finite and ranks within the top k."""
    return float(np.mean(np.isfinite(true[:, 0]) & (rank <= k)))


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank (N,) of each row's labelled class among all C classes of `logits` (N, C), and
    the labelled scores (N, 1). Ties and non-finite scores rank the label below its rivals (see _rank).

    This is where our numbers can differ from CLIP_benchmark, which takes torch.topk's order (ties
    broken by index): on exact ties only, where it may count a hit and we never do."""
    labels = np.asarray(labels)
    n_classes = logits.shape[1]
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} score rows but {len(labels)} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < n_classes:
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise ValueError(f"label {bad} is not one of the {n_classes} classes (0..{n_classes - 1})")
    rows = np.arange(len(labels))
    true = logits[rows, labels][:, None]  # (N, 1)
    rivals = np.ones_like(logits, dtype=bool)
    rivals[rows, labels] = False  # every other class
    return _rank(logits, true, rivals), true


def zero_shot_logits(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """(N, C) cosine scores of images (N, E) against the class weights (C, E) of zero_shot_classifier.

    CLIP_benchmark multiplies by 100; a positive scale changes no rank, so none is applied."""
    return l2_normalize(image_features) @ classifier.T


def zero_shot_accuracy(image_features: np.ndarray, classifier: np.ndarray, labels: np.ndarray, topk=(1, 5)):
    """Top-k accuracy of image @ classifier.T against integer labels (ties count as misses); NaN
    when a feature is not finite. A k above the number of classes is left out."""
    names = {k: f"zeroshot_top{k}" for k in topk if k <= classifier.shape[0]}
    if not all_finite(image_features, classifier):
        return {name: math.nan for name in names.values()}
    rank, true = label_ranks(zero_shot_logits(image_features, classifier), labels)
    return {name: _recall(rank, true, k) for k, name in names.items()}


def retrieval_metrics(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    texts: list[str] | None = None,
):
    """Image<->text retrieval with possibly several captions per image.

    image_features (N, E), text_features (M, E), text_to_image (M,) index of each caption's image.
    image->text: the rank of the best-ranked of the image's own captions (a hit on any counts).
    With `texts` (M,), another image's caption that reads exactly like one of the image's own is
    the same answer, not a rival (datasets repeat short captions: "a red circle.").
    text->image: the rank of the caption's image. Ranks are 1-based and a tie ranks the correct
    item below its rivals; R@k = share with rank <= k. Non-finite features make every value NaN.

    Without `texts`, R@k equals CLIP_benchmark's zeroshot_retrieval (its text_retrieval_recall@k is
    our i2t, image_retrieval_recall@k our t2i) except on exact ties, which it breaks by index.
    """
    n_images = len(image_features)
    text_to_image = np.asarray(text_to_image)
    if len(text_to_image) != len(text_features):
        raise ValueError(f"{len(text_features)} captions but {len(text_to_image)} text_to_image entries")
    if len(text_to_image) and not 0 <= text_to_image.min() <= text_to_image.max() < n_images:
        raise ValueError(f"text_to_image must index the {n_images} images")
    if len(np.unique(text_to_image)) != n_images:  # an image with no caption could never be found
        raise ValueError("every image needs at least one caption in text_to_image")
    names = [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")]
    if not all_finite(image_features, text_features):
        return {**{name: math.nan for name in names}, "retrieval_images": int(n_images)}
    sims = l2_normalize(image_features) @ l2_normalize(text_features).T  # (N, M)
    own = np.zeros_like(sims, dtype=bool)
    own[text_to_image, np.arange(sims.shape[1])] = True

    # image -> text: the best own caption against the foreign ones (NaN if any own score is NaN)
    i2t_own = own if texts is None else _same_text(own, texts)
    i2t_true = np.where(i2t_own, sims, -np.inf).max(axis=1, keepdims=True)  # (N, 1)
    i2t_rank = _rank(sims, i2t_true, ~i2t_own)
    # text -> image: the caption's own image against the other images
    t2i_true = sims[text_to_image, np.arange(sims.shape[1])][:, None]  # (M, 1)
    t2i_rank = _rank(sims.T, t2i_true, ~own.T)

    out = {}
    for name, rank, true in (("i2t", i2t_rank, i2t_true), ("t2i", t2i_rank, t2i_true)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = _recall(rank, true, k)
        out[f"{name}_mean_rank"] = float(np.mean(rank))
        out[f"{name}_median_rank"] = float(np.median(rank))
    out["retrieval_images"] = int(n_images)
    return out


def _same_text(own: np.ndarray, texts: list[str]) -> np.ndarray:
    """own (N, M) widened to every caption whose text equals one of the image's own captions."""
    if len(texts) != own.shape[1]:
        raise ValueError(f"{own.shape[1]} captions but {len(texts)} texts")
    _, text_id = np.unique(np.asarray(texts, dtype=str), return_inverse=True)  # (M,)
    images, captions = np.nonzero(own)
    owns_text = np.zeros((own.shape[0], text_id.max() + 1), dtype=bool)  # image owns a text
    owns_text[images, text_id[captions]] = True
    return owns_text[:, text_id]


@dataclass
class HeldOutFeatures:
    """One held-out set's features as evaluate_run computed them, kept for the val loss."""

    images: np.ndarray  # (N, D), row i the image of captions[i], in the loader's order
    texts: np.ndarray  # (number of captions, D), every image's captions in order
    owner: np.ndarray  # (number of captions,) the image of each text row
    batches: list[int]  # the loader's batch sizes

    def val_pairs(self):
        """(image features, features of each image's first caption) per loader batch of >= 2
        images: the batches of RunData.val_pairs, without encoding the images and captions again."""
        first = np.searchsorted(self.owner, np.arange(len(self.images)))  # owner is sorted
        start = 0
        for size in self.batches:
            if size >= 2:  # a contrastive loss needs negatives
                yield self.images[start : start + size], self.texts[first[start : start + size]]
            start += size


def evaluate_run(
    data,
    encode_image: Callable[[np.ndarray], np.ndarray],
    encode_text: Callable[[np.ndarray], np.ndarray],
    text_batch: int = 256,
    keep: dict | None = None,
) -> dict:
    """Zero-shot top-1/top-5 (prompt ensemble) and retrieval on a run's held-out sets.

    `data` is a run_data.RunData; the encoders map numpy NHWC images / int32 tokens to
    numpy features, so MLX and torch_ref share this code. With `keep`, keep[set name] gets
    its HeldOutFeatures (the MLX trainer's val loss reads them instead of encoding again).
    """

    def texts_to_features(texts: list[str]) -> np.ndarray:
        parts = [
            encode_text(data.tokenize(texts[i : i + text_batch])) for i in range(0, len(texts), text_batch)
        ]
        return np.concatenate(parts)

    metrics: dict = {}
    for name, ev in data.evals.items():
        prefix = "" if name == "val" else f"{name}_"
        batches = [encode_image(b["images"]) for b in ev.loader.epoch(0)]
        image_features = np.concatenate(batches)
        if len(image_features) != len(ev.captions):
            raise ValueError(
                f"{name}: {len(image_features)} images encoded, {len(ev.captions)} caption lists"
            )
        # Every caption of every image is a text->image query; image->text hits on any of them.
        captions = [c for caps in ev.captions for c in caps]
        owner = np.repeat(np.arange(len(ev.captions)), [len(c) for c in ev.captions])
        text_features = texts_to_features(captions)
        if keep is not None:
            keep[name] = HeldOutFeatures(image_features, text_features, owner, [len(b) for b in batches])
        metrics.update(
            {
                prefix + k: v
                for k, v in retrieval_metrics(image_features, text_features, owner, captions).items()
            }
        )
        if ev.labels is not None and data.classnames:
            prompts = [t.format(c) for c in data.classnames for t in data.templates]
            class_features = texts_to_features(prompts).reshape(len(data.classnames), len(data.templates), -1)
            acc = zero_shot_accuracy(image_features, zero_shot_classifier(class_features), ev.labels)
            metrics.update({prefix + k: v for k, v in acc.items()})
    return metrics
