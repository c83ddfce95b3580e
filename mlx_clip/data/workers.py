"""The boundary between the Loader and mlx-data's C++ worker threads.

A prefetch stream's workers call the Loader's Python functions (decode, transform, tokenize).
If such a stream is still alive when the interpreter shuts down, its workers call into a dying
interpreter and the process aborts (rc 134) or segfaults (rc 139) after the program has
finished; a Python exception in a worker used to leave one alive, through the exception's
traceback, and so did leaving an epoch early. Two rules prevent it:

- No exception crosses into C++. The Loader's callbacks catch their own exceptions, keep them
  (by epoch and sample) and return a placeholder record, whose index is `placeholder(i)`; the
  consuming thread finds it and raises the kept error, naming the sample (`worker_error`).
- No stream outlives its use. `Prefetch.close` stops the workers and destroys the stream in the
  consuming thread, while Python is fully alive: the Loader closes its streams when an epoch
  ends, is left early (break, an exception) or its iterator is garbage-collected, and an atexit
  hook closes any still open (an iterator kept in a global) before shutdown starts.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref

import numpy as np

from .decode import describe
from .samples import DataError


class WorkerError(DataError):
    """A Python exception in the Loader's per-sample work (a tokenizer, a transform, on_skip);
    the message names the sample, its image and where the exception was raised."""


def placeholder(index):
    """What a callback returns for sample(s) `index` instead of a result: negative indices,
    -1 - index, which no real sample has (the consumer checks with `failed`)."""
    return -1 - np.asarray(index, np.int64)


def failed(index: np.ndarray) -> int | None:
    """The first sample of a batch's `index` that a callback could not produce, or None."""
    if index.min() >= 0:
        return None
    return int(-1 - index[index < 0][0])


def _origin(e: BaseException) -> str:
    """' (at file.py:123 in fn)': the innermost frame of the exception's traceback."""
    tb = e.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f" (at {os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name})"


def worker_error(e: Exception | None, index: int, image: str) -> Exception:
    """The exception to raise in the consuming thread for sample `index`, whose callback raised `e`.

    A DataError already names its file and is raised as it is; anything else becomes a
    WorkerError naming the sample, with `e` as its cause."""
    if isinstance(e, DataError):
        return e
    if e is None:  # not reachable: a placeholder is only consumed after its error was kept
        return WorkerError(f"Loader: sample {index} ({image}) has no result")
    err = WorkerError(
        f"Loader: sample {index} ({image}) failed in a data worker: "
        f"{type(e).__name__}: {describe(e)}{_origin(e)}"
    )
    err.__cause__ = e
    return err


# Streams not closed yet, closed at exit at the latest (weak: a closed one is just dropped).
_OPEN: weakref.WeakSet[Prefetch] = weakref.WeakSet()


class Prefetch:
    """An mlx-data prefetch stream that can be closed, whose first batch is pulled in a helper
    thread so that its workers start filling early.

    `stop` is the event the stream's callbacks check: once set, they return placeholders
    without doing the work, so closing waits for at most the samples in flight."""

    def __init__(self, stream, stop: threading.Event):
        self._stream, self._stop, self._first, self._error = stream, stop, None, None
        self._thread = threading.Thread(target=self._pull, daemon=True)
        self._thread.start()
        _OPEN.add(self)

    def _pull(self):
        try:
            self._first = next(self._stream)
        except BaseException as e:  # re-raised in the consuming thread
            self._error = e

    def next(self) -> dict:
        if self._thread is None:
            return next(self._stream)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        first, self._first = self._first, None
        return first

    def close(self) -> None:
        """Stop the workers and destroy the stream now; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        # The last reference: mlx-data's destructor waits for its workers here.
        self._stream = self._first = self._error = None
        _OPEN.discard(self)


@atexit.register
def _close_open() -> None:
    # atexit runs before the interpreter starts shutting down, so the workers can still finish.
    for stream in list(_OPEN):
        stream.close()
