"""Evaluation sets on disk: labelled images for zero-shot classification, read offline.

    ds = read_classification("imagenet_val/")           # a LabelledImages, whatever the layout
    feats, kept = image_features(ds, encode_image, 224)  # eval_images.py: one parallel decoding pass
    labels = ds.labels[kept]

Layouts (`read_classification` tells them apart from the path):
- an ImageFolder tree `root/<class>/**/<image>`: a class per sub-folder, in sorted name order; its
  name is the folder's with `_` as a space, or line i of `root/classnames.txt` (or `classnames=`);
- CLIP_benchmark's WebDataset layout: `root/<split>/{0..n-1}.tar` (`nshards.txt` says n; any
  `*.tar` there, or in root, also do) holding `<key>.cls` (the class index as text) with
  `<key>.jpg|jpeg|png|webp`, and `root/classnames.txt`, optionally
  `root/zeroshot_classification_templates.txt` (the set's own prompts). A shard path, glob or
  brace pattern works too; classnames.txt is then looked for beside the shards and one level up;
- a CSV/TSV/JSON/JSONL table (training's readers) with an image column and a label column, a
  label being a class name or an integer index (a name wins when both could apply), plus a class
  list: `classnames.txt` beside the table, or `classnames=` (a file, or "imagenet").
A `zeroshot_classification_templates.txt` beside the class list (in the ImageFolder root, the
CLIP_benchmark folder, beside the table) gives the set's own prompts (`templates`, `{}` form);
without one, `templates` is None and the caller picks (templates.load_templates).

Bad input: a missing or malformed layout, an empty class folder, a class list whose length does
not fit, or a label outside the class list is a DataError naming the file (and line). Bad images
are skipped and counted as in training (data/checks.py): the reader's skips and a header scan
before evaluation (`DataChecks`, the same settings as `data.*`), then any image that still fails
to decode is left out of the batches (eval_images.py); all of them reach the same `SkipLog`.
Retrieval sets are in retrieval_sets.py, their shared pieces here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import checks
from ..data.readers import detect_format, read_into
from ..data.samples import IMAGE_EXTENSIONS, Collector, DataError, Sample, Skip, TarRef
from ..data.tar_shards import read_tar, shard_paths
from .templates import load_classnames, load_templates

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark's name


@dataclass
class LabelledImages:
    """A zero-shot classification set: image i has class `labels[i]`, named `classnames[labels[i]]`."""

    name: str
    images: list[str | TarRef]
    labels: np.ndarray  # int64 (N,)
    classnames: list[str]
    templates: list[str] | None = None  # the set's own prompts ({} form), if it has a templates file
    skipped: list[Skip] = field(default_factory=list)  # read and scan skips (see the module doc)

    def __len__(self) -> int:
        return len(self.images)

    def samples(self) -> list[Sample]:
        """What the loader reads: each image with its class name as its caption."""
        return [
            Sample(im, [self.classnames[k]]) for im, k in zip(self.images, self.labels.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class DataChecks:
    """How bad images are found and reported: the training run's `data.*` settings (data/checks.py)."""

    mode: str = "header"  # data.validate: "header" | "full" | "off"
    max_bad_fraction: float = checks.DEFAULT_MAX_BAD_FRACTION
    max_image_pixels: int | None = checks.DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float | None = checks.DEFAULT_MAX_ASPECT_RATIO
    max_caption_chars: int | None = checks.DEFAULT_MAX_CAPTION_CHARS
    log: checks.SkipLog | None = None  # every skip as a JSON line (a run's skipped.jsonl); None: no file

    def keep(self, data, **kw) -> checks.Report:
        """checks.prepare on a set (a source path, or samples with `source=` naming them and
        `skipped=` their reader's skips): scan, log, warn with the counts, and raise (naming the
        first bad items) when none is left or more than max_bad_fraction are bad."""
        return checks.prepare(
            data,
            log=self.log,
            max_bad_fraction=self.max_bad_fraction,
            mode=self.mode,
            max_image_pixels=self.max_image_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            max_caption_chars=self.max_caption_chars,
            **kw,
        )


def _labelled(
    name: str, samples: list[Sample], skipped, classnames, templates, data_checks
) -> LabelledImages:
    """The kept samples of a scan, each carrying its class index as its one caption, as a set."""
    report = (data_checks or DataChecks()).keep(samples, source=name, skipped=skipped)
    labels = np.array([int(s.captions[0]) for s in report.samples], np.int64)
    return LabelledImages(
        name, [s.image for s in report.samples], labels, classnames, templates, report.skipped
    )


def _own_templates(folders: list[Path]) -> list[str] | None:
    """A set's own prompts: the first zeroshot_classification_templates.txt among `folders`."""
    own = next((f / TEMPLATES_FILE for f in folders if (f / TEMPLATES_FILE).is_file()), None)
    return load_templates(own) if own is not None else None


def _fit_classnames(spec: str | os.PathLike, expected: int, what: str) -> list[str]:
    names = load_classnames(spec)
    if len(names) != expected:
        raise DataError(
            f"{spec}: {len(names)} class names but {expected} {what}; line i names class i, one per line"
        )
    return names


# ---------------------------------------------------------------------------
# ImageFolder


def _images_under(folder: Path) -> list[Path]:
    """Image files below `folder` (any depth), sorted; hidden files and folders are left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def read_image_folder(
    root: str | os.PathLike,
    classnames: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> LabelledImages:
    """`root/<class>/**/<image>` -> a LabelledImages; class k is the k-th sub-folder in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    base = root.resolve()
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{root}: no class folders; expected one sub-folder of images per class ({root}/cat/1.jpg)"
        )
    listed = classnames if classnames is not None else root / CLASSNAMES_FILE
    if classnames is not None or Path(listed).is_file():
        names = _fit_classnames(listed, len(folders), f"class folders in {root}")
    else:
        names = [f.name.replace("_", " ") for f in folders]
    samples = []
    for label, folder in enumerate(folders):
        images = _images_under(folder)
        if not images:
            raise DataError(
                f"{folder}: empty class folder (class {label}, '{names[label]}'): no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        samples += [Sample(str(p), [str(label)]) for p in images]
    return _labelled(name or str(root), samples, [], names, _own_templates([root]), data_checks)


# ---------------------------------------------------------------------------
# CLIP_benchmark's WebDataset layout


def wds_shards(source: str | os.PathLike, split: str = "test") -> tuple[list[str], list[Path]]:
    """(shard paths, folders to look for classnames.txt in) of a CLIP_benchmark-style set: a folder
    (`<split>/nshards.txt` + `{0..n-1}.tar`, else `<split>/*.tar`, else `*.tar`), or a shard pattern."""
    if not os.path.isdir(source):
        shards = shard_paths(str(source))
        here = Path(shards[0]).parent
        return shards, [here, here.parent]
    root, split_dir = Path(source), Path(source) / split
    count = split_dir / "nshards.txt"
    if count.is_file():
        text = count.read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(r"\d+", text) or int(text) < 1:
            raise DataError(f"{count}: expected the number of shards (a positive integer), got {text[:40]!r}")
        return shard_paths(f"{split_dir}/{{0..{int(text) - 1}}}.tar"), [root]
    for folder in (split_dir, root):
        found = sorted(folder.glob("*.tar")) if folder.is_dir() else []
        if found:
            return [str(p.resolve()) for p in found], [root]
    raise DataError(
        f"{root}: no tar shards in {split_dir} or {root} (CLIP_benchmark layout: {split}/0.tar, ...)"
    )


def _cls_label(image: TarRef, lines: list[str], where: str, n_classes: int, names_file) -> int:
    text = lines[0] if len(lines) == 1 else " / ".join(lines)
    if len(lines) != 1 or not re.fullmatch(r"\d+", text) or int(text) >= n_classes:
        raise DataError(
            f"{where}: label {text[:40]!r} of {image.name} is not a class index 0..{n_classes - 1} "
            f"({names_file} names {n_classes} classes)"
        )
    return int(text)


def read_wds_classification(
    source: str | os.PathLike,
    split: str = "test",
    classnames: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> LabelledImages:
    """CLIP_benchmark's classification shards (`.cls` + image) -> a LabelledImages, with the set's
    own templates when its folder has zeroshot_classification_templates.txt."""
    shards, folders = wds_shards(source, split)
    if classnames is not None:
        names_file = classnames
    else:
        names_file = next((f / CLASSNAMES_FILE for f in folders if (f / CLASSNAMES_FILE).is_file()), None)
        if names_file is None:
            where = " or ".join(str(f) for f in folders)
            raise DataError(f"{source}: no {CLASSNAMES_FILE} in {where}; give the class list (classnames=)")
    names = load_classnames(names_file)
    skipped: list[Skip] = []
    out = Collector(None, skipped)  # unpaired members and cut shards are skipped, as in training
    for shard in shards:
        read_tar(shard, out, text_field="cls")
    samples = [
        Sample(s.image, [str(_cls_label(s.image, s.captions, out.where[s.image], len(names), names_file))])
        for s in out.samples(check_files=False)
    ]
    return _labelled(name or str(source), samples, skipped, names, _own_templates(folders), data_checks)


# ---------------------------------------------------------------------------
# A table with an image and a label column


class LabelError(DataError):
    """A label that names no class: always raised, never skipped (the class list is wrong)."""


class _Labels(Collector):
    """A Collector whose "captions" are labels: each becomes its class index (as text), checked
    against the class list where it is read, so an error names the file and line."""

    def __init__(self, classnames: list[str], names_file: str, skipped: list[Skip]):
        super().__init__(None, skipped)
        self.classnames, self.names_file = classnames, names_file
        self.by_name: dict[str, list[int]] = {}
        for i, n in enumerate(classnames):
            self.by_name.setdefault(n, []).append(i)

    def fail(self, e: DataError) -> None:
        if isinstance(e, LabelError):
            raise e
        super().fail(e)

    def index(self, label, where: str) -> int:
        n = len(self.classnames)
        hint = f"; a label is a class name of {self.names_file} ({n} classes) or an index 0..{n - 1}"
        if isinstance(label, str):
            hits = self.by_name.get(label.strip(), [])
            if len(hits) > 1:
                raise LabelError(
                    f"{where}: label {label!r} names classes {hits} of {self.names_file}; use the index"
                )
            if hits:
                return hits[0]
            if re.fullmatch(r"\d+", label.strip()):
                label = int(label.strip())
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n:
            raise LabelError(f"{where}: label {label!r} is not in the class list{hint}")
        return label

    def add(self, image: str | TarRef, captions, where: str) -> None:
        k = str(self.index(captions, where))
        if self.captions.get(image, [k]) != [k]:
            first = self.captions[image][0]
            raise LabelError(
                f"{where}: {image} is labelled class {k} here, class {first} at {self.where[image]}"
            )
        super().add(image, k, where)


def read_labelled_table(
    path: str | os.PathLike,
    classnames: str | os.PathLike | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> LabelledImages:
    """A CSV/TSV/JSON/JSONL of (image, label) rows and a class list (`classnames`: a file or
    "imagenet"; default: classnames.txt beside the table) -> a LabelledImages."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt not in ("csv", "tsv", "json", "jsonl"):
        raise DataError(f"{path}: a labelled table must be .csv, .tsv, .json or .jsonl")
    names_file = classnames if classnames is not None else path.parent / CLASSNAMES_FILE
    if classnames is None and not Path(names_file).is_file():
        raise DataError(
            f"{path}: no class list; write {names_file} (one class name per line) or give classnames="
        )
    names = load_classnames(names_file)
    skipped: list[Skip] = []
    out = _Labels(names, str(names_file), skipped)
    read_into(out, path, fmt, image_key, label_key)
    samples = out.samples(check_files=True)
    return _labelled(name or str(path), samples, skipped, names, _own_templates([path.parent]), data_checks)


# ---------------------------------------------------------------------------
# Any of them


def read_classification(
    source: str | os.PathLike,
    classnames: str | os.PathLike | None = None,
    *,
    split: str = "test",
    name: str | None = None,
    data_checks: DataChecks | None = None,
) -> LabelledImages:
    """An ImageFolder tree, CLIP_benchmark shards (a folder holding .tar files in itself or in
    `split/`, or a .tar pattern) or a labelled table, told apart from the path."""
    kw = dict(name=name, data_checks=data_checks)
    s = str(source)
    if os.path.isdir(s):
        root = Path(s)
        if (
            (root / split / "nshards.txt").is_file()
            or any((root / split).glob("*.tar"))
            or any(root.glob("*.tar"))
        ):
            return read_wds_classification(s, split, classnames, **kw)
        return read_image_folder(s, classnames, **kw)
    if s.endswith(".tar"):
        return read_wds_classification(s, split, classnames, **kw)
    return read_labelled_table(s, classnames, **kw)


__all__ = [
    "DataChecks",
    "LabelError",
    "LabelledImages",
    "read_classification",
    "read_image_folder",
    "read_labelled_table",
    "read_wds_classification",
    "wds_shards",
]
