"""Seeded, rank-aware batches of (image, caption) from a reader's samples or an in-memory array.

Pipeline, per chunk of batches (mlx-data; its workers are C++ threads):

    buffer_from_vector([{"index": i}, ...])     # this rank's indices, in epoch order
      .sample_transform(load)                   # Python: read, decode (PIL), resize / crop /
                                                #   augment / normalise -> float32 (S, S, 3)
      .batch(sizes)                             # native stacking, inside the worker
      .ordered_prefetch(prefetch, num_workers)  # parallel, but yields in buffer order

In-memory images that are already at model size and not augmented (the built-in
dataset) skip the per-sample records: one record per batch, normalised as a whole.

Decoding uses PIL, not mlx-data's `load_image`, on purpose. In mlx-data 0.1.0,
`load_image(from_memory=True)` never returns on a truncated JPEG (the worker spins
forever), which is how tar members and half-downloaded files arrive; from a path it
silently grey-fills truncated files, drops alpha and cannot read WebP. PIL gives CLIP's
exact pixels, names the broken file, and releases the GIL while decoding and resizing,
so the worker threads run in parallel.

Determinism: batch k of epoch e holds the same content for any thread count or
prefetch timing, because everything random is a pure function of (seed, epoch[, index]):
- the epoch order is `default_rng([PERM, seed, epoch]).permutation(n)`, or with
  `sampler="hard_negative"` sampler.hard_negative_order(keys, seed, epoch, global batch), or
  for a weighted mixture of sources sampler.mixture_order(mixture, seed, epoch);
- each sample draws its caption, then its augmentation, from
  `default_rng([SAMPLE, seed, epoch, index])`; in a mixture, where a sample can come up twice
  in one epoch, from `default_rng([SAMPLE, seed, epoch, index, draw])`, `draw` being its
  position in the epoch order, so each time brings other draws;
- `ordered_prefetch` returns batches in buffer order, and chunks are consumed in order.

Bad images at decode time (`on_error`, the substitute rule) and the caption drawn per
epoch: data/sample_maker.py.

Errors and early stops (data/workers.py): the callbacks never raise into mlx-data's threads. An
exception is kept and raised by the consuming thread when its batch comes up: a DataError as it
is, anything else (a tokenizer, a transform, on_skip) as a WorkerError naming the sample and its
image. Every prefetch stream is closed when its epoch ends, is left early or fails, and at exit
at the latest, so that no worker calls into Python while the interpreter shuts down.

Sharding: a global batch of batch_size * world_size consecutive indices of the epoch order
(either sampler) is split into contiguous per-rank slices. Training drops the last incomplete
global batch; evaluation keeps it (split as evenly as possible; a rank whose share is empty
gets one batch fewer), never shuffles and never augments.

Chunks: a Buffer costs ~2.5 us and ~0.8 kB per record to build, too much for a whole
epoch of millions of samples, so each epoch is built `chunk_batches` batches at a time;
the next chunk's workers start while the last `prefetch` batches of the current one drain.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.data as dx
import numpy as np

from .decode import open_image
from .readers import ON_ERROR, read_samples, split_samples
from .sample_maker import SampleMaker, sample_rng
from .sampler import (
    SAMPLERS,
    KeyWords,
    Mixture,
    epoch_permutation,
    hard_negative_order,
    key_words,
    mixture_order,
)
from .samples import DataError, Sample, Skip, TarRef
from .transforms import CLIP_PREPROCESS, ImagePreprocess, TrainTransform
from .workers import Prefetch, failed, placeholder, worker_error


@dataclass
class ArraySource:
    """In-memory images (already decoded, usually already at model size) with their captions."""

    images: np.ndarray  # uint8 (n, H, W, 3)
    captions: list[list[str]]  # n lists, each non-empty

    def __post_init__(self):
        x = self.images
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3):
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise DataError(f"ArraySource.images must be uint8 (n, H, W, 3), got {got}")
        if len(self.captions) != len(x):
            raise DataError(f"ArraySource: {len(x)} images but {len(self.captions)} caption lists")

    def __len__(self) -> int:
        return len(self.images)


def _check_arguments(
    *, batch_size, image_size, seed, rank, world_size, num_workers, prefetch, chunk_batches,
    on_error, sampler, max_image_pixels, max_aspect_ratio,
) -> None:  # fmt: skip
    """The Loader's arguments, each refused by name with the value it got."""
    for name, value, low in [
        ("batch_size", batch_size, 1),
        ("image_size", image_size, 1),
        ("seed", seed, 0),
        ("world_size", world_size, 1),
        ("num_workers", num_workers, 0),
        ("prefetch", prefetch, 1),
        ("chunk_batches", chunk_batches, 1),
    ]:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"Loader: {name} must be an int >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"Loader: rank must be in [0, {world_size}), got {rank}")
    if on_error not in ON_ERROR:
        raise ValueError(f"Loader: on_error must be one of {ON_ERROR}, got {on_error!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"Loader: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if max_image_pixels is not None and (not isinstance(max_image_pixels, int) or max_image_pixels < 1):
        raise ValueError(f"Loader: max_image_pixels must be None or an int >= 1: {max_image_pixels!r}")
    if max_aspect_ratio is not None and not max_aspect_ratio >= 1:
        raise ValueError(f"Loader: max_aspect_ratio must be None or >= 1, got {max_aspect_ratio!r}")


# ---------------------------------------------------------------------------
# The loader


class Loader:
    """Batches `{"images", "captions", "index", "caption_index"[, "tokens"]}` for one rank, epoch by epoch.

    - images: float32 (B, S, S, 3), preprocessed as `preprocess` says (the model's settings:
      ImagePreprocess.of(model_config); CLIP's by default)
    - captions: list[str] of length B (one caption per image, drawn per epoch when training)
    - index: int64 (B,), positions in `source`
    - caption_index: int64 (B,), which of its sample's captions each caption is
    - tokens: int32 (B, L), only when `tokenize` (list[str] -> int array) is given; it runs
      in the worker threads, so it must be thread-safe. Whatever it (or decoding, a transform,
      `on_skip`) raises is raised by the iterator, at that batch, as a WorkerError naming the
      sample (a DataError as it is).

    `augment` (training only): None = the source's default (TrainTransform defaults for
    files, no augmentation for an ArraySource), False = none, True or a dict of
    `train_transform` keyword arguments = augment.

    `num_workers` mlx-data threads build batches (0: synchronously, in the caller's thread),
    keeping up to `prefetch` batches ready; `chunk_batches` batches form one mlx-data Buffer.
    Leaving an epoch early (break, an exception, `close()` on its iterator) stops its workers.

    `on_error` "raise" | "skip" and `on_skip` (a callable taking a Skip): see the module doc.
    `max_image_pixels` refuses larger images from their header (None: PIL's own limit), and
    `max_aspect_ratio` thinner ones (None: any); either way only each sample's crop is decoded.
    `sampler` (training only): "random" shuffles; "hard_negative" groups samples whose captions
    share a content word into the same global batch (mlx_clip/data/sampler.py).
    `mixture` (training only, with the random sampler): `source` is several sources laid end to
    end, and an epoch draws from them by weight (sampler.mixture_order).
    """

    def __init__(
        self,
        source: list[Sample] | ArraySource,
        batch_size: int,
        image_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        prefetch: int = 4,
        augment: dict | bool | None = None,
        tokenize: Callable[[list[str]], np.ndarray] | None = None,
        chunk_batches: int = 32,
        on_error: str = "raise",
        on_skip: Callable[[Skip], None] | None = None,
        max_image_pixels: int | None = None,
        max_aspect_ratio: float | None = None,
        sampler: str = "random",
        preprocess: ImagePreprocess = CLIP_PREPROCESS,
        mixture: Mixture | None = None,
    ):
        _check_arguments(
            batch_size=batch_size, image_size=image_size, seed=seed, rank=rank, world_size=world_size,
            num_workers=num_workers, prefetch=prefetch, chunk_batches=chunk_batches, on_error=on_error,
            sampler=sampler, max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio,
        )  # fmt: skip
        self.batch_size, self.image_size, self.train, self.seed = batch_size, image_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch, self.chunk_batches = num_workers, prefetch, chunk_batches
        self.tokenize = tokenize
        self.on_error, self.on_skip, self.max_image_pixels = on_error, on_skip, max_image_pixels
        self.max_aspect_ratio, self.preprocess = max_aspect_ratio, preprocess
        self._failures: dict[tuple[int, int], Exception] = {}  # (epoch, sample): raised in a callback

        if isinstance(source, ArraySource):
            self._array, self._images, self.captions = source, None, source.captions
        else:
            self._array, self._images = None, [s.image for s in source]
            self.captions = [list(s.captions) for s in source]
        self.num_samples = len(self.captions)
        if self.num_samples == 0:
            raise DataError("Loader: the source has no samples")
        empty = next((i for i, c in enumerate(self.captions) if not c), None)
        if empty is not None:
            raise DataError(f"Loader: sample {empty} has no captions")
        self.sampler = sampler if train else "random"  # evaluation keeps the dataset order
        self.mixture = mixture if train else None
        if self.mixture is not None and (sum(mixture.sizes) != self.num_samples or sampler != "random"):
            raise ValueError(
                f"Loader: a mixture of {sum(mixture.sizes)} samples over a source of {self.num_samples}, "
                f"sampler {sampler!r}: the sizes must add up to the source and the sampler be 'random'"
            )
        # samples drawn per training epoch (a mixture: those of its sources of weight > 0)
        self.epoch_size = self.num_samples if self.mixture is None else self.mixture.draws
        if train and self.epoch_size < batch_size * world_size:
            raise DataError(
                f"Loader: {self.epoch_size} samples are fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower batch_size"
            )
        self._keys: KeyWords | None = None  # hard_negative: found on first use, once

        augment = self._make_augment(augment)
        self._make = SampleMaker(
            self.captions,
            images=self._images,
            array=None if self._array is None else self._array.images,
            train=train,
            seed=seed,
            image_size=image_size,
            preprocess=preprocess,
            augment=augment,
            tokenize=tokenize,
            on_error=on_error,
            on_skip=on_skip,
            max_image_pixels=max_image_pixels,
            max_aspect_ratio=max_aspect_ratio,
            offsets=None if self.mixture is None else self.mixture.offsets,
        )
        # In-memory images at model size with no augmentation only need normalising: see _batch_fn.
        self._whole_batches = (
            self._array is not None
            and augment is None
            and self._array.images.shape[1:3] == (image_size, image_size)
        )

    def _make_augment(self, augment: dict | bool | None) -> TrainTransform | None:
        if not self.train or augment is False:
            return None
        if augment is None:
            return None if self._array is not None else self.preprocess.train_transform(self.image_size)
        kwargs = {} if augment is True else dict(augment)
        try:
            return self.preprocess.train_transform(self.image_size, **kwargs)
        except TypeError:
            valid = "scale, ratio, color_jitter, hflip"
            raise ValueError(f"Loader: unknown augment key in {sorted(kwargs)} (valid: {valid})") from None

    @property
    def image_refs(self) -> list | None:
        """Each sample's image reference (None for in-memory images): what sample ids are made of."""
        return self._images

    @property
    def num_skipped(self) -> int:
        """Failed decodes replaced by a substitute (on_error="skip")."""
        return self._make.num_skipped

    def digest(self, start: int = 0, stop: int | None = None) -> str:
        """sha256 of the ordered samples [start, stop) (image reference or pixels, and captions): a
        resumed run compares it to find out whether the data changed (data/run_data.py)."""
        h = hashlib.sha256()
        if self._array is not None:
            h.update(np.ascontiguousarray(self._array.images[start:stop]).data)
        for i in range(*slice(start, stop).indices(self.num_samples)):
            image = "" if self._array is not None else str(self._images[i])
            h.update(json.dumps([image, self.captions[i]]).encode() + b"\n")
        return h.hexdigest()

    # -- batch layout ---------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        n, g = self.num_samples, self.batch_size * self.world_size
        if self.train:
            return self.epoch_size // g
        rest = n % g  # the last, partial global batch reaches ranks < rest only
        return n // g + (1 if rest and self.rank < rest else 0)

    @property
    def key_words(self) -> KeyWords:
        """The hard-negative sampler's key words per sample (content words shared by its captions)."""
        if self._keys is None:
            self._keys = key_words(self.captions)
        return self._keys

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training order of `epoch`: a permutation of all samples, the same on every rank."""
        n, g = self.num_samples, self.batch_size * self.world_size
        if self.sampler == "hard_negative":
            return hard_negative_order(self.key_words, self.seed, epoch, g)
        if self.mixture is not None:
            return mixture_order(self.mixture, self.seed, epoch)
        return epoch_permutation(self.seed, epoch, n)

    def source_counts(self, epoch: int) -> np.ndarray | None:
        """A mixture: the draws of each source in the batches `epoch` trains on (all ranks)."""
        if self.mixture is None:
            return None
        used = len(self) * self.batch_size * self.world_size  # the last partial batch is dropped
        return self.mixture.counts(self.epoch_order(epoch)[:used])

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's dataset indices for every batch of `epoch`: int64 arrays of length <= B."""
        n, b, g, r = self.num_samples, self.batch_size, self.batch_size * self.world_size, self.rank
        if self.train:
            order = self.epoch_order(epoch)
            return [order[k * g + r * b : k * g + (r + 1) * b] for k in range(len(order) // g)]
        order, out = np.arange(n, dtype=np.int64), []
        for k in range(0, n, g):
            glob_batch = order[k : k + g]
            part = (
                glob_batch[r * b : (r + 1) * b]
                if len(glob_batch) == g
                else np.array_split(glob_batch, self.world_size)[r]
            )
            if len(part):
                out.append(part)
        return out

    # -- the callbacks mlx-data runs: they never raise into its threads (data/workers.py) --

    def _draws(self, epoch_batches: int) -> list[np.ndarray] | None:
        """A mixture: each of this rank's batches' positions in the epoch order, which key the
        per-sample draws (a sample can come up twice in an epoch); None otherwise."""
        if self.mixture is None:
            return None
        b, g = self.batch_size, self.batch_size * self.world_size
        return [np.arange(k * g + self.rank * b, k * g + (self.rank + 1) * b) for k in range(epoch_batches)]

    def _sample_fn(self, epoch: int, stop: threading.Event) -> Callable[[dict], dict]:
        def fn(s: dict) -> dict:
            i = int(s["index"])
            draw = int(s["draw"]) if "draw" in s else None
            if not stop.is_set():  # set: the stream is closing, nobody will read this
                try:
                    return self._make.sample(epoch, i, draw)
                except Exception as e:  # kept for the consuming thread, which raises it (_finish)
                    self._failures[epoch, i] = e
            out = {"index": placeholder(i), "image": np.zeros((0, 0, 3), np.float32), "caption": np.int64(0)}
            if self.tokenize is not None:
                out["tokens"] = np.zeros(0, np.int32)  # batching pads the placeholder's arrays
            return out

        return fn

    def _batch_fn(
        self, epoch: int, batches: list[np.ndarray], stop: threading.Event
    ) -> Callable[[dict], dict]:
        def fn(s: dict) -> dict:
            idx = batches[int(s["batch"])]
            if stop.is_set():
                return {"index": placeholder(idx)}
            try:
                return self._make.whole_batch(epoch, idx)
            except Exception as e:  # kept for the consuming thread, under the sample that fails
                i, e = self._culprit(epoch, idx, e)
                self._failures[epoch, i] = e
                return {"index": np.full(len(idx), placeholder(i))}

        return fn

    def _culprit(self, epoch: int, idx: np.ndarray, e: Exception) -> tuple[int, Exception]:
        """(sample, its error) for a whole batch that failed: the first sample that fails alone."""
        for i in idx.tolist():
            try:
                self._make.whole_batch(epoch, np.array([i]))
            except Exception as alone:
                return i, alone
        return int(idx[0]), e

    def _buffer(self, epoch: int, batches: list[np.ndarray], stop: threading.Event, draws=None):
        """A lazy mlx-data Buffer whose item j is batch j of `batches` (with `draws`, a mixture's
        positions of its samples); its callbacks skip the work once `stop` is set."""
        if self._whole_batches:
            records = [{"batch": j} for j in range(len(batches))]
            return dx.buffer_from_vector(records).sample_transform(self._batch_fn(epoch, batches, stop))
        if draws is None:
            records = [{"index": int(i)} for b in batches for i in b]
        else:
            pairs = zip(np.concatenate(batches).tolist(), np.concatenate(draws).tolist(), strict=True)
            records = [{"index": i, "draw": p} for i, p in pairs]
        buf = dx.buffer_from_vector(records)
        return buf.sample_transform(self._sample_fn(epoch, stop)).batch([len(b) for b in batches])

    # -- iteration ---------------------------------------------------------------

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """Batches of `epoch` from `start_batch` on; skipped batches are never decoded."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(start_batch, (int, np.integer)) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}], got {start_batch!r}")
        epoch, start_batch = int(epoch), int(start_batch)
        batches = self.rank_batches(epoch)
        draws = self._draws(len(batches))
        return self._iterate(epoch, batches[start_batch:], draws and draws[start_batch:])

    def _iterate(self, epoch: int, batches: list[np.ndarray], draws=None) -> Iterator[dict]:
        c = self.chunk_batches
        chunks = [batches[i : i + c] for i in range(0, len(batches), c)]
        chunk_draws = (
            [None] * len(chunks) if draws is None else [draws[i : i + c] for i in range(0, len(draws), c)]
        )
        if self.num_workers == 0:  # synchronous: the reference the threaded path must match
            for chunk, d in zip(chunks, chunk_draws, strict=True):
                buf = self._buffer(epoch, chunk, threading.Event(), d)
                for j in range(len(chunk)):
                    yield self._finish(buf[j], epoch)
            return
        if not chunks:
            return
        cur, nxt = None, self._stream(epoch, chunks[0], chunk_draws[0])
        try:
            for ci, chunk in enumerate(chunks):
                if cur is not None:
                    cur.close()  # drained
                cur, nxt = nxt, None
                for j in range(len(chunk)):
                    if nxt is None and ci + 1 < len(chunks) and j >= len(chunk) - self.prefetch:
                        nxt = self._stream(epoch, chunks[ci + 1], chunk_draws[ci + 1])  # fill ahead
                    yield self._finish(cur.next(), epoch)
        finally:  # ended, left early or failed: no stream outlives the epoch (data/workers.py)
            for stream in (cur, nxt):
                if stream is not None:
                    stream.close()

    def _stream(self, epoch: int, chunk: list[np.ndarray], draws=None) -> Prefetch:
        ahead = max(self.prefetch, self.num_workers)  # every worker needs a batch slot
        stop = threading.Event()
        buffer = self._buffer(epoch, chunk, stop, draws)
        return Prefetch(buffer.ordered_prefetch(ahead, self.num_workers), stop)

    def _finish(self, b: dict, epoch: int) -> dict:
        index = b["index"].astype(np.int64, copy=False)
        bad = failed(index)
        if bad is not None:  # a callback raised: raise it here, in the consuming thread
            raise worker_error(self._failures.pop((epoch, bad), None), bad, self._make.describe(bad))
        captions = [self.captions[i][c] for i, c in zip(index.tolist(), b["caption"].tolist(), strict=True)]
        out = {"images": b["image"], "captions": captions, "index": index}
        out["caption_index"] = b["caption"].astype(np.int64, copy=False)  # which of its captions each drew
        if "tokens" in b:
            out["tokens"] = b["tokens"].astype(np.int32, copy=False)
        return out


__all__ = [
    "ArraySource",
    "DataError",
    "Loader",
    "Sample",
    "TarRef",
    "epoch_permutation",
    "open_image",
    "read_samples",
    "sample_rng",
    "split_samples",
]
