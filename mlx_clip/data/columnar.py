"""Image cells of Parquet and Arrow files, read at decode time one row group at a time, and the column
choice the Parquet and `datasets` readers share.

A sample of a Parquet or `datasets` source holds a RowRef (file, row group, row, column): the
index keeps no image bytes. `read_cell` reads the image column of the ref's row group (Parquet) or
memory-maps the Arrow file (`datasets`), keeps that one column chunk per thread, so consecutive rows
of one group are read once, and returns the row's encoded bytes. Each loader worker thread (and each
pre-flight scan thread) holds at most one row group's image column: memory is bounded by
threads x row group, whatever the file size, in any access order. Random order reads a row group
per sample when the cache misses, so small row groups (100-1000 images, as `datasets` writes image
Parquet) suit shuffled training best.

An image cell is raw bytes, Hugging Face's `{"bytes", "path"}` struct (bytes first, else the file
at path) or a string path; paths are relative to the Parquet or Arrow file that names them.
pyarrow is imported lazily: only these formats need it (`pip install 'mlx-clip[parquet]'`).
"""

from __future__ import annotations

import os
import threading

from .samples import DataError, RowRef, read_bytes

_local = threading.local()  # .group: ((path, group, column), column values or the read error)

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
    pre-buffering: its read-ahead buffers are released by an I/O thread some time after the read,
    which let a worker hold two or three row groups at once (measured in the streaming test)."""
    return import_pyarrow().parquet.ParquetFile(path, pre_buffer=False)


def _read_group(ref: RowRef):
    """The image column of ref's row group (Parquet) or of its whole memory-mapped file (Arrow)."""
    pa = import_pyarrow()
    if ref.path.endswith(".arrow"):  # `datasets`' save_to_disk: an IPC stream, memory-mapped
        with pa.memory_map(ref.path) as source:
            return pa.ipc.open_stream(source).read_all().column(ref.column)
    with parquet_file(ref.path) as pf:  # closed now: a ParquetFile left to the GC holds its buffers
        return pf.read_row_group(ref.group, columns=[ref.column]).column(0)


def _group(ref: RowRef):
    key = (ref.path, ref.group, ref.column)
    cached = getattr(_local, "group", None)
    if cached is None or cached[0] != key:
        _local.group = cached = None  # drop the previous row group before reading the next
        try:
            cached = key, _read_group(ref)
        except Exception as e:  # kept, so a broken row group is not read again for each of its rows
            cached = key, e
        _local.group = cached
    if isinstance(cached[1], Exception):
        e = cached[1]
        raise DataError(
            f"{ref.path}: row group {ref.group}, column '{ref.column}': cannot read: {type(e).__name__}: {e}",
            "corrupt_row_group",
            str(ref),
        )
    return cached[1]


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
    """Drop this thread's row group (tests, and a reader that is done with a file)."""
    _local.group = None


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
