"""Bad data: find it before training, skip and report it, never crash mid-epoch.

(`data.validate` names the pre-flight check; this module is the checks as a whole.) The config
fields under `data:`:

    validate: header            # "header" | "full" | "off": the pre-flight image check (below)
    max_bad_fraction: 0.05      # more bad items than this share: DataError before training
    max_image_pixels: 89478485  # width * height limit, read from the header before decoding
    max_aspect_ratio: 50        # longer side / shorter side limit, from the header (0: none)
    max_caption_chars: 4096     # a longer caption is bad (0: no limit)

and how data/run_data.py and the training loop use it:

    from mlx_clip.data import checks
    log = checks.SkipLog(out / "skipped.jsonl")  # one per run; thread-safe; a JSON line per skip
    report = checks.prepare(                       # scan + log + counted warning + threshold check
        d.train, log=log, mode=d.validate, max_bad_fraction=d.max_bad_fraction,
        max_image_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio,
        max_caption_chars=d.max_caption_chars, image_key=d.image_key, caption_key=d.caption_key, fmt=d.format,
    )                                              # raises DataError naming the first bad items
    train_src = report.samples                     # in place of read_samples(d.train, ...);
                                                   # split_samples(train_src, ...) after it
    # d.val: the same call with the same log. Then every file-backed Loader gets
    Loader(..., on_error="skip", on_skip=log, max_image_pixels=d.max_image_pixels or None,
           max_aspect_ratio=d.max_aspect_ratio or None)
    # and at the end of the run: log.summary() (a dict for the results / log line); log.close()

`validate: off` still goes through `prepare(mode="off")`: reader-level and caption
problems cost nothing extra to skip. The built-in dataset (an ArraySource) needs none of
this. On resume the scan runs again: `SkipLog(path, hold=True)` keeps its lines in memory
until `release()` (once the checkpoint is restored) rewrites the file with them, so a refused
resume leaves the file as it was; `append=True` keeps the decode-time lines of the earlier
epochs (the scan lines then appear twice).

`prepare` raises before training when nothing is left or when more than
`max_bad_fraction` of the items are bad. The bad share counts distinct skipped items
(image, tar member, shard or `file:line`) that are not among the kept samples: a
dropped caption of an image that still trains does not count, a broken shard counts once.

Modes of the image check, and their cost:
- "header" (default): `Image.open` reads the first bytes only (format, size, mode). It
  catches missing, zero-byte, unreadable and non-image files and decompression bombs,
  but not a file cut short after its header. Cheap: no pixel is decoded.
- "full": also decodes every image (JPEGs at 1/8 scale, which still reads all of the
  data) and converts it to RGB, so truncated and corrupt files are caught as well.
  The decoding is spread over `workers` threads (PIL releases the GIL while decoding).
  Worth it for datasets of thousands to a few hundred thousand.
Measured cost of both: benchmarks/RESULTS.md#numbers-quoted-in-the-code.
- "off": no image is opened; reader-level and caption problems are still skipped.
Whatever slips through is replaced at decode time by a `Loader(on_error="skip")`.

The pixel and aspect limits are checked from the header, before any pixel is decoded
(data/decode.py, shared with the loader, eval and predict). PIL refuses
images over 2 * PIL.Image.MAX_IMAGE_PIXELS by itself (also reported as
"too_many_pixels"), so a `max_image_pixels` above that also needs MAX_IMAGE_PIXELS raised.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import ImageCheck
from .decode import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, decode_error, open_image, open_lazy
from .readers import read_samples
from .samples import REASONS, DataError, Sample, Skip, TarRef, clean_captions
from .transforms import to_rgb

MODES = typing.get_args(ImageCheck)
DEFAULT_MAX_CAPTION_CHARS = 4096
DEFAULT_MAX_BAD_FRACTION = 0.05
_CHUNK = 64  # samples per thread-pool task


class BadDataWarning(UserWarning):
    """Items were skipped; the message counts them by reason and names the skip log."""


# ---------------------------------------------------------------------------
# One image


def check_image(
    image: str | TarRef, mode: str = "header", max_pixels: int | None = None, max_aspect: float | None = None
) -> Skip | None:
    """None when `image` passes the `mode` check ("header" or "full"), else its Skip."""
    try:
        im = open_lazy(image, max_pixels, max_aspect)
        with im:
            if mode == "full":
                try:
                    im.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, still through every byte
                    im.load()
                    to_rgb(im)
                except Exception as e:
                    raise decode_error(image, e) from None
    except DataError as e:
        return Skip(e.item or str(image), e.reason, str(e), stage="scan")
    return None


# ---------------------------------------------------------------------------
# The pre-flight scan


@dataclass
class Report:
    """What a scan kept (`samples`, in source order) and what it left out (`skipped`)."""

    samples: list[Sample]
    skipped: list[Skip]
    source: str = ""
    mode: str = "header"
    seconds: float = 0.0

    def bad_items(self) -> list[str]:
        """Distinct skipped items that are not kept samples, first-seen order."""
        kept = {str(s.image) for s in self.samples}
        return list(dict.fromkeys(s.item for s in self.skipped if s.item not in kept))

    @property
    def bad_fraction(self) -> float:
        bad = len(self.bad_items())
        return bad / (bad + len(self.samples)) if bad else 0.0

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def summary(self) -> dict:
        return {
            "source": self.source,
            "mode": self.mode,
            "kept": len(self.samples),
            "bad": len(self.bad_items()),
            "bad_fraction": round(self.bad_fraction, 6),
            "skipped": len(self.skipped),
            "by_reason": self.by_reason(),
            "seconds": round(self.seconds, 3),
        }

    def describe(self, log_path: str | os.PathLike | None = None) -> str:
        """One line: how much was skipped and why, and where the full list is."""
        bad = len(self.bad_items())
        counts = ", ".join(f"{n} {r}" for r, n in self.by_reason().items())
        where = f"; every item and reason in {log_path}" if log_path else ""
        return (
            f"{self.source}: skipped {bad} of {bad + len(self.samples)} items ({self.bad_fraction:.1%}); "
            f"{len(self.skipped)} entries in all ({counts}){where}"
        )

    def check(
        self, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, log_path: str | os.PathLike | None = None
    ) -> None:
        """Raise a DataError naming the first bad items when nothing is left or too much is bad."""
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        bad = self.bad_items()
        bad_set = set(bad)
        lost = [s for s in self.skipped if s.item in bad_set]  # not the captions dropped from kept images
        first = "\n".join(f"  {s.detail}  [{s.reason}]" for s in lost[:5])
        more = f"\n  ... and {len(lost) - 5} more" if len(lost) > 5 else ""
        where = f" (all of them, with reasons: {log_path})" if log_path else ""
        if not self.samples:
            raise DataError(
                f"{self.source}: no usable samples left, all {len(bad)} items are bad{where}; "
                f"the first problems:\n{first}{more}"
            )
        if self.bad_fraction > max_bad_fraction:
            raise DataError(
                f"{self.source}: {len(bad)} of {len(bad) + len(self.samples)} items "
                f"({self.bad_fraction:.1%}) are bad, more than max_bad_fraction={max_bad_fraction:g}"
                f"{where}; fix or remove them, or raise data.max_bad_fraction. "
                f"The first problems:\n{first}{more}"
            )


def _check_captions(samples: list[Sample], max_chars: int | None, skipped: list[Skip]) -> list[Sample]:
    """Samples with their bad captions dropped; samples with none left are skipped."""
    out = []
    for s in samples:
        good, bad = clean_captions(s.captions, str(s.image), max_chars, str(s.image))
        skipped.extend(Skip(e.item or str(s.image), e.reason, str(e), stage="scan") for e in bad)
        if good:
            out.append(s if good == s.captions else Sample(s.image, good))
    return out


def _check_images(
    samples: list[Sample],
    mode: str,
    max_pixels: int | None,
    max_aspect: float | None,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> list[Skip | None]:
    def run(chunk: list[Sample]) -> list[Skip | None]:
        return [check_image(s.image, mode, max_pixels, max_aspect) for s in chunk]

    chunks = [samples[i : i + _CHUNK] for i in range(0, len(samples), _CHUNK)]
    results: list[Skip | None] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for part in pool.map(run, chunks):  # in order, whatever finishes first
            results.extend(part)
            if progress is not None:
                progress(len(results), len(samples))
    return results


def scan(
    data: str | os.PathLike | list[Sample],
    *,
    mode: str = "header",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    max_caption_chars: int | None = DEFAULT_MAX_CAPTION_CHARS,
    workers: int | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    fmt: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    source: str | None = None,
    skipped: list[Skip] | None = None,
) -> Report:
    """Check a data source (read with `read_samples(on_error="skip")`) or a list of samples.

    Captions are always checked; images per `mode` ("header", "full", "off"; see the
    module doc). Nothing raises for bad items: they are in `Report.skipped`. A source that
    does not exist, or cannot be parsed at all, still raises a DataError naming it.
    `workers` threads open the images (default: the CPU count, at most 8); `progress`
    is called as progress(done, total) after each chunk. `source` names the data in the report
    (default: its path, or "N samples"); `skipped` holds what was already left out while reading
    a list of samples, counted and logged with the rest.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    skipped = list(skipped or [])
    if isinstance(data, (str, os.PathLike)):
        source = source or str(data)
        kw = dict(on_error="skip", skipped=skipped, max_caption_chars=max_caption_chars)
        samples = read_samples(data, image_key, caption_key, fmt, **kw)
    else:
        source, samples = source or f"{len(data)} samples", list(data)
    samples = _check_captions(samples, max_caption_chars, skipped)
    if mode != "off" and samples:
        workers = workers or min(8, os.cpu_count() or 1)
        results = _check_images(samples, mode, max_image_pixels, max_aspect_ratio, workers, progress)
        skipped.extend(r for r in results if r is not None)
        samples = [s for s, r in zip(samples, results, strict=True) if r is None]
    return Report(samples, skipped, source, mode, time.perf_counter() - t0)


def prepare(
    data: str | os.PathLike | list[Sample],
    *,
    log: SkipLog | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    **scan_kw,
) -> Report:
    """`scan`, then write every skip to `log`, warn once with the counts, and `Report.check`."""
    report = scan(data, **scan_kw)
    path = log.path if log is not None else None
    if log is not None:
        log.extend(report.skipped)
    if report.skipped:
        warnings.warn(f"data: {report.describe(path)}", BadDataWarning, stacklevel=2)
    report.check(max_bad_fraction, path)
    return report


# ---------------------------------------------------------------------------
# The run's skip log


class SkipLog:
    """Counts Skip records by reason and stage and appends each to `path` as a JSON line.

    Thread-safe, so a Loader's worker threads can report to it (`on_skip=log`). Each line is
    flushed at once, so the file is complete even if the run dies. The file is created (or,
    with append=False, emptied) at construction: an empty file means nothing was skipped.
    The first decode-time skip of each item also gives a BadDataWarning.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, append: bool = False, hold: bool = False):
        """hold=True: keep the lines in memory and touch no file until `release()` (a resumed
        run's scan, which must leave the run's log as it was until the checkpoint is restored)."""
        self.path = Path(path) if path is not None else None
        self._held: list[str] | None = [] if hold else None
        self._mode = "a" if append else "w"
        self._file = None
        if self.path is not None and not hold:
            self._file = open(self.path, self._mode, encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0
        self.by_reason: Counter[str] = Counter()
        self.by_stage: Counter[str] = Counter()
        self._warned: set[str] = set()

    def add(self, skip: Skip) -> None:
        with self._lock:
            self.count += 1
            self.by_reason[skip.reason] += 1
            self.by_stage[skip.stage] += 1
            # ensure_ascii: undecodable path bytes (surrogates) stay valid JSON
            line = json.dumps(skip.to_dict()) + "\n"
            if self._held is not None:
                self._held.append(line)
            elif self._file is not None:
                self._file.write(line)
                self._file.flush()
            warn = skip.stage == "decode" and skip.item not in self._warned
            self._warned.add(skip.item)
        if warn:
            where = f" (all skips: {self.path})" if self.path else ""
            msg = f"data: {skip.detail}; sample {skip.index} replaced by sample {skip.substitute}{where}"
            warnings.warn(msg, BadDataWarning, stacklevel=2)

    __call__ = add

    def release(self) -> None:
        """Write the held lines to `path` and log straight to it from now on."""
        with self._lock:
            if self._held is None or self.path is None:
                return
            self._file = open(self.path, self._mode, encoding="utf-8")
            self._file.writelines(self._held)
            self._file.flush()
            self._held = None

    def extend(self, skips: Iterable[Skip]) -> None:
        for s in skips:
            self.add(s)

    def summary(self) -> dict:
        with self._lock:
            return {
                "skipped": self.count,
                "by_reason": dict(self.by_reason.most_common()),
                "by_stage": dict(self.by_stage.most_common()),
                "file": str(self.path) if self.path else None,
            }

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> SkipLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_MAX_CAPTION_CHARS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MODES",
    "REASONS",
    "BadDataWarning",
    "Report",
    "SkipLog",
    "check_image",
    "open_image",
    "prepare",
    "scan",
]
