"""Named datasets laid out as their publishers ship them: `data.train: coco:ROOT[:split]`,
`flickr30k:ROOT[:split]`, `cc3m:ROOT[:split]`. The split defaults to "train"; with no data.val, a
dataset that ships a val split is validated on it (`default_val`), not on a data.val_ratio share.

- coco: the official captions release, `ROOT/annotations/captions_{train,val}2017.json` (2014 when
  there is no 2017 file) with the images in `ROOT/train2017/`, `ROOT/val2017/`. The file's `images`
  ({id, file_name}) and `annotations` ({image_id, caption}) are joined: every caption of an image goes
  into its one Sample. Splits: train, val.
- flickr30k: Karpathy's split file `ROOT/dataset_flickr30k.json` ({"images": [{"filename", "split",
  "sentences": [{"raw"}]}]}; splits train (with restval), val, test, restval) or, without it, the
  Kaggle `results.csv` (`image_name| comment_number| comment`, no splits: val from data.val_ratio),
  at ROOT or in `ROOT/flickr30k_images/`. Images in the first folder of FLICKR_IMAGE_DIRS that
  exists: the official tarball unpacks to `flickr30k-images/`, the Kaggle zip to
  `flickr30k_images/flickr30k_images/`.
- cc3m: img2dataset's output (WebDataset .tar shards, or Parquet with image bytes; the `_stats.json`
  and .parquet index files beside the shards are not read) in ROOT or in `ROOT/train` /
  `ROOT/training`, val in `ROOT/val` / `ROOT/validation` when there is one. Read by the tar and
  Parquet readers (tar_shards.py, parquet.py).

An annotation naming an image that is not on disk is a `missing_file` skip and a malformed entry a
`bad_row` skip naming the file and entry, as in every format (data.validate, the skip log and the
data.max_bad_fraction rule apply). A missing annotation file or image folder is a DataError that lists
what was looked for.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import NamedDataset
from .parquet import parquet_paths, read_parquet
from .samples import Collector, DataError, decode_text, open_text
from .tar_shards import read_tar, shard_paths

NAMES = typing.get_args(NamedDataset)
COCO_YEARS = ("2017", "2014")
FLICKR_KARPATHY = "dataset_flickr30k.json"
FLICKR_RESULTS = ("results.csv", "flickr30k_images/results.csv")
FLICKR_IMAGE_DIRS = ("flickr30k_images/flickr30k_images", "flickr30k_images", "flickr30k-images", "images")
FLICKR_HEADER = ["image_name", "comment_number", "comment"]
CC3M_DIRS = {"train": ("train", "training"), "val": ("val", "validation")}
SPLITS = {
    "coco": ("train", "val"),
    "flickr30k": ("train", "val", "test", "restval"),
    "cc3m": ("train", "val"),
}
KARPATHY_SPLITS = {"train": ("train", "restval")}  # another split is read as itself


@dataclass(frozen=True)
class NamedSource:
    name: str  # one of NAMES
    root: Path
    split: str | None  # None: train

    def spec(self, split: str) -> str:
        return f"{self.name}:{self.root}:{split}"


def is_named(source) -> bool:
    return str(source).startswith(tuple(f"{n}:" for n in NAMES))


def parse(source: str, fmt: str | None = None) -> NamedSource:
    """`NAME:ROOT[:split]` (or a plain ROOT read as format `fmt`) -> a NamedSource; ROOT must be a folder
    and the split one the dataset has."""
    name, _, rest = source.partition(":") if is_named(source) else (fmt, "", source)
    if name not in NAMES:
        raise DataError(f"{source}: not a named dataset (expected {', '.join(f'{n}:ROOT' for n in NAMES)})")
    path, split = rest, None
    if not os.path.exists(rest) and ":" in rest:
        path, split = rest.rsplit(":", 1)
    if not os.path.isdir(path):
        raise DataError(f"{source}: {path}: no such folder (the root of the {name} dataset)")
    if split is not None and split not in SPLITS[name]:
        raise DataError(f"{source}: {name} has no split '{split}' (splits: {', '.join(SPLITS[name])})")
    return NamedSource(name, Path(path), split)


def json_field(entry, key: str, where: str, kind: type = object):
    """entry[key], of type `kind`; a bad_row DataError naming `where` and the key when it is not."""
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: no '{key}' field", "bad_row", where)
    if not isinstance(entry[key], kind):
        raise DataError(
            f"{where}: '{key}' must be a {kind.__name__}, got {entry[key]!r:.80}", "bad_row", where
        )
    return entry[key]


def load_json(path: Path, layout: str):
    try:
        return json.loads(decode_text(path.read_bytes(), str(path)))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({layout})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


# ---------------------------------------------------------------------------
# COCO captions


def _coco_files(src: NamedSource, split: str) -> tuple[Path, Path]:
    """(the split's captions JSON, its image folder)."""
    looked = []
    for year in COCO_YEARS:
        ann = src.root / "annotations" / f"captions_{split}{year}.json"
        looked.append(f"annotations/captions_{split}{year}.json with images in {split}{year}/")
        if ann.is_file():
            images = src.root / f"{split}{year}"
            if not images.is_dir():
                raise DataError(f"{images}: no such folder (the images of {ann}; COCO layout)")
            return ann, images
    raise DataError(f"{src.root}: not the COCO captions layout: looked for {' or '.join(looked)}")


def _coco_captions(ann: Path, annotations, out: Collector) -> dict[int, list]:
    """image id -> its captions, in file order."""
    captions: dict[int, list] = {}
    for j, a in enumerate(annotations):
        where = f"{ann}: annotations[{j}]"
        try:
            image_id = json_field(a, "image_id", where, int)
            captions.setdefault(image_id, []).append(json_field(a, "caption", where))
        except DataError as e:
            out.fail(e)
    return captions


def _read_coco(src: NamedSource, split: str, out: Collector) -> None:
    ann, folder = _coco_files(src, split)
    data = load_json(ann, "COCO captions")
    images = json_field(data, "images", str(ann), list)
    captions = _coco_captions(ann, json_field(data, "annotations", str(ann), list), out)
    base, seen = str(folder.resolve()), set()
    for i, im in enumerate(images):
        where, image_id = f"{ann}: images[{i}]", None
        try:
            image_id = json_field(im, "id", where, int)
            if image_id in seen:
                raise DataError(f"{where}: id {image_id} is given to an earlier image too", "bad_row", where)
            file_name = json_field(im, "file_name", where, str)
        except DataError as e:
            if image_id not in seen:  # its captions go with it: one skip, not one per caption
                captions.pop(image_id, None)
            out.fail(e)
            continue
        seen.add(image_id)
        path = os.path.normpath(os.path.join(base, file_name))
        if image_id in captions:
            out.add(path, captions.pop(image_id), where)
        else:
            out.fail(DataError(f"{where}: {file_name} has no caption in 'annotations'", "unpaired", path))
    for image_id in captions:  # captions of no listed image
        where = f"{ann}: annotations (image_id {image_id})"
        out.fail(DataError(f"{where}: no image with this id in 'images'", "bad_row", where))


# ---------------------------------------------------------------------------
# Flickr30k


def _flickr_files(src: NamedSource) -> tuple[Path, Path]:
    """(dataset_flickr30k.json or results.csv, the image folder)."""
    candidates = [FLICKR_KARPATHY, *FLICKR_RESULTS]
    ann = next((src.root / c for c in candidates if (src.root / c).is_file()), None)
    if ann is None:
        raise DataError(
            f"{src.root}: not a Flickr30k layout: looked for {', '.join(candidates)} "
            f"with images in {'/, '.join(FLICKR_IMAGE_DIRS)}/"
        )
    images = next((src.root / d for d in FLICKR_IMAGE_DIRS if (src.root / d).is_dir()), None)
    if images is None:
        raise DataError(
            f"{src.root}: no image folder for {ann.name}: looked for {'/, '.join(FLICKR_IMAGE_DIRS)}/"
        )
    return ann, images


def karpathy_entry(entry, root: str, where: str) -> tuple[str, list[str]]:
    """One `images[i]` of a Karpathy split file -> (image path under `root`, its raw captions); a
    bad_row DataError for a missing or mistyped field."""
    filename = json_field(entry, "filename", where, str)
    folder = json_field(entry, "filepath", where, str) if "filepath" in entry else ""
    sentences = json_field(entry, "sentences", where, list)
    if not sentences:
        raise DataError(f"{where}: 'sentences' is empty; a retrieval image needs a caption", "bad_row", where)
    raw = [json_field(s, "raw", f"{where}: sentences[{j}]", str) for j, s in enumerate(sentences)]
    return os.path.normpath(os.path.join(root, folder, filename)), raw


def _read_karpathy(ann: Path, images: Path, split: str, out: Collector) -> None:
    entries = json_field(load_json(ann, "Karpathy split file"), "images", str(ann), list)
    wanted, found, root = KARPATHY_SPLITS.get(split, (split,)), {}, str(images.resolve())
    for i, entry in enumerate(entries):
        where = f"{ann}: images[{i}]"
        try:
            entry_split = json_field(entry, "split", where, str)
            found[entry_split] = found.get(entry_split, 0) + 1
            if entry_split in wanted:
                out.add(*karpathy_entry(entry, root, where), where)
        except DataError as e:
            out.fail(e)
    if not any(s in found for s in wanted):
        splits = ", ".join(f"{k} ({n})" for k, n in found.items()) or "none"
        raise DataError(f"{ann}: no image has split '{split}' (splits: {splits})")


def _read_results(ann: Path, images: Path, out: Collector) -> None:
    """results.csv: `image_name| comment_number| comment` lines, one caption each."""
    base = str(images.resolve())
    with open_text(ann) as f:
        header = [c.strip() for c in f.readline().split("|")]
        if header != FLICKR_HEADER:
            raise DataError(
                f"{ann}:1: expected the header '{'| '.join(FLICKR_HEADER)}', got {'|'.join(header)!r}"
            )
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("|", 2)
            where = f"{ann}:{lineno}"
            if len(fields) < 3 or not fields[0].strip():
                out.fail(
                    DataError(f"{where}: expected 'image_name| comment_number| comment'", "bad_row", where)
                )
            else:
                out.add(os.path.normpath(os.path.join(base, fields[0].strip())), fields[2], where)


def _read_flickr(src: NamedSource, split: str, out: Collector) -> None:
    ann, images = _flickr_files(src)
    if ann.name == FLICKR_KARPATHY:
        _read_karpathy(ann, images, split, out)
    elif src.split is not None:
        raise DataError(
            f"{src.spec(src.split)}: {ann} has no splits; use flickr30k:{src.root} (val from "
            f"data.val_ratio), or put Karpathy's {FLICKR_KARPATHY} in {src.root} for its splits"
        )
    else:
        _read_results(ann, images, out)


# ---------------------------------------------------------------------------
# CC3M (img2dataset's output)


def _cc3m_folder(src: NamedSource, split: str) -> tuple[Path | None, str]:
    """(the split's folder, "tar" or "parquet"); (None, "") for a val split it does not have."""
    folder = next((src.root / d for d in CC3M_DIRS[split] if (src.root / d).is_dir()), None)
    if folder is None and split == "train":
        folder = src.root
    if folder is None:
        if src.split == split:
            looked = "/ or ".join(CC3M_DIRS[split])
            raise DataError(f"{src.spec(split)}: no {split} split: looked for {src.root}/{looked}/")
        return None, ""
    names = os.listdir(folder)
    for ext in ("tar", "parquet"):  # tars first: img2dataset writes a .parquet index beside each
        if any(n.endswith(f".{ext}") for n in names):
            return folder, ext
    raise DataError(
        f"{folder}: no .tar shards or .parquet files (CC3M as img2dataset writes it, in {src.root} or "
        f"{'/, '.join(CC3M_DIRS['train'])}/ with val in {'/, '.join(CC3M_DIRS['val'])}/)"
    )


def _read_cc3m(src: NamedSource, split: str, out: Collector, image_key: str, caption_key: str) -> None:
    folder, fmt = _cc3m_folder(src, split)
    if fmt == "tar":
        for shard in shard_paths(str(folder)):
            read_tar(shard, out)
    else:
        read_parquet(str(folder), out, image_key, caption_key)


# ---------------------------------------------------------------------------
# Entry points


def read_named(source: str, fmt: str, out: Collector, image_key: str, caption_key: str) -> None:
    """Every sample of the named dataset's split into `out` (readers.read_into's hook)."""
    src = parse(source, fmt)
    split = src.split or "train"
    if src.name == "coco":
        _read_coco(src, split, out)
    elif src.name == "flickr30k":
        _read_flickr(src, split, out)
    else:
        _read_cc3m(src, split, out, image_key, caption_key)


def default_val(train: str, fmt: str = "auto") -> str | None:
    """The val split of a named train source read as its train split (`coco:ROOT:val`), when the
    dataset ships one; None otherwise (val then comes from data.val_ratio)."""
    if not (is_named(train) or fmt in NAMES):
        return None
    src = parse(train, fmt)
    if src.split not in (None, "train"):
        return None
    if src.name == "coco":
        has_val = any((src.root / "annotations" / f"captions_val{y}.json").is_file() for y in COCO_YEARS)
    elif src.name == "flickr30k":
        has_val = _flickr_files(src)[0].name == FLICKR_KARPATHY
    else:
        has_val = _cc3m_folder(src, "val")[0] is not None
    return src.spec("val") if has_val else None


def check_val(val: str, fmt: str = "auto") -> None:
    """data.val naming a named dataset must say its split: `coco:ROOT` alone would read train."""
    if (is_named(val) or fmt in NAMES) and parse(val, fmt).split is None:
        raise DataError(f"data.val: {val} reads the train split; name the split: {val}:val")


def source_files(source: str, fmt: str = "auto") -> list[str]:
    """The annotation file or shards a named source is read from (resume fingerprints)."""
    src = parse(source, fmt)
    split = src.split or "train"
    if src.name == "coco":
        return [str(_coco_files(src, split)[0])]
    if src.name == "flickr30k":
        return [str(_flickr_files(src)[0])]
    folder, kind = _cc3m_folder(src, split)
    return shard_paths(str(folder)) if kind == "tar" else parquet_paths(str(folder))


__all__ = [
    "NAMES",
    "check_val",
    "default_val",
    "is_named",
    "json_field",
    "karpathy_entry",
    "parse",
    "read_named",
    "source_files",
]
