"""An evaluation suite: named zero-shot, retrieval and linear-probe sets, read once, evaluated
on any encoder (framework-free: encoders are callables on numpy, as metrics.evaluate_run's).

    specs = [parse_spec("zeroshot", "pets=data/pets_val"), parse_spec("retrieval", "coco=coco.json"),
             parse_spec("linear_probe", "pets=data/pets_train,data/pets_val")]
    loaded = load_sets(specs, image_size=224)                      # every dataset read and checked once
    scalars, details = evaluate_sets(loaded, encode_image, encode_text, tokenize)
    scalars["pets/top1"], scalars["coco/i2t_R@1"], scalars["pets/probe_top1"]

Scalars are flat "NAME/metric" floats (for metrics.jsonl, TensorBoard and eval.best): zero-shot
top1, top5 (with 5+ classes), mean_per_class_recall; retrieval i2t_/t2i_ R@1, R@5, R@10,
mean_rank, median_rank; a linear probe's probe_top1, probe_top5, probe_mean_per_class_recall.
`details[NAME]` holds what does not fit a scalar: "kind", "images" (evaluated; a probe's test
split), "skipped" (left out when read, scanned or decoded), for classification "classnames",
"per_class_recall" {class name: recall or None} and "confusion" (C x C, rows true), for retrieval
"captions", for zero-shot "templates" (their count), for a probe "train_images", "l2", "l2_sweep".

The metric definitions are CLIP_benchmark's (classification.py, metrics.py, linear_probe.py).
Retrieval is scored without the same-text rule of training's own val split, so its numbers equal
CLIP_benchmark's zeroshot_retrieval (ties aside, metrics.py).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..data.named import is_named
from ..data.samples import DataError
from ..data.transforms import CLIP_PREPROCESS, ImagePreprocess
from .classification import zero_shot_metrics
from .datasets import DataChecks, LabelledImages, read_classification
from .eval_images import image_features
from .linear_probe import linear_probe
from .metrics import retrieval_metrics, zero_shot_classifier
from .retrieval_sets import CaptionedImages, read_retrieval
from .spec import CLASSIFICATION_METRICS, KINDS, SET_METRICS, EvalSetSpec
from .templates import load_templates

OWN_TEMPLATES = "dataset"  # templates="dataset": the set's zeroshot_classification_templates.txt


@dataclass
class LoadedSet:
    """A spec with its data read: `data` (for a linear probe the training split, `test` the test
    split) and, for zero-shot, the prompt templates in `{}` form."""

    spec: EvalSetSpec
    data: LabelledImages | CaptionedImages
    image_size: int
    test: LabelledImages | None = None
    templates: list[str] | None = None
    checks: DataChecks | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def parse_spec(kind: str, text: str, templates: str = "openai") -> EvalSetSpec:
    """ "NAME=PATH" (zeroshot, retrieval) or "NAME=TRAIN,TEST" (linear_probe) -> an EvalSetSpec."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation set kind {kind!r}; use one of {', '.join(KINDS)}")
    form = "NAME=TRAIN,TEST" if kind == "linear_probe" else "NAME=PATH"
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"{kind} set {text!r}: expected {form}")
    if "/" in name or any(c.isspace() for c in name):
        raise ValueError(
            f"{kind} set {text!r}: the name {name!r} may hold no '/' or space (metrics are NAME/top1)"
        )
    if kind != "linear_probe":
        return EvalSetSpec(name, kind, path, templates=templates)
    train, sep, test = path.partition(",")
    if not sep or not train.strip() or not test.strip() or "," in test:
        raise ValueError(f"linear_probe set {text!r}: expected {form}, two paths separated by one comma")
    return EvalSetSpec(name, kind, train.strip(), test.strip(), templates=templates)


def _check_path(spec: EvalSetSpec, path: str) -> None:
    """A plain path that does not exist fails here, naming the set (patterns and named datasets,
    coco:ROOT:val, are left to the readers)."""
    if is_named(path):
        return
    if not any(c in path for c in "*?[{") and not os.path.exists(path):
        raise DataError(f"{spec.kind} set '{spec.name}': {path}: no such file or folder")
    if any(c in path for c in "*?[") and not glob.glob(path):
        raise DataError(f"{spec.kind} set '{spec.name}': {path}: the pattern matches no file")


def _templates(spec: EvalSetSpec, ds: LabelledImages) -> list[str]:
    if spec.templates == OWN_TEMPLATES:
        return ds.templates or load_templates("openai")
    return load_templates(spec.templates)


def _load_one(spec: EvalSetSpec, image_size: int, checks: DataChecks | None) -> LoadedSet:
    for path in (spec.path, spec.test_path):
        if path is not None:
            _check_path(spec, path)
    if spec.kind == "retrieval":
        return LoadedSet(
            spec, read_retrieval(spec.path, name=spec.name, data_checks=checks), image_size, checks=checks
        )
    train = read_classification(spec.path, name=spec.name, data_checks=checks)
    if spec.kind == "zeroshot":
        return LoadedSet(spec, train, image_size, templates=_templates(spec, train), checks=checks)
    test = read_classification(spec.test_path, name=f"{spec.name} (test)", data_checks=checks)
    if test.classnames != train.classnames:
        raise DataError(
            f"linear_probe set '{spec.name}': {spec.path} has classes {train.classnames[:5]}... "
            f"({len(train.classnames)}), {spec.test_path} has {test.classnames[:5]}... "
            f"({len(test.classnames)}); both splits need the same class list"
        )
    return LoadedSet(spec, train, image_size, test=test, checks=checks)


def load_sets(specs, image_size: int, checks: DataChecks | None = None) -> list[LoadedSet]:
    """Read every set once, in order; a repeated name, a missing path or a bad dataset raises a
    DataError naming the set (the readers' errors name the file and line)."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.kind not in KINDS:
            raise DataError(f"set '{spec.name}': unknown kind {spec.kind!r}; use one of {', '.join(KINDS)}")
        if spec.name in seen:
            raise DataError(
                f"set name '{spec.name}' is given twice ({seen[spec.name]}, {spec.kind}); names must differ"
            )
        seen[spec.name] = spec.kind
    return [_load_one(spec, image_size, checks) for spec in specs]


# ---------------------------------------------------------------------------
# Evaluation


def _text_features(strings: list[str], encode_text, tokenize, batch_size: int) -> np.ndarray:
    """(len(strings), E) float32: tokenized and encoded `batch_size` strings at a time."""
    parts = [encode_text(tokenize(strings[i : i + batch_size])) for i in range(0, len(strings), batch_size)]
    return np.concatenate([np.asarray(p, np.float32) for p in parts])


def _classifier(classnames: list[str], templates: list[str], texts) -> np.ndarray:
    prompts = [t.format(c) for c in classnames for t in templates]  # CLIP_benchmark's prompts
    return zero_shot_classifier(texts(prompts).reshape(len(classnames), len(templates), -1))


def class_text_features(classnames, templates, encode_text, tokenize, batch_size: int = 256) -> np.ndarray:
    """(C, E) prompt-ensembled class weights, as evaluate_sets computes them for a zero-shot set:
    every classname x template prompt encoded in batches, then metrics.zero_shot_classifier."""
    return _classifier(
        list(classnames), list(templates), lambda p: _text_features(p, encode_text, tokenize, batch_size)
    )


def _skipped(ds: LabelledImages | CaptionedImages, kept: np.ndarray) -> int:
    """Images left out of a set: skipped when read or scanned, and those that failed to decode."""
    return len(ds.skipped) + len(ds) - len(kept)


def _classification_details(m: dict, ds: LabelledImages, kept: np.ndarray) -> dict:
    return {
        "per_class_recall": m["per_class_recall"],
        "confusion": np.asarray(m["confusion"]).tolist(),
        "classnames": list(ds.classnames),
        "images": int(len(kept)),
        "skipped": _skipped(ds, kept),
    }


def _scalars(name: str, m: dict, keys, prefix: str = "") -> dict[str, float]:
    return {f"{name}/{prefix}{k}": float(m[k]) for k in keys if k in m}


def _zeroshot(s: LoadedSet, images, texts) -> tuple[dict, dict]:
    feats, kept = images(s.data)
    classifier = _classifier(s.data.classnames, s.templates, texts)
    m = zero_shot_metrics(feats, classifier, s.data.labels[kept], s.data.classnames)
    details = {"kind": "zeroshot", "templates": len(s.templates), **_classification_details(m, s.data, kept)}
    return _scalars(s.name, m, CLASSIFICATION_METRICS), details


def _retrieval(s: LoadedSet, images, texts) -> tuple[dict, dict]:
    feats, kept = images(s.data)
    captions, owner = s.data.queries(kept)
    m = retrieval_metrics(feats, texts(captions), owner)  # no same-text rule: CLIP_benchmark's numbers
    details = {"kind": "retrieval", "images": int(len(kept)), "captions": len(captions)}
    details["skipped"] = _skipped(s.data, kept)
    return _scalars(s.name, m, SET_METRICS["retrieval"]), details


def _linear_probe(s: LoadedSet, images, texts) -> tuple[dict, dict]:
    train_feats, train_kept = images(s.data)
    test_feats, test_kept = images(s.test)
    train_labels, test_labels = s.data.labels[train_kept], s.test.labels[test_kept]
    m = linear_probe(train_feats, train_labels, test_feats, test_labels, s.data.classnames)
    details = {
        "kind": "linear_probe",
        "l2": m["l2"],
        "l2_sweep": {str(k): v for k, v in m["l2_sweep"].items()},
        "train_images": int(len(train_kept)),
        **_classification_details(m, s.test, test_kept),
    }
    details["skipped"] += _skipped(s.data, train_kept)
    return _scalars(s.name, m, CLASSIFICATION_METRICS, prefix="probe_"), details


EVALUATORS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "linear_probe": _linear_probe}


def evaluate_sets(
    loaded: list[LoadedSet],
    encode_image: Callable[[np.ndarray], np.ndarray],
    encode_text: Callable[[np.ndarray], np.ndarray],
    tokenize: Callable[[list[str]], np.ndarray],
    batch_size: int = 256,
    num_workers: int = 4,
    image_size: int | None = None,
    preprocess: ImagePreprocess = CLIP_PREPROCESS,
) -> tuple[dict[str, float], dict]:
    """(flat scalars "NAME/metric", details per set) of the encoders on every loaded set.

    Images go through eval_images.image_features (the eval Loader: parallel decoding, a skipped
    image's row left out) in batches of `batch_size`, at `image_size` (default: the size the sets
    were loaded for), preprocessed as `preprocess` says (the model's: ImagePreprocess.of(config)).
    Texts are tokenized and encoded in batches of `batch_size`: a zero-shot set's classnames x
    templates prompts once per call, a retrieval set's captions."""
    scalars: dict[str, float] = {}
    details: dict = {}

    def texts(strings: list[str]) -> np.ndarray:
        return _text_features(strings, encode_text, tokenize, batch_size)

    for s in loaded:

        def images(ds, s=s):
            kw = dict(
                batch_size=batch_size, num_workers=num_workers, data_checks=s.checks, preprocess=preprocess
            )
            return image_features(ds, encode_image, image_size or s.image_size, **kw)

        values, details[s.name] = EVALUATORS[s.spec.kind](s, images, texts)
        scalars.update(values)
    return scalars, details


__all__ = [
    "KINDS",
    "EvalSetSpec",
    "LoadedSet",
    "class_text_features",
    "evaluate_sets",
    "load_sets",
    "parse_spec",
]
