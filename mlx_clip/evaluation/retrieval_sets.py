"""Evaluation sets on disk for image-text retrieval: images, each with one or more captions.

    ds = read_retrieval("dataset_coco.json", image_root="coco/")  # Karpathy split, "test" by default
    ds = read_retrieval("my_val.csv")                            # any source training reads
    feats, kept = image_features(ds, encode_image, 224)           # eval_images.py
    texts, owner = ds.queries(kept)                               # -> metrics.retrieval_metrics

Sources (`read_retrieval` tells them apart from the path):
- Karpathy-split JSON (COCO, Flickr30k): `{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}, ...]}, ...]}`; image i is `image_root/filepath/filename` (image_root
  defaults to the JSON's folder) and its captions are the `raw` sentences, all of them, in order;
  only images whose `split` equals `split` are read. A missing field is a DataError naming the
  file, the image's index and the field.
- anything training reads (CSV/TSV, JSON/JSONL, a folder, tar shards, a named dataset's split such
  as `coco:ROOT:val`: data/readers.py), and a
  CLIP_benchmark retrieval folder (`<split>/*.tar` of image + `.txt`); captions are merged per
  image as in training.

Bad images and captions are skipped and counted as in training (datasets.DataChecks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.named import json_field, karpathy_entry, load_json
from ..data.samples import Collector, DataError, Sample, Skip, TarRef, clean_captions
from ..data.tar_shards import read_tar
from .datasets import DataChecks, wds_shards


@dataclass
class CaptionedImages:
    """A retrieval set: image i with its captions `captions[i]` (at least one each)."""

    name: str
    images: list[str | TarRef]
    captions: list[list[str]]
    skipped: list[Skip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def samples(self) -> list[Sample]:
        return [Sample(im, caps) for im, caps in zip(self.images, self.captions, strict=True)]

    def queries(self, kept: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """(every caption of the images `kept`, in order; the position in `kept` of each one's image):
        the text side of metrics.retrieval_metrics. kept None: every image."""
        kept = np.arange(len(self.images)) if kept is None else np.asarray(kept)
        groups = [self.captions[i] for i in kept.tolist()]
        texts = [c for caps in groups for c in caps]
        return texts, np.repeat(np.arange(len(groups)), [len(c) for c in groups])


def _captioned(name: str, samples: list[Sample], skipped: list[Skip], data_checks) -> CaptionedImages:
    report = (data_checks or DataChecks()).keep(samples, source=name, skipped=skipped)
    images, captions = [s.image for s in report.samples], [s.captions for s in report.samples]
    return CaptionedImages(name, images, captions, report.skipped)


def _karpathy_image(entry, root: Path, where: str, skipped: list[Skip]) -> Sample | None:
    """One `images[i]` entry -> its Sample (None when every caption is bad, which is skipped)."""
    image, raw = karpathy_entry(entry, str(root), where)
    good, bad = clean_captions(raw, where, None, image)
    skipped.extend(Skip(e.item or image, e.reason, str(e)) for e in bad)
    return Sample(image, good) if good else None


def read_karpathy(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    *,
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> CaptionedImages:
    """A Karpathy-split JSON's `split` images (see the module doc) -> a CaptionedImages."""
    path = Path(path)
    images = json_field(load_json(path, "Karpathy split file"), "images", str(path), list)
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (the image root of {path})")
    samples, skipped, splits = [], [], {}
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        entry_split = json_field(entry, "split", where, str)
        splits[entry_split] = splits.get(entry_split, 0) + 1
        if entry_split == split:
            sample = _karpathy_image(entry, root.resolve(), where, skipped)
            if sample is not None:
                samples.append(sample)
    if split not in splits:
        found = ", ".join(f"{k} ({n})" for k, n in splits.items()) or "none"
        raise DataError(f"{path}: no image has split '{split}' (splits: {found})")
    return _captioned(name or f"{path} [{split}]", samples, skipped, data_checks)


def read_captioned(
    source: str | os.PathLike,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    fmt: str = "auto",
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> CaptionedImages:
    """Any source training reads (data/readers.py) -> a CaptionedImages, bad items skipped as in
    training: checks.prepare reads it, so its reader's skips are counted too."""
    kw = dict(image_key=image_key, caption_key=caption_key, fmt=fmt, source=name)
    report = (data_checks or DataChecks()).keep(source, **kw)
    images, captions = [s.image for s in report.samples], [s.captions for s in report.samples]
    return CaptionedImages(name or str(source), images, captions, report.skipped)


def _is_karpathy(path: str) -> bool:
    """A .json whose first character opens an object (training's JSON is a list)."""
    if not path.endswith(".json") or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    return head.startswith("{")


def read_retrieval(
    source: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    split: str = "test",
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> CaptionedImages:
    """A Karpathy JSON, a CLIP_benchmark retrieval folder (`split/*.tar`) or any training source."""
    s = str(source)
    kw = dict(name=name, data_checks=data_checks)
    if _is_karpathy(s):
        return read_karpathy(s, image_root, split, **kw)
    if os.path.isdir(s) and (Path(s, split, "nshards.txt").is_file() or any(Path(s, split).glob("*.tar"))):
        skipped: list[Skip] = []
        out = Collector(None, skipped)  # as read_samples reads shards, bad members skipped
        for shard in wds_shards(s, split)[0]:
            read_tar(shard, out)
        return _captioned(name or s, out.samples(check_files=False), skipped, data_checks)
    return read_captioned(s, **kw)


__all__ = ["CaptionedImages", "read_captioned", "read_karpathy", "read_retrieval"]
