"""What readers produce: samples (an image and its captions), skip records and the errors that
name the file and item at fault, plus the caption checks and per-image merging every format shares.

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
"""

from __future__ import annotations

import codecs
import dataclasses
import os
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

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
    "bad_member_name": "a tar member named like an image or caption with a dot in its field (photo.v2.png)",
    "duplicate_key": "a second image (and its caption) under a WebDataset key already used in the shard",
    "extreme_aspect": "the longer side is over max_aspect_ratio times the shorter",
    "null_image": "a Parquet or Arrow row whose image cell is null (no bytes and no path)",
    "corrupt_row_group": "a Parquet row group (or Arrow file) that cannot be read or decompressed",
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


@dataclass(frozen=True)
class RowRef:
    """One image cell of a Parquet file (row `row` of row group `group`) or of a `datasets` Arrow
    file (group 0, `row` counted from the file's start), in column `column`; read at decode time
    one row group at a time (data/columnar.py)."""

    path: str
    group: int
    row: int
    column: str

    def __str__(self) -> str:
        return f"{self.path}:row group {self.group}:row {self.row}"


@dataclass
class Sample:
    image: str | TarRef | RowRef
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """One item left out: what (`item`: an image path, `shard:member` or `file:line`), why
    (`reason`, a REASONS code) and the full message (`detail`). `stage` is "read", "scan"
    or "decode"; decode-time skips also say where (`epoch`, `index`) and what replaced it. In a
    mixture of training sources, `source` names the one it belongs to ("data.train[i]")."""

    item: str
    reason: str
    detail: str
    stage: str = "read"
    epoch: int | None = None
    index: int | None = None
    substitute: int | None = None
    source: str | None = None

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
# Text: every format is UTF-8, with or without a byte-order mark

_NOT_UTF8 = "data files must be UTF-8: open it in an editor and save it as UTF-8"
# UTF-32 LE's mark starts with UTF-16 LE's, so it is looked for first.
_WIDE_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def check_utf8_start(head: bytes, where: str) -> None:
    """Raise a DataError naming `where` when its first bytes say UTF-16 or UTF-32, not UTF-8."""
    for mark, name in _WIDE_MARKS:
        if head.startswith(mark):
            raise DataError(
                f"{where}: the file is {name} (it starts with a {name} byte-order mark); {_NOT_UTF8}"
            )
    if b"\0" in head:
        raise DataError(f"{where}: the file holds NUL bytes (UTF-16 without a byte-order mark?); {_NOT_UTF8}")


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes -> text, without a leading byte-order mark. Bytes that are not UTF-8 become lone
    surrogates (surrogateescape), so one bad byte costs the caption it is in (caption_problem)."""
    check_utf8_start(data[:4096], where)
    return data.decode("utf-8-sig", errors="surrogateescape")


def open_text(path, newline: str | None = None):
    """A UTF-8 text file opened for reading, its byte-order mark (if any) skipped, every format alike."""
    with open(path, "rb") as f:
        check_utf8_start(f.read(4096), str(path))
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


# ---------------------------------------------------------------------------
# Shared helpers


def caption_problem(caption: str, max_chars: int | None = None) -> tuple[str, str] | None:
    """(reason, message) when a stripped, non-empty caption is unusable; None when it is fine."""
    try:
        caption.encode("utf-8")  # lone surrogates: undecodable bytes (surrogateescape) or bad JSON
    except UnicodeEncodeError:
        return "caption_not_utf8", f"caption is not valid UTF-8: {ascii(caption):.80}; {_NOT_UTF8} (Latin-1?)"
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


class Collector:
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
                raise DataError(
                    f"{self.where[missing[0]]}: image not found: {missing[0]}{_path_hint(missing[0])}{more}"
                )
            for p in missing:
                self.fail(
                    DataError(f"{self.where[p]}: image not found: {p}{_path_hint(p)}", "missing_file", p)
                )
        gone = set(missing)
        # An image whose every caption was bad has its Skips already; it just is not a sample.
        return [Sample(im, caps) for im, caps in self.captions.items() if caps and im not in gone]


def _path_hint(path: str) -> str:
    """Why a listed image may be missing: its name was read from a file that is not UTF-8."""
    try:
        path.encode("utf-8")
        return ""
    except UnicodeEncodeError:  # lone surrogates: bytes that are not UTF-8 (surrogateescape)
        return f" (the name has bytes that are not UTF-8; {_NOT_UTF8})"


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Sample ids: what stored per-sample data (teacher embeddings, mlx_clip.embed) is keyed by


def sample_id(image: str | TarRef | RowRef, root: str) -> str:
    """A sample's stable id: its image reference with paths relative to `root` (readers.source_root),
    so the same source read from another place or on another day gives the same ids:
    "photos/cat.jpg", "shard-0001.tar:000042.jpg" (tar member), "part-0.parquet:3:17" (row
    group 3, row 17). The built-in dataset's samples are keyed by their index instead (str(i))."""

    def rel(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    if isinstance(image, TarRef):
        return f"{rel(image.path)}:{image.name}"
    if isinstance(image, RowRef):
        return f"{rel(image.path)}:{image.group}:{image.row}"
    return rel(str(image))
