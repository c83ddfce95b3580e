"""Stored per-sample embeddings (a teacher's, written by `python -m mlx_clip.embed`), framework-free.

A store is a directory:

    index.json                       written last: version, teacher (path, sha256 of its weights,
                                     logit scale), embed_dim, dtype, source (+ its description and,
                                     for the built-in data, the digest of its samples), samples,
                                     captions, shards [{file, samples, captions}]
    embeddings-00000.safetensors     up to SHARD_SAMPLES samples each:
        image            (n, D) L2-normalised image embeddings, float16 or float32
        text             (m, D) L2-normalised embeddings of every caption of those samples, in order
        caption_offsets  int64 (n + 1,): sample i's captions are text rows offsets[i]:offsets[i+1]
        ids              uint8: the samples' ids (data/samples.sample_id), utf-8, joined by NUL bytes

Sample ids are image references relative to the source's folder (or the built-in index), so a
training run finds each of its samples' rows by id, whatever its split or order (`align`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .samples import DataError

VERSION = 1
INDEX = "index.json"
SHARD_SAMPLES = 4096
DTYPES = ("float16", "float32")


class StoreError(DataError):
    """A store that is missing, incomplete or does not match the data it is used with."""


@dataclass
class Store:
    directory: Path
    index: dict
    ids: list[str]
    image: np.ndarray  # (N, D) float32
    text: np.ndarray  # (M, D) float32
    offsets: np.ndarray  # int64 (N + 1,): sample i's caption rows


@dataclass
class Aligned:
    """A store's rows in the order of a loader's samples: sample i (a loader position) has image
    row i and text rows start[i] + c for its caption c."""

    image: np.ndarray  # (n, D) float32
    text: np.ndarray  # (m, D) float32
    start: np.ndarray  # int64 (n,)

    def rows(self, index: np.ndarray, caption_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) image rows and (B, D) rows of the captions drawn, for a batch's index / caption_index."""
        return self.image[index], self.text[self.start[index] + caption_index]


def _shard_name(k: int) -> str:
    return f"embeddings-{k:05d}.safetensors"


def _pack_ids(ids: list[str]) -> np.ndarray:
    bad = next((i for i in ids if "\0" in i), None)
    if bad is not None:
        raise StoreError(f"sample id {bad!r} contains a NUL byte")
    return np.frombuffer("\0".join(ids).encode(), np.uint8).copy()


def _unpack_ids(packed: np.ndarray, n: int) -> list[str]:
    return packed.tobytes().decode().split("\0") if n else []


def write_store(
    out: str | Path,
    ids: list[str],
    image: np.ndarray,
    text: np.ndarray,
    captions_per_sample: list[int],
    meta: dict,
    dtype: str = "float16",
    shard_samples: int = SHARD_SAMPLES,
) -> Path:
    """Write the shards, then index.json (meta plus what the shards hold); returns its path."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    n, dim = image.shape
    offsets = np.concatenate([[0], np.cumsum(captions_per_sample)]).astype(np.int64)
    if len(ids) != n or len(captions_per_sample) != n or offsets[-1] != len(text):
        raise StoreError(
            f"{n} images, {len(ids)} ids, {len(captions_per_sample)} caption counts, {len(text)} texts"
        )
    if len(set(ids)) != n:
        raise StoreError(f"{out}: {n - len(set(ids))} duplicate sample ids")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, a in enumerate(range(0, n, shard_samples)):
        b = min(a + shard_samples, n)
        tensors = {
            "image": image[a:b].astype(dtype),
            "text": text[offsets[a] : offsets[b]].astype(dtype),
            "caption_offsets": offsets[a : b + 1] - offsets[a],
            "ids": _pack_ids(ids[a:b]),
        }
        save_file(tensors, str(out / _shard_name(k)), metadata={"embed_dim": str(dim)})
        shards.append({"file": _shard_name(k), "samples": b - a, "captions": int(offsets[b] - offsets[a])})
    index = {"version": VERSION, **meta, "embed_dim": dim, "dtype": dtype, "samples": n}
    index.update(captions=int(offsets[-1]), shards=shards)
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)  # a half-written store has no index.json
    return out / INDEX


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise StoreError(
            f"{path}: missing; write the embeddings with "
            "`python -m mlx_clip.embed --checkpoint TEACHER --data SOURCE --out DIR`"
        )
    index = json.loads(path.read_text())
    if index.get("version") != VERSION:
        raise StoreError(f"{path}: version {index.get('version')}, this mlx_clip reads version {VERSION}")
    return index


def read_store(directory: str | Path) -> Store:
    """Every shard listed in index.json, checked against it (embed dim, counts), as float32."""
    directory = Path(directory)
    index = read_index(directory)
    dim, ids, images, texts, offsets = index["embed_dim"], [], [], [], [np.zeros(1, np.int64)]
    for shard in index["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise StoreError(f"{path}: missing (listed in {directory / INDEX}); embed the source again")
        t = load_file(str(path))
        n, m = shard["samples"], shard["captions"]
        for name, rows in (("image", n), ("text", m)):
            if t[name].ndim != 2 or t[name].shape[1] != dim:
                raise StoreError(
                    f"{path}: {name} embeddings have shape {t[name].shape}, but {directory / INDEX} says "
                    f"embed_dim {dim}; the shards come from different teachers: embed the source again"
                )
            if t[name].shape[0] != rows:
                raise StoreError(f"{path}: {t[name].shape[0]} {name} rows, {directory / INDEX} says {rows}")
        ids += _unpack_ids(t["ids"], n)
        images.append(t["image"].astype(np.float32))
        texts.append(t["text"].astype(np.float32))
        offsets.append(t["caption_offsets"][1:] + offsets[-1][-1])
    if len(ids) != index["samples"]:
        raise StoreError(
            f"{directory}: the shards hold {len(ids)} samples, index.json says {index['samples']}"
        )
    image = np.concatenate(images) if images else np.zeros((0, dim), np.float32)
    text = np.concatenate(texts) if texts else np.zeros((0, dim), np.float32)
    return Store(directory, index, ids, image, text, np.concatenate(offsets))


def align(store: Store, ids: list[str], captions_per_sample: list[int]) -> Aligned:
    """The store's rows for these samples (a loader's ids and caption counts, in its order).
    Every id must be in the store with as many captions; an error names the missing ones."""
    row = {sid: i for i, sid in enumerate(store.ids)}
    missing = [sid for sid in ids if sid not in row]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise StoreError(
            f"{store.directory}: {len(missing)} of the {len(ids)} training samples have no teacher "
            f"embeddings ({shown}); embed the training source with python -m mlx_clip.embed "
            f"(this store holds {store.index.get('source')!r})"
        )
    rows = np.array([row[sid] for sid in ids], np.int64)
    counts = store.offsets[rows + 1] - store.offsets[rows]
    differ = np.flatnonzero(counts != np.asarray(captions_per_sample))
    if len(differ):
        i = int(differ[0])
        raise StoreError(
            f"{store.directory}: sample {ids[i]!r} has {counts[i]} stored captions but "
            f"{captions_per_sample[i]} in the training source ({len(differ)} samples differ); embed it again"
        )
    return Aligned(store.image[rows], store.text, store.offsets[rows])
