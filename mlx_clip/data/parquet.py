"""Parquet sources: `data.train: data/*.parquet`, one file, or a folder of .parquet files.

Hugging Face hub datasets (COCO captions, Flickr30k, ...) and img2dataset's parquet output keep the
image bytes inline. The index reads the caption column only, row group by row group; each sample
holds a RowRef (file, row group, row, image column) whose bytes the loader reads when it decodes
the image (data/columnar.py): no file is ever loaded whole.

Columns: `data.image_key` (default "image") holds raw bytes, Hugging Face's `{"bytes", "path"}`
struct or a path relative to the file; `data.caption_key` (default "caption") a string or a list of
strings. When a default name is absent, the one column of the right type is used and named
(img2dataset: image bytes in "jpg"); several candidates are an error listing them.

Bad input: a missing column raises, listing the file's columns. A row group whose caption column
cannot be read costs its rows (a counted skip each, "corrupt_row_group", naming file and row
group): like a truncated tar shard, the rest of the file still trains, and the bad-share rule
(data.max_bad_fraction) stops the run if too much is lost. A row group whose image column cannot be
read, a null image or bytes that are not an image are found by the pre-flight scan (or replaced at
decode time) as for any other format.
"""

from __future__ import annotations

import os

from .columnar import arrow_kind, import_pyarrow, parquet_file, pick_column
from .samples import Collector, DataError, RowRef
from .tar_shards import shard_paths


def parquet_paths(source: str) -> list[str]:
    """The .parquet files of a path, glob, {a,b} pattern or folder (its top-level .parquet files)."""
    return shard_paths(source, ".parquet")


def _columns(path: str, schema, image_key: str, caption_key: str) -> tuple[str, str]:
    pa = import_pyarrow()
    names = list(schema.names)
    images = [n for n in names if arrow_kind(schema.field(n).type) == "image"]
    image = pick_column(names, images, image_key, "image", "image", path)
    texts = [n for n in names if n != image and arrow_kind(schema.field(n).type) == "text"]
    caption = pick_column(names, texts, caption_key, "caption", "caption", path)
    t = schema.field(image).type
    if arrow_kind(t) != "image" and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(
            f"{path}: image column '{image}' is {t}; expected binary (image bytes), a struct with "
            "'bytes' and 'path' (Hugging Face's Image) or a string (a path relative to the file)"
        )
    return image, caption


def _read_file(path: str, out: Collector, image: str, caption: str) -> None:
    try:
        pf = parquet_file(path)
    except OSError as e:  # pyarrow's ArrowInvalid / ArrowIOError are OSErrors too
        raise DataError(f"{path}: not a readable Parquet file: {type(e).__name__}: {e}") from None
    names = list(pf.schema_arrow.names)
    for key in (image, caption):
        if key not in names:
            raise DataError(f"{path}: no column '{key}' (columns: {', '.join(names)})")
    by_path = arrow_kind(pf.schema_arrow.field(image).type) != "image"  # a column of file names
    columns = [caption, image] if by_path else [caption]  # never the image bytes
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g, columns=columns)
        except Exception as e:
            msg = f"{path}: row group {g} ({n} rows): cannot read column '{caption}': {type(e).__name__}: {e}"
            for r in range(n):
                out.fail(DataError(msg, "corrupt_row_group", str(RowRef(path, g, r, image))))
            continue
        captions = table.column(caption).to_pylist()
        files = table.column(image).to_pylist() if by_path else [None] * n
        for r, (text, name) in enumerate(zip(captions, files, strict=True)):
            ref = RowRef(path, g, r, image)
            where = f"{path}: row group {g}, row {r}"
            if by_path:
                if not name:
                    out.fail(
                        DataError(f"{where}: column '{image}': the image is null", "null_image", str(ref))
                    )
                    continue
                ref = _relative(path, name)
            out.add(ref, [] if text is None else text, where)


def _relative(path: str, name: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(path), name))


def read_parquet(source: str, out: Collector, image_key: str, caption_key: str) -> None:
    """Every row of the source's Parquet files into `out`, one RowRef (or path) per row."""
    paths = parquet_paths(str(source))
    import_pyarrow()
    image, caption = _columns(paths[0], parquet_file(paths[0]).schema_arrow, image_key, caption_key)
    for path in paths:
        _read_file(path, out, image, caption)


__all__ = ["parquet_paths", "read_parquet"]
