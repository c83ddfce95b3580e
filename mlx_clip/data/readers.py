"""Dataset readers: turn a user's image-caption source into `list[Sample]`.

Supported sources (auto-detected from the path, see `read_samples`):

- `data.csv` / `data.tsv`: a header row with an image column and a caption column;
- `data.json` (a list of objects) / `data.jsonl` (one object per line), with an image
  key and a caption key whose value is a string or a list of strings (`captions` works too);
- a folder of images with `captions.txt` (`name<TAB>caption` lines) or with a sidecar
  `.txt` per image (one caption per non-empty line);
- WebDataset `.tar` shards (`key.jpg|jpeg|png|webp` + `key.txt`, one caption per non-empty
  line; a key's second `.txt` member adds its lines) given as a path, a glob
  (`shards/*.tar`) or a brace pattern (`shards-{000..009}.tar`, `{a,b}.tar`). Shards are
  indexed, not extracted: a sample holds a `TarRef` (shard, byte offset, size) that is
  read when the loader decodes it. A folder holding .tar files (img2dataset's output) reads them;
- Parquet files (`data.parquet`, `parts/*.parquet`, a folder of them): data/parquet.py;
- `hf:DIR[:split]`, a Hugging Face `datasets` save_to_disk folder: data/hf_disk.py;
- `coco:ROOT`, `flickr30k:ROOT`, `cc3m:ROOT` (`[:split]`), named datasets as their publishers ship
  them: data/named.py.

Every text file is read as UTF-8 (samples.open_text / decode_text): a byte-order mark is
skipped in every format alike, a UTF-16 or UTF-32 file is refused with a message naming it, and
bytes that are not UTF-8 cost the caption they are in (caption_not_utf8, naming file and line).
Image paths are resolved relative to the file that names them; absolute and `../` paths are
read as they are (a list may point anywhere its user can read).

The shared sample model, caption checks and skip reasons are in samples.py; tar shards in
tar_shards.py.
"""

from __future__ import annotations

import csv
import json
import os
import typing
from pathlib import Path

import numpy as np

from ..config import SourceFormat
from .hf_disk import parse_source as hf_parse
from .hf_disk import read_hf
from .named import NAMES, is_named, read_named
from .named import parse as named_parse
from .parquet import read_parquet
from .samples import IMAGE_EXTENSIONS, Collector, DataError, Sample, Skip, decode_text, lines, open_text
from .tar_shards import read_tar, shard_paths

FORMATS = typing.get_args(SourceFormat)
ON_ERROR = ("raise", "skip")


def _resolve(base: str, name: str) -> str:
    return os.path.normpath(os.path.join(base, name))


def _bad_row(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}", "bad_row", where)


# ---------------------------------------------------------------------------
# Table and JSON readers


class _Lines:
    """A text file's physical lines, with push-back.

    An unterminated quote makes the csv module swallow the following lines into one field;
    after such a broken record, its first line is dropped and the rest are read again.
    """

    def __init__(self, f):
        self._f, self._back, self.taken = f, [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self._back.pop() if self._back else next(self._f)
        self.taken.append(line)
        return line

    def give_back(self, lines: list[str]) -> None:
        self._back.extend(reversed(lines))


def _read_table(path: Path, image_key: str, caption_key: str, delimiter: str, out: Collector) -> None:
    base = str(path.parent.resolve())
    # TSV captions are free text (quotes included), so no quote processing there. strict:
    # a stray quote after a quoted field is an error, not text silently glued on.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open_text(path, newline="") as f:
        lines = _Lines(f)
        reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            columns = next(reader, [])
        except csv.Error as e:
            raise DataError(f"{path}:1: cannot parse the header row: {e}") from None
        if not columns:
            raise DataError(f"{path}: empty file (expected a header row)")
        for key in (image_key, caption_key):
            if key not in columns:
                raise DataError(f"{path}: no column '{key}' (columns: {', '.join(columns)})")
        image_col, caption_col = columns.index(image_key), columns.index(caption_key)
        lineno = len(lines.taken)
        while True:
            lines.taken = []
            where = f"{path}:{lineno + 1}"  # a record's first line
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                lines.give_back(lines.taken[1:])
                lineno += 1
                out.fail(_bad_row(where, f"broken CSV quoting ({e})"))
                continue
            lineno += len(lines.taken)
            if not row:  # a blank line
                continue
            if len(row) <= max(image_col, caption_col):
                key = image_key if len(row) <= image_col else caption_key
                out.fail(_bad_row(where, f"missing column '{key}' ({len(row)} of {len(columns)} fields)"))
            elif len(row) > len(columns) and any(x.strip() for x in row[len(columns) :]):
                msg = f"{len(row)} fields but {len(columns)} columns (an unquoted '{delimiter}'?)"
                out.fail(_bad_row(where, msg))
            elif not row[image_col].strip():
                out.fail(_bad_row(where, f"empty '{image_key}'"))
            else:
                out.add(_resolve(base, row[image_col].strip()), row[caption_col], where)


def _add_json_item(out: Collector, item, base: str, image_key: str, caption_key: str, where: str) -> None:
    if not isinstance(item, dict):
        raise _bad_row(where, f"expected an object, got {type(item).__name__}")
    if image_key not in item:
        raise _bad_row(where, f"no key '{image_key}' (keys: {', '.join(item)})")
    key = caption_key if caption_key in item else "captions" if "captions" in item else None
    if key is None:
        raise _bad_row(where, f"no key '{caption_key}' (keys: {', '.join(item)})")
    image = item[image_key]
    if not isinstance(image, str) or not image.strip():
        raise _bad_row(where, f"'{image_key}' must be a non-empty path, got {image!r:.80}")
    out.add(_resolve(base, image.strip()), item[key], where)


def _read_json(path: Path, image_key: str, caption_key: str, out: Collector) -> None:
    base = str(path.parent.resolve())
    try:
        items = json.loads(decode_text(path.read_bytes(), str(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        try:
            _add_json_item(out, item, base, image_key, caption_key, f"{path}: item {i}")
        except DataError as e:
            out.fail(e)


def _read_jsonl(path: Path, image_key: str, caption_key: str, out: Collector) -> None:
    base = str(path.parent.resolve())
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _bad_row(f"{path}:{lineno}", f"invalid JSON: {e.msg}") from None
                _add_json_item(out, item, base, image_key, caption_key, f"{path}:{lineno}")
            except DataError as e:
                out.fail(e)


# ---------------------------------------------------------------------------
# Folder reader


def _read_folder(root: Path, out: Collector) -> None:
    base = str(root.resolve())
    index = root / "captions.txt"
    if index.is_file():
        with open_text(index) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                name, tab, caption = line.rstrip("\r\n").partition("\t")
                where = f"{index}:{lineno}"
                if not tab or not name.strip():
                    out.fail(_bad_row(where, "expected 'name<TAB>caption'"))
                else:
                    out.add(_resolve(base, name.strip()), caption, where)
        return
    # Sidecars: every image file (recursively, sorted) with a same-stem .txt next to it.
    images = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no captions.txt")
    lonely = [p for p in images if not p.with_suffix(".txt").is_file()]
    lonely_set = set(lonely)
    if lonely and out.skipped is None:
        more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
        raise DataError(f"{lonely[0]}: no caption file {lonely[0].with_suffix('.txt').name}{more}")
    for p in images:
        sidecar = p.with_suffix(".txt")
        image = _resolve(base, str(p.relative_to(root)))
        if p in lonely_set:
            out.fail(DataError(f"{p}: no caption file {sidecar.name}", "unpaired", image))
            continue
        try:
            text = decode_text(sidecar.read_bytes(), str(sidecar))
        except OSError as e:
            out.fail(DataError(f"{sidecar}: cannot read: {e.strerror or e}", "unreadable", image))
            continue
        except DataError as e:  # UTF-16 and the like
            out.fail(DataError(str(e), "caption_not_utf8", image))
            continue
        out.add(image, lines(text), str(sidecar))


# ---------------------------------------------------------------------------
# Entry points


def _folder_format(path: str) -> str:
    """A folder: a `datasets` save_to_disk directory, tar shards (img2dataset's webdataset output),
    Parquet files (its parquet output, hub downloads) or images."""
    names = os.listdir(path)
    if "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= set(names):
        return "hf"
    for ext in ("tar", "parquet"):  # the tars first: img2dataset writes a .parquet index beside each
        if any(n.endswith(f".{ext}") for n in names):
            return ext
    return "folder"


def detect_format(source: str | os.PathLike) -> str:
    s = str(source)
    if s.startswith("hf:"):
        return "hf"
    if is_named(s):
        return s.partition(":")[0]
    if os.path.isdir(s):
        return _folder_format(s)
    if s.endswith(".tar"):  # a shard, a glob or a brace pattern
        return "tar"
    ext = os.path.splitext(s)[1].lower().lstrip(".")
    if ext in ("csv", "tsv", "json", "jsonl", "parquet"):
        return ext
    raise DataError(
        f"{s}: unknown data source format (expected .csv, .tsv, .json, .jsonl, .parquet, hf:DIR (a "
        "`datasets` save_to_disk folder), coco:ROOT, flickr30k:ROOT, cc3m:ROOT, a folder of images, "
        "or .tar shards as a path, glob or {a,b} / {000..009} pattern)"
    )


def read_into(out: Collector, source: str | os.PathLike, fmt: str, image_key: str, caption_key: str) -> None:
    """Every entry of `source` (a format of FORMATS, not "auto") into `out`: read_samples' reading,
    for a Collector that gives the caption column another meaning (evaluation/datasets.py: labels)."""
    if fmt == "tar":
        for shard in shard_paths(str(source)):
            read_tar(shard, out)
        return
    if fmt == "parquet":
        read_parquet(str(source), out, image_key, caption_key)
        return
    if fmt == "hf":
        read_hf(str(source), out, image_key, caption_key)
        return
    if fmt in NAMES:
        read_named(str(source), fmt, out, image_key, caption_key)
        return
    path = Path(source)
    if fmt == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: no such folder")
        _read_folder(path, out)
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt in ("csv", "tsv"):
        _read_table(path, image_key, caption_key, "," if fmt == "csv" else "\t", out)
    elif fmt == "json":
        _read_json(path, image_key, caption_key, out)
    else:
        _read_jsonl(path, image_key, caption_key, out)


def source_root(source: str, fmt: str = "auto") -> str:
    """The folder a source's image references are made relative to for sample ids
    (samples.sample_id): a named dataset's ROOT, a `datasets` folder, an image folder, else the
    folder of the source's file, glob or brace list."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt in NAMES:
        return str(named_parse(source, fmt).root)
    if fmt == "hf":
        return hf_parse(source)[0]
    return source if os.path.isdir(source) else os.path.dirname(source) or "."


def read_samples(
    source: str | os.PathLike,
    image_key: str = "image",
    caption_key: str = "caption",
    fmt: str = "auto",
    *,
    check_files: bool = True,
    on_error: str = "raise",
    skipped: list[Skip] | None = None,
    max_caption_chars: int | None = None,
) -> list[Sample]:
    """Read an image-caption source into `list[Sample]` (one Sample per distinct image).

    `fmt` is "auto" or one of FORMATS ("csv", "tsv", "json", "jsonl", "folder", "tar", "parquet", "hf",
    and the named datasets "coco", "flickr30k", "cc3m");
    `check_files` verifies that every referenced image file exists (not tar members).
    `on_error="skip"` appends a Skip to `skipped` (required) for each bad entry and goes
    on; the result is then empty only when every entry was bad (the caller reports that).
    `max_caption_chars`: a longer caption is bad (None: no limit).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if on_error == "skip" and skipped is None:
        raise ValueError("on_error='skip' needs a list to report the skipped items into: skipped=[]")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}' (expected auto, {', '.join(FORMATS)})")
    out = Collector(max_caption_chars, skipped if on_error == "skip" else None)
    n_skipped = len(skipped) if skipped is not None else 0
    read_into(out, source, fmt, image_key, caption_key)
    samples = out.samples(check_files)
    if not samples and (out.skipped is None or len(skipped) == n_skipped):
        raise DataError(f"{source}: no samples")
    return samples


def split_samples(samples: list, val_ratio: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic random split; both parts keep the original order of the samples."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    n_val = int(round(len(samples) * val_ratio))
    if val_ratio > 0 and len(samples) > 1:
        n_val = min(max(n_val, 1), len(samples) - 1)  # a requested split is never empty
    is_val = np.zeros(len(samples), bool)
    is_val[np.random.default_rng(seed).permutation(len(samples))[:n_val]] = True
    train = [s for s, v in zip(samples, is_val, strict=True) if not v]
    val = [s for s, v in zip(samples, is_val, strict=True) if v]
    return train, val


__all__ = ["FORMATS", "detect_format", "read_into", "read_samples", "source_root", "split_samples"]
