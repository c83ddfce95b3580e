"""A run's evaluation: zero-shot and retrieval metrics and the training loss on its held-out split,
and the config's named eval sets (eval.sets: evaluation/suite.py), read once at set-up."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import Config
from ..data.checks import SkipLog
from ..data.run_data import RunData
from ..data.samples import DataError
from ..data.transforms import ImagePreprocess
from ..evaluation.datasets import DataChecks
from ..evaluation.metrics import HeldOutFeatures, evaluate_run
from ..evaluation.suite import LoadedSet, evaluate_sets, load_sets
from ..models.model import CLIP
from ..models.streams import Encoders
from .build import make_loss_parts


def evaluate(model: CLIP, data: RunData, cfg: Config | None = None) -> dict:
    """Zero-shot and retrieval metrics of `model` on the run's held-out sets, and with `cfg` the
    training loss on the val set (`val_loss`)."""
    kept: dict[str, HeldOutFeatures] = {}
    metrics = evaluate_run(
        data,
        encode_image=Encoders.of(model).image,
        encode_text=Encoders.of(model).text,
        keep=kept,
    )
    if cfg is not None and "val" in data.evals:
        metrics["val_loss"] = val_loss(model, cfg, kept["val"])
    return metrics


def val_loss(model: CLIP, cfg: Config, features: HeldOutFeatures) -> float:
    """The training objective on the val set, in float32 at the current temperature, from the
    features evaluate_run computed (float32, L2-normalised: what encode_pair gives a float32 model),
    so the held-out images and captions are encoded once per evaluation, not twice."""
    _, features_loss = make_loss_parts(cfg)  # one process: rank 0 evaluates alone
    losses = [
        (features_loss(model, mx.array(images), mx.array(texts)).item(), len(texts))
        for images, texts in features.val_pairs()
    ]
    return float(np.average([x for x, _ in losses], weights=[n for _, n in losses])) if losses else math.nan


def load_eval_sets(cfg: Config, skip_log: SkipLog | None) -> list[LoadedSet]:
    """eval.sets read once (rank 0, before step 1) at the model's image size, with the run's own
    data checks (data.validate, data.max_bad_fraction, ...): skipped images go to `skip_log`, the
    run's skipped.jsonl. A missing path or a bad set raises a DataError naming the set."""
    if not cfg.eval.sets:
        return []
    d = cfg.data
    checks = DataChecks(
        mode=d.validate,
        max_bad_fraction=d.max_bad_fraction,
        max_image_pixels=d.max_image_pixels,
        max_aspect_ratio=d.max_aspect_ratio or None,
        max_caption_chars=d.max_caption_chars,
        log=skip_log,
    )
    loaded, size = [], cfg.model_config().image_size
    for spec in cfg.eval.sets:  # one at a time, so that every error names its set
        try:
            loaded += load_sets([spec], size, checks)
        except DataError as e:
            if repr(spec.name) in str(e):
                raise
            raise DataError(f"eval.sets '{spec.name}' ({spec.kind}): {e}") from e
    for s in loaded:
        images = len(s.data) if s.test is None else f"{len(s.data)} train + {len(s.test)} test"
        print(f"eval set {s.name} ({s.spec.kind}): {images} images", flush=True)
    return loaded


def evaluate_eval_sets(model: CLIP, data: RunData, loaded: list[LoadedSet], cfg: Config) -> tuple[dict, dict]:
    """(flat "NAME/metric" scalars, per-set details) of `model` on the loaded eval sets, with the
    run's tokenizer, in batches of data.batch_size."""
    return evaluate_sets(
        loaded,
        encode_image=Encoders.of(model).image,
        encode_text=Encoders.of(model).text,
        tokenize=data.tokenize,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        preprocess=ImagePreprocess.of(model.config),  # the model's own pixels (data/transforms.py)
    )


def pick_best_metric(cfg: Config, metrics: dict) -> str | None:
    """The metric that picks the best checkpoint: eval.best, or with "auto" zero-shot top-1
    (else image-to-text R@1) when the evaluation has it."""
    if cfg.eval.best != "auto":
        return cfg.eval.best
    for name in ("zeroshot_top1", "i2t_R@1"):
        if name in metrics:
            return name
    return None
