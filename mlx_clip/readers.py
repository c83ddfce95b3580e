"""Dataset readers: turn a user's image-caption source into `list[Sample]`.

Supported sources (auto-detected from the path, see `read_samples`):

- `data.csv` / `data.tsv`: a header row with an image column and a caption column;
- `data.json` (a list of objects) / `data.jsonl` (one object per line), with an image
  key and a caption key whose value is a string or a list of strings (`captions` works too);
- a folder of images with `captions.txt` (`name<TAB>caption` lines) or with a sidecar
  `.txt` per image (one caption per non-empty line);
- WebDataset `.tar` shards (`key.jpg|jpeg|png|webp` + `key.txt`) given as a path, a glob
  (`shards/*.tar`) or a brace pattern (`shards-{000..009}.tar`, `{a,b}.tar`). Shards are
  indexed, not extracted: a sample holds a `TarRef` (shard, byte offset, size) that is
  read when the loader decodes it.

Image paths are resolved relative to the file that names them. Several entries for the
same image become one Sample with several captions. Errors are `DataError`s that name
the file and the line, item or key at fault.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("csv", "tsv", "json", "jsonl", "folder", "tar")


class DataError(ValueError):
    """A data source is missing or malformed; the message names the file and line/key."""


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


# ---------------------------------------------------------------------------
# Reading image bytes (used by the loader at decode time)


def read_bytes(image: str | TarRef) -> bytes:
    """The encoded bytes of an image file or tar member."""
    path, offset = (image.path, image.offset) if isinstance(image, TarRef) else (image, 0)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(image.size if isinstance(image, TarRef) else -1)  # releases the GIL
    except OSError as e:
        raise DataError(f"{image}: cannot read image: {e.strerror or e}") from None
    if isinstance(image, TarRef) and len(data) != image.size:
        raise DataError(f"{image}: truncated (read {len(data)} of {image.size} bytes)")
    return data


# ---------------------------------------------------------------------------
# Shared helpers


class _Collector:
    """Merge captions per image, keeping first-seen order; remember where each image was named."""

    def __init__(self):
        self.captions: dict[str | TarRef, list[str]] = {}
        self.where: dict[str | TarRef, str] = {}

    def add(self, image: str | TarRef, captions: list[str], where: str) -> None:
        if image not in self.captions:
            self.captions[image] = []
            self.where[image] = where
        known = self.captions[image]
        known.extend(c for c in captions if c not in known)  # exact duplicates add nothing

    def samples(self, check_files: bool) -> list[Sample]:
        if check_files:
            missing = [p for p in self.captions if isinstance(p, str) and not os.path.isfile(p)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DataError(f"{self.where[missing[0]]}: image not found: {missing[0]}{more}")
        return [Sample(image, caps) for image, caps in self.captions.items()]


def _resolve(base: str, name: str) -> str:
    return os.path.normpath(os.path.join(base, name))


def _clean_captions(value, where: str) -> list[str]:
    """A caption string or list of strings -> non-empty stripped captions."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise DataError(f"{where}: caption must be a string or a list of strings, got {value!r:.80}")
    caps = [c.strip() for c in items if c.strip()]
    if not caps:
        raise DataError(f"{where}: empty caption")
    return caps


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Table and JSON readers


def _read_table(path: Path, image_key: str, caption_key: str, delimiter: str) -> _Collector:
    base = str(path.parent.resolve())
    out = _Collector()
    # TSV captions are free text (quotes included), so no quote processing there.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        columns = reader.fieldnames or []
        if not columns:
            raise DataError(f"{path}: empty file (expected a header row)")
        for key in (image_key, caption_key):
            if key not in columns:
                raise DataError(f"{path}: no column '{key}' (columns: {', '.join(columns)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            image = (row[image_key] or "").strip()
            if not image:
                raise DataError(f"{where}: empty '{image_key}'")
            out.add(_resolve(base, image), _clean_captions(row[caption_key] or "", where), where)
    return out


def _add_json_item(out: _Collector, item, base: str, image_key: str, caption_key: str, where: str) -> None:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    if image_key not in item:
        raise DataError(f"{where}: no key '{image_key}' (keys: {', '.join(item)})")
    key = caption_key if caption_key in item else "captions" if "captions" in item else None
    if key is None:
        raise DataError(f"{where}: no key '{caption_key}' (keys: {', '.join(item)})")
    image = item[image_key]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: '{image_key}' must be a non-empty path, got {image!r:.80}")
    out.add(_resolve(base, image.strip()), _clean_captions(item[key], where), where)


def _read_json(path: Path, image_key: str, caption_key: str) -> _Collector:
    base = str(path.parent.resolve())
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of objects, got {type(items).__name__}")
    out = _Collector()
    for i, item in enumerate(items):
        _add_json_item(out, item, base, image_key, caption_key, f"{path}: item {i}")
    return out


def _read_jsonl(path: Path, image_key: str, caption_key: str) -> _Collector:
    base = str(path.parent.resolve())
    out = _Collector()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            _add_json_item(out, item, base, image_key, caption_key, f"{path}:{lineno}")
    return out


# ---------------------------------------------------------------------------
# Folder reader


def _read_folder(root: Path) -> _Collector:
    base = str(root.resolve())
    out = _Collector()
    index = root / "captions.txt"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                name, tab, caption = line.rstrip("\r\n").partition("\t")
                where = f"{index}:{lineno}"
                if not tab or not name.strip():
                    raise DataError(f"{where}: expected 'name<TAB>caption'")
                out.add(_resolve(base, name.strip()), _clean_captions(caption, where), where)
        return out
    # Sidecars: every image file (recursively, sorted) with a same-stem .txt next to it.
    images = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no captions.txt")
    lonely = [p for p in images if not p.with_suffix(".txt").is_file()]
    if lonely:
        more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
        raise DataError(f"{lonely[0]}: no caption file {lonely[0].with_suffix('.txt').name}{more}")
    for p in images:
        sidecar = p.with_suffix(".txt")
        caps = _lines(sidecar.read_text(encoding="utf-8"))
        if not caps:
            raise DataError(f"{sidecar}: empty caption")
        out.add(_resolve(base, str(p.relative_to(root))), caps, str(sidecar))
    return out


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
    """Index one shard: group members by WebDataset key (path up to the basename's first dot)."""
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, str] = {}
    try:
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
                    texts[key] = tf.extractfile(m).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: cannot read tar shard: {e}") from None
    no_text, no_image = sorted(images.keys() - texts.keys()), sorted(texts.keys() - images.keys())
    if no_text:
        raise DataError(f"{path}: sample '{no_text[0]}' has an image but no {no_text[0]}.txt")
    if no_image:
        raise DataError(f"{path}: sample '{no_image[0]}' has {no_image[0]}.txt but no image")
    for key, m in images.items():
        where = f"{path}:{key}.txt"
        caps = _lines(texts[key])
        if not caps:
            raise DataError(f"{where}: empty caption")
        out.add(TarRef(path, m.offset_data, m.size, m.name), caps, where)


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
) -> list[Sample]:
    """Read an image-caption source into `list[Sample]` (one Sample per distinct image).

    `fmt` is one of "auto", "csv", "tsv", "json", "jsonl", "folder", "tar";
    `check_files` verifies that every referenced image file exists (not tar members).
    """
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}' (expected auto, {', '.join(FORMATS)})")
    if fmt == "tar":
        out = _Collector()
        for shard in _shard_paths(str(source)):
            _read_tar(shard, out)
    else:
        path = Path(source)
        if fmt == "folder":
            if not path.is_dir():
                raise DataError(f"{path}: no such folder")
            out = _read_folder(path)
        else:
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            if fmt in ("csv", "tsv"):
                out = _read_table(path, image_key, caption_key, "," if fmt == "csv" else "\t")
            elif fmt == "json":
                out = _read_json(path, image_key, caption_key)
            else:
                out = _read_jsonl(path, image_key, caption_key)
    samples = out.samples(check_files)
    if not samples:
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
    "DataError",
    "Sample",
    "TarRef",
    "detect_format",
    "expand_braces",
    "read_bytes",
    "read_samples",
    "split_samples",
]
