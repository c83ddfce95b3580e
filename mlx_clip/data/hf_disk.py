"""Hugging Face `datasets` saved to disk: `data.train: hf:DIR[:split]`.

DIR is what `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote (Arrow files with
`dataset_info.json` and `state.json`; a DatasetDict adds `dataset_dict.json` and a folder per
split). A DatasetDict's split is `:split` (default "train"); a split it does not have is an error
listing those it has. `datasets` (an optional extra: `pip install 'mlx-clip[hf]'`) opens the folder
and says which columns are `Image` features; the Arrow files are then memory-mapped and only the
caption column is read up front. Each sample holds a RowRef (Arrow file, row, image column) whose
bytes are read when the loader decodes it (data/columnar.py), so no image is decoded at index time.

Columns: the `Image` feature column (data.image_key when set and present) and the caption column,
a string or list of strings (data.caption_key when present; otherwise the one string column, or the
one with a usual caption name; several are an error listing them).

Offline only: a name that is not a folder (`hf:nlphuji/flickr30k`) is refused with the command that
downloads it to a folder, which `hf:DIR` then reads.
"""

from __future__ import annotations

import os

from .columnar import arrow_kind, import_pyarrow, pick_column
from .samples import Collector, DataError, RowRef


def parse_source(source: str) -> tuple[str, str | None]:
    """`hf:DIR[:split]` (or a plain DIR) -> (DIR, split or None); a DIR that does not exist is refused."""
    rest = source[3:] if source.startswith("hf:") else source
    path, split = rest, None
    if not os.path.exists(rest) and ":" in rest:
        path, split = rest.rsplit(":", 1)
    if not os.path.isdir(path):
        name = path.rstrip("/")
        raise DataError(
            f"{source}: no such folder. mlx_clip reads Hugging Face datasets from disk only, never from "
            f"the hub: download it first, e.g.\n"
            f"  python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('DIR')\"\n"
            f"then set data.train: hf:DIR (or hf:DIR:SPLIT); or fetch its Parquet files with\n"
            f"  huggingface-cli download {name} --repo-type dataset --local-dir DIR\n"
            f"and set data.train to DIR's .parquet files (DIR/**/*.parquet as a glob, or their folder)"
        )
    return path, split


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "hf: sources need the `datasets` package: pip install 'mlx-clip[hf]' (or pip install datasets)"
        ) from None
    return datasets


def load(source: str):
    """(the split's datasets.Dataset, a name for messages) for `hf:DIR[:split]`."""
    datasets = _import_datasets()
    path, split = parse_source(source)
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{source}: not a `datasets` save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(
                f"{source}: no split '{split}' in {path} (splits: {', '.join(ds)}); use hf:{path}:SPLIT"
            )
        ds = ds[split]
    elif split is not None and split != str(ds.split):
        raise DataError(
            f"{source}: {path} holds a single Dataset (split {ds.split}), not a DatasetDict: "
            f"use hf:{path} without ':{split}'"
        )
    if ds._indices is not None:  # not written by save_to_disk, which flattens them
        raise DataError(f"{source}: the dataset has an indices mapping; save it with flatten_indices() first")
    return ds, f"hf:{path}" + (f":{split}" if split else "")


def arrow_files(source: str) -> list[str]:
    """The Arrow files of `hf:DIR[:split]`, in row order."""
    ds, _ = load(source)
    return [f["filename"] for f in ds.cache_files]


def _columns(ds, name: str, image_key: str, caption_key: str) -> tuple[str, str]:
    datasets = _import_datasets()
    schema = ds.data.schema
    names = list(schema.names)
    images = [n for n, f in ds.features.items() if isinstance(f, datasets.Image)]
    image = pick_column(names, images, image_key, "image", "image", name)
    if image not in images and arrow_kind(schema.field(image).type) != "image":
        raise DataError(f"{name}: column '{image}' is {ds.features[image]}, not an Image feature or bytes")
    texts = [n for n in names if n != image and arrow_kind(schema.field(n).type) == "text"]
    return image, pick_column(names, texts, caption_key, "caption", "caption", name)


def read_hf(source: str, out: Collector, image_key: str, caption_key: str) -> None:
    """Every row of the split into `out`: a RowRef per row, its captions read from the Arrow files."""
    pa = import_pyarrow()
    ds, name = load(source)
    image, caption = _columns(ds, name, image_key, caption_key)
    for f in ds.cache_files:
        path = f["filename"]
        with pa.memory_map(path) as mm:  # zero-copy: the image column is never touched here
            captions = pa.ipc.open_stream(mm).read_all().column(caption).to_pylist()
        for r, text in enumerate(captions):
            out.add(RowRef(path, 0, r, image), [] if text is None else text, f"{name}: {path}, row {r}")


__all__ = ["arrow_files", "load", "parse_source", "read_hf"]
