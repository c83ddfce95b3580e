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
  read when the loader decodes it.

Image paths are resolved relative to the file that names them. Several entries for the
same image become one Sample with several captions. Errors are `DataError`s that name
the file and the line, item or key at fault.

Bad entries: by default (`on_error="raise"`) the first one raises. With `on_error="skip"`
every entry-level problem becomes a `Skip` record (item, reason code from `REASONS`,
message) appended to the caller's list, and reading goes on: a CSV row with a missing
column or broken quoting, an invalid JSON line, a missing image file, an unpaired tar
member, a truncated shard (the members before the cut are kept), a bad caption. Problems
with the source itself (it does not exist, unknown format, no header or no such column,
a .json file that is not valid JSON) raise in both modes.

Captions: stripped; empty ones inside a list are dropped, an entry with no caption left
is bad ("empty_caption"); text that is not valid UTF-8 is bad ("caption_not_utf8", files
are read with `surrogateescape`, so one bad byte costs one caption, not the file); with
`max_caption_chars`, a longer caption is bad ("caption_too_long"), not truncated: 100 kB
of text in a caption field is a scraping or parsing accident, and its first words would
teach the model noise. An image keeps its other, good captions.

Tar members are never extracted to disk: captions are read into memory, images are
(offset, size) references, so a `../x` or `/abs` member name cannot write anywhere.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import tarfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import SourceFormat

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FORMATS = typing.get_args(SourceFormat)
ON_ERROR = ("raise", "skip")

# Why an item was skipped: the codes that Skip.reason and the summaries count by.
REASONS = {
    "missing_file": "the image file does not exist",
    "empty_file": "the image file has zero bytes",
    "unreadable": "the file exists but cannot be read (permissions, I/O error)",
    "not_an_image": "PIL cannot identify the file as an image",
    "truncated_image": "the encoded image ends early",
    "corrupt_image": "the image data cannot be decoded or converted",
    "too_many_pixels": "width x height over the pixel limit (decompression bomb)",
    "empty_caption": "no non-blank caption",
    "caption_not_utf8": "caption text is not valid UTF-8",
    "caption_too_long": "caption longer than max_caption_chars",
    "bad_caption": "caption is not a string or a list of strings",
    "bad_row": "a malformed CSV row, JSON(L) item or captions.txt line",
    "unpaired": "an image without a caption, or a caption without an image",
    "truncated_tar": "a tar shard ends early or a member is cut short",
    "bad_tar": "a tar shard cannot be read",
}


class DataError(ValueError):
    """A data source is missing or malformed; the message names the file and line/key.

    `reason` is a code from REASONS (what the item is counted under when skipped) and
    `item` the image or entry at fault, when the error concerns one item, not the source.
    """

    def __init__(self, message: str, reason: str = "invalid", item: str | None = None):
        super().__init__(message)
        self.reason, self.item = reason, item


@dataclass(frozen=True)
class TarRef:
    """One member of a tar shard: read `size` bytes at `offset` of `path`."""

    path: str
    offset: int
    size: int
    name: str  # member name, for error messages

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


@dataclass
class Sample:
    image: str | TarRef
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """One item left out: what (`item`: an image path, `shard:member` or `file:line`), why
    (`reason`, a REASONS code) and the full message (`detail`). `stage` is "read", "scan"
    or "decode"; decode-time skips also say where (`epoch`, `index`) and what replaced it."""

    item: str
    reason: str
    detail: str
    stage: str = "read"
    epoch: int | None = None
    index: int | None = None
    substitute: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# ---------------------------------------------------------------------------
# Reading image bytes (used by the loader at decode time)


def read_bytes(image: str | TarRef) -> bytes:
    """The encoded bytes of an image file or tar member."""
    path, offset = (image.path, image.offset) if isinstance(image, TarRef) else (image, 0)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(image.size if isinstance(image, TarRef) else -1)  # releases the GIL
    except FileNotFoundError:
        raise DataError(f"{image}: image not found", "missing_file", str(image)) from None
    except OSError as e:
        raise DataError(f"{image}: cannot read image: {e.strerror or e}", "unreadable", str(image)) from None
    if isinstance(image, TarRef) and len(data) != image.size:
        msg = f"{image}: truncated (read {len(data)} of {image.size} bytes)"
        raise DataError(msg, "truncated_tar", str(image))
    return data


# ---------------------------------------------------------------------------
# Shared helpers


def caption_problem(caption: str, max_chars: int | None = None) -> tuple[str, str] | None:
    """(reason, message) when a stripped, non-empty caption is unusable; None when it is fine."""
    try:
        caption.encode("utf-8")  # lone surrogates: undecodable bytes (surrogateescape) or bad JSON
    except UnicodeEncodeError:
        return "caption_not_utf8", f"caption is not valid UTF-8: {ascii(caption):.80}"
    if max_chars and len(caption) > max_chars:
        return "caption_too_long", f"caption has {len(caption)} characters (max_caption_chars={max_chars})"
    return None


def clean_captions(value, where: str, max_chars: int | None = None, item: str | None = None):
    """A caption string or list of strings -> (good stripped captions, DataErrors for bad ones).

    Blank entries beside good ones are dropped silently; no caption at all is an error.
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        msg = f"{where}: caption must be a string or a list of strings, got {value!r:.80}"
        return [], [DataError(msg, "bad_caption", item or where)]
    good, bad = [], []
    for c in items:
        c = c.strip()
        problem = caption_problem(c, max_chars) if c else None
        if problem:
            bad.append(DataError(f"{where}: {problem[1]}", problem[0], item or where))
        elif c:
            good.append(c)
    if not good and not bad:
        bad.append(DataError(f"{where}: empty caption", "empty_caption", item or where))
    return good, bad


class _Collector:
    """Merge captions per image, keeping first-seen order; remember where each image was named.

    `skipped` None: strict, the first problem raises; a list: problems are appended as Skips.
    """

    def __init__(self, max_caption_chars: int | None = None, skipped: list[Skip] | None = None):
        self.captions: dict[str | TarRef, list[str]] = {}
        self.where: dict[str | TarRef, str] = {}
        self.max_caption_chars, self.skipped = max_caption_chars, skipped

    def fail(self, e: DataError) -> None:
        if self.skipped is None:
            raise e
        self.skipped.append(Skip(e.item or "?", e.reason, str(e)))

    def add(self, image: str | TarRef, captions, where: str) -> None:
        """Register `image` with the good captions of `captions` (a string or list of strings)."""
        good, bad = clean_captions(captions, where, self.max_caption_chars, str(image))
        for e in bad:
            self.fail(e)
        if image not in self.captions:
            self.captions[image] = []
            self.where[image] = where
        known = self.captions[image]
        known.extend(c for c in good if c not in known)  # exact duplicates add nothing

    def samples(self, check_files: bool) -> list[Sample]:
        missing = []
        if check_files:
            missing = [p for p in self.captions if isinstance(p, str) and not os.path.isfile(p)]
            if missing and self.skipped is None:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DataError(f"{self.where[missing[0]]}: image not found: {missing[0]}{more}")
            for p in missing:
                self.fail(DataError(f"{self.where[p]}: image not found: {p}", "missing_file", p))
        gone = set(missing)
        # An image whose every caption was bad has its Skips already; it just is not a sample.
        return [Sample(im, caps) for im, caps in self.captions.items() if caps and im not in gone]


def _resolve(base: str, name: str) -> str:
    return os.path.normpath(os.path.join(base, name))


def _bad_row(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}", "bad_row", where)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


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


def _read_table(path: Path, image_key: str, caption_key: str, delimiter: str, out: _Collector) -> None:
    base = str(path.parent.resolve())
    # TSV captions are free text (quotes included), so no quote processing there. strict:
    # a stray quote after a quoted field is an error, not text silently glued on.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
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


def _add_json_item(out: _Collector, item, base: str, image_key: str, caption_key: str, where: str) -> None:
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


def _read_json(path: Path, image_key: str, caption_key: str, out: _Collector) -> None:
    base = str(path.parent.resolve())
    try:
        items = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        try:
            _add_json_item(out, item, base, image_key, caption_key, f"{path}: item {i}")
        except DataError as e:
            out.fail(e)


def _read_jsonl(path: Path, image_key: str, caption_key: str, out: _Collector) -> None:
    base = str(path.parent.resolve())
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
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


def _read_folder(root: Path, out: _Collector) -> None:
    base = str(root.resolve())
    index = root / "captions.txt"
    if index.is_file():
        with open(index, encoding="utf-8", errors="surrogateescape") as f:
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
            text = sidecar.read_bytes().decode("utf-8", errors="surrogateescape")
        except OSError as e:
            out.fail(DataError(f"{sidecar}: cannot read: {e.strerror or e}", "unreadable", image))
            continue
        out.add(image, _lines(text), str(sidecar))


# ---------------------------------------------------------------------------
# WebDataset tar shards


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` lists and `{000..009}` ranges (zero padding kept), nested or several."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise DataError(f"{pattern}: unbalanced '{{'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        lo, hi = int(m[1]), int(m[2])
        width = len(m[1]) if m[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:  # split on top-level commas only, so nested braces survive to the recursion
        options, depth, last = [], 0, 0
        for i, ch in enumerate(body):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                options.append(body[last:i])
                last = i + 1
        options.append(body[last:])
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def _shard_paths(source: str) -> list[str]:
    """Brace-expand, then glob; every pattern must match, every path must exist."""
    paths: list[str] = []
    for pattern in expand_braces(source):
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise DataError(f"{pattern}: no files match")
            paths.extend(found)
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: no such shard")
        else:
            paths.append(pattern)
    for p in paths:
        if not p.endswith(".tar"):
            raise DataError(f"{p}: not a .tar shard")
    return [os.path.abspath(p) for p in dict.fromkeys(paths)]  # de-duplicated, order kept


def _read_tar(path: str, out: _Collector) -> None:
    """Index one shard: group members by WebDataset key (path up to the basename's first dot).

    Member names only become keys and messages; nothing is extracted, so `../x` or `/x`
    names cannot write anywhere. A shard cut short keeps the members before the cut.
    """
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, list[str]] = {}  # a key's .txt members, in shard order
    problem, size = None, 0
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:  # plain tar only: offsets must be raw bytes
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, basename = m.name.rpartition("/")
                stem, dot, ext = basename.partition(".")
                if not dot or stem.startswith("."):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                if ext in TAR_IMAGE_EXTENSIONS and key not in images:
                    images[key] = m
                elif ext == "txt":
                    text = tf.extractfile(m).read().decode("utf-8", errors="surrogateescape")
                    texts.setdefault(key, []).append(text)
            # tarfile ends quietly at EOF or at a garbled header; only the zero-block
            # end-of-archive marker says that nothing was lost.
            tf.fileobj.seek(tf.offset)
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
            if not block:
                problem = "truncated_tar", "no end-of-archive marker (cut short?)"
            elif block.strip(b"\0"):
                problem = "bad_tar", f"unreadable header at byte {tf.offset}"
    except (tarfile.TarError, OSError) as e:
        problem = "truncated_tar" if "unexpected end" in str(e) else "bad_tar", str(e)
    if problem:
        kept = "; the complete members before the cut are kept" if out.skipped is not None and images else ""
        out.fail(DataError(f"{path}: cannot read tar shard: {problem[1]}{kept}", problem[0], path))
    for key, m in list(images.items()):
        if m.offset_data + m.size > size:  # the shard ends inside this member
            ref = TarRef(path, m.offset_data, m.size, m.name)
            out.fail(DataError(f"{ref}: member cut short by the end of the shard", "truncated_tar", str(ref)))
            del images[key]
            texts.pop(key, None)
    for key in sorted(images.keys() - texts.keys()):
        m = images.pop(key)
        item = str(TarRef(path, m.offset_data, m.size, m.name))
        out.fail(DataError(f"{path}: sample '{key}' has an image but no {key}.txt", "unpaired", item))
    for key in sorted(texts.keys() - images.keys()):
        msg = f"{path}: sample '{key}' has {key}.txt but no image"
        out.fail(DataError(msg, "unpaired", f"{path}:{key}.txt"))
    for key, m in images.items():
        captions = [c for text in texts[key] for c in _lines(text)]
        out.add(TarRef(path, m.offset_data, m.size, m.name), captions, f"{path}:{key}.txt")


# ---------------------------------------------------------------------------
# Entry points


def detect_format(source: str | os.PathLike) -> str:
    s = str(source)
    if os.path.isdir(s):
        return "folder"
    if s.endswith(".tar"):  # a shard, a glob or a brace pattern
        return "tar"
    ext = os.path.splitext(s)[1].lower().lstrip(".")
    if ext in ("csv", "tsv", "json", "jsonl"):
        return ext
    raise DataError(
        f"{s}: unknown data source format (expected .csv, .tsv, .json, .jsonl, "
        "a folder of images, or .tar shards as a path, glob or {a,b} / {000..009} pattern)"
    )


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

    `fmt` is one of "auto", "csv", "tsv", "json", "jsonl", "folder", "tar";
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
    out = _Collector(max_caption_chars, skipped if on_error == "skip" else None)
    n_skipped = len(skipped) if skipped is not None else 0
    if fmt == "tar":
        for shard in _shard_paths(str(source)):
            _read_tar(shard, out)
    else:
        path = Path(source)
        if fmt == "folder":
            if not path.is_dir():
                raise DataError(f"{path}: no such folder")
            _read_folder(path, out)
        else:
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            if fmt in ("csv", "tsv"):
                _read_table(path, image_key, caption_key, "," if fmt == "csv" else "\t", out)
            elif fmt == "json":
                _read_json(path, image_key, caption_key, out)
            else:
                _read_jsonl(path, image_key, caption_key, out)
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


__all__ = [
    "REASONS",
    "DataError",
    "Sample",
    "Skip",
    "TarRef",
    "caption_problem",
    "clean_captions",
    "detect_format",
    "expand_braces",
    "read_bytes",
    "read_samples",
    "split_samples",
]
