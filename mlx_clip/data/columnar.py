"""Image cells of Parquet and Arrow files, read at decode time one row group at a time, and the column
choice the Parquet and `datasets` readers share.

A sample of a Parquet or `datasets` source holds a RowRef (file, row group, row, column): the
index keeps no image bytes. `read_cell` reads the image column of the ref's row group (Parquet) or
memory-maps the Arrow file (`datasets`) and returns the row's encoded bytes. Row groups read are kept
in a small LRU shared by the decoding threads (CACHE_BYTES, the latest one always), so the rows of
one group are read once when they come together: memory is bounded by about CACHE_BYTES plus one
row group per thread reading, whatever the file size, in any access order. A shuffled epoch over
more data than the cache reads a row group per sample, so small row groups (100 images, as
`datasets` writes image Parquet) suit shuffled training best.

An image cell is raw bytes, Hugging Face's `{"bytes", "path"}` struct (bytes first, else the file
at path) or a string path; paths are relative to the Parquet or Arrow file that names them.
pyarrow is imported lazily: only these formats need it (`pip install 'mlx-clip[parquet]'`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .samples import DataError, RowRef, read_bytes

# Row groups read, shared by the threads that decode (mlx-data's workers get a fresh Python thread
# state per call, so a threading.local would forget between samples): an LRU of at most CACHE_BYTES
# of image columns (and MAX_GROUPS entries), the most recent one always kept.
CACHE_BYTES = 128 << 20
MAX_GROUPS = 64
_cache: OrderedDict[tuple, tuple] = (
    OrderedDict()
)  # (path, group, column, mtime, size) -> (column or error, bytes)
_loading: dict[tuple, threading.Lock] = {}  # row groups being read, so each is read once
_lock = threading.Lock()

# When the configured key is the default and absent: names other tools give these columns.
CAPTION_NAMES = ("caption", "captions", "text", "txt", "sentences")


def import_pyarrow():
    """pyarrow (with pyarrow.parquet), or a DataError saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(
            "reading Parquet or `datasets` sources needs pyarrow: pip install 'mlx-clip[parquet]' "
            "(or pip install pyarrow)"
        ) from None
    return pa


def parquet_file(path: str):
    """pyarrow's ParquetFile for `path` (one place, so a test can count the bytes read). No
    pre-buffering (and no decoding threads, in _read_group): both release their buffers in pyarrow's
    threads some time after the read, which let one reader hold two to six row groups at once
    (measured in tests/test_formats_parquet_hf.py); the loader's workers are the parallelism."""
    return import_pyarrow().parquet.ParquetFile(path, pre_buffer=False)


def _read_group(ref: RowRef):
    """The image column of ref's row group (Parquet) or of its whole memory-mapped file (Arrow)."""
    pa = import_pyarrow()
    if ref.path.endswith(".arrow"):  # `datasets`' save_to_disk: an IPC stream, memory-mapped
        with pa.memory_map(ref.path) as source:
            return pa.ipc.open_stream(source).read_all().column(ref.column)
    with parquet_file(ref.path) as pf:  # closed now: a ParquetFile left to the GC holds its buffers
        return pf.read_row_group(ref.group, columns=[ref.column], use_threads=False).column(0)


def _group(ref: RowRef):
    """The image column of ref's row group, from the cache or read now (once, whichever threads ask)."""
    try:
        st = os.stat(ref.path)  # a file rewritten in place is read again, not served from the cache
    except OSError as e:
        raise DataError(f"{ref}: cannot read: {e.strerror or e}", "unreadable", str(ref)) from None
    key = (ref.path, ref.group, ref.column, st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
        loading = _loading.setdefault(key, threading.Lock()) if hit is None else None
    if loading is not None:
        with loading:  # a second thread asking for the same row group waits for the first one's read
            with _lock:
                hit = _cache.get(key)
            if hit is None:
                try:
                    hit = _read_group(ref), 0
                except Exception as e:  # kept, so a broken row group is not read again for each row
                    hit = e, 0
                _put(key, hit[0])
            with _lock:
                _loading.pop(key, None)
    value = hit[0]
    if isinstance(value, Exception):
        raise DataError(
            f"{ref.path}: row group {ref.group}, column '{ref.column}': cannot read: "
            f"{type(value).__name__}: {value}",
            "corrupt_row_group",
            str(ref),
        )
    return value


def _put(key: tuple, value) -> None:
    """Cache `value`; drop the least recently used row groups beyond CACHE_BYTES (the newest stays).
    Memory-mapped Arrow columns count as 0 bytes: the OS pages them in and out."""
    size = 0 if isinstance(value, Exception) or key[0].endswith(".arrow") else value.nbytes
    with _lock:
        _cache[key] = value, size
        total = sum(s for _, s in _cache.values())
        while len(_cache) > 1 and (total > CACHE_BYTES or len(_cache) > MAX_GROUPS):
            _, (_, dropped) = _cache.popitem(last=False)
            total -= dropped


def read_cell(ref: RowRef) -> bytes:
    """The encoded image of `ref`: its bytes, or those of the file its cell names."""
    value = _group(ref)[ref.row].as_py()
    if isinstance(value, dict):  # Hugging Face's Image storage: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise DataError(f"{ref}: column '{ref.column}': the image is null", "null_image", str(ref))
    if isinstance(value, str):
        return read_bytes(os.path.join(os.path.dirname(ref.path), value))
    return bytes(value)


def clear_cache() -> None:
    """Drop every cached row group (tests, and a program that is done with its Parquet data)."""
    with _lock:
        _cache.clear()


# ---------------------------------------------------------------------------
# Column choice


def pick_column(
    columns: list[str], candidates: list[str], key: str, default: str, what: str, where: str
) -> str:
    """The column for `what` ("image" or "caption"): `key` when present; when `key` is the default and
    absent, the one candidate (detected by type, or by a usual name for captions); otherwise a
    DataError listing the columns and the setting to change."""
    if key in columns:
        return key
    setting = f"data.{what}_key"
    if key != default:
        raise DataError(f"{where}: no column '{key}' ({setting}); columns: {', '.join(columns)}")
    named = [c for c in CAPTION_NAMES if c in candidates] if what == "caption" else []
    found = named if len(named) == 1 else candidates
    if len(found) == 1:
        print(f"data: {where}: {what} column '{found[0]}' (no column '{key}')")
        return found[0]
    if not found:
        raise DataError(
            f"{where}: no {what} column: no column '{key}' and none of a {what} type; "
            f"columns: {', '.join(columns)}; set {setting}"
        )
    raise DataError(
        f"{where}: no column '{key}' and several {what} columns could be it: {', '.join(found)}; "
        f"set {setting} to one of them"
    )


def arrow_kind(t) -> str:
    """'image' (binary, or a struct with a bytes field), 'text' (string, list of strings) or 'other'."""
    pa = import_pyarrow()
    is_text = pa.types.is_string(t) or pa.types.is_large_string(t)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "image"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "image"
    if is_text or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and arrow_kind(t.value_type) == "text"):
        return "text"
    return "other"


__all__ = [
    "CAPTION_NAMES",
    "arrow_kind",
    "clear_cache",
    "import_pyarrow",
    "parquet_file",
    "pick_column",
    "read_cell",
]
