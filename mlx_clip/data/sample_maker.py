"""One sample of a Loader as an mlx-data record: its caption for the epoch, its decoded and
transformed image, and a substitute when the image cannot be decoded. This runs in the mlx-data
worker threads (data/pipeline.py); everything random is drawn from (seed, epoch, index).

Bad images at decode time (`on_error`): "raise" (the default) raises a DataError naming
the file. "skip" replaces the sample, so an image that slipped past the pre-flight scan
(checks.py) never stops an epoch: the substitute is drawn from
`default_rng([SUBST, seed, epoch, index])`, which then also draws its caption and
augmentation, so batches stay a pure function of (seed, epoch) and of the files (in a mixture of
sources, the substitute comes from the failed sample's own source, keeping the weights). The
batch's "index" and caption are the substitute's, so images and captions stay paired.
Each failed decode is counted (`num_skipped`) and passed to `on_skip` as a Skip, once per
(epoch, sample, failed index) for the loader's lifetime (under a lock; the order of calls
across worker threads is not deterministic, their content is).

Several captions per sample: training draws one per (seed, epoch, index), uniformly, so an
image shows different captions in different epochs and a resumed run draws the same ones;
evaluation returns the first (retrieval metrics use them all: metrics.evaluate_run).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from .decode import decode_image, describe
from .samples import DataError, Skip
from .transforms import ImagePreprocess, TrainTransform

# First words of the per-sample seed sequences (sampler.PERM and sampler.HARD order the epochs).
SAMPLE, SUBST = 2, 3
# on_error="skip": this many failed substitutes in a row mean the data is not readable at all.
MAX_SUBSTITUTES = 16


def sample_rng(seed: int, epoch: int, index: int, draw: int | None = None) -> np.random.Generator:
    """Sample `index`'s stream in `epoch`; a mixture also keys it on the `draw` (its position in the
    epoch order), since a sample can come up more than once in an epoch there."""
    return np.random.default_rng([SAMPLE, seed, epoch, index, *([] if draw is None else [draw])])


class SampleMaker:
    """Sample i of an epoch, as the Loader's records: `sample(epoch, i)` one at a time, or
    `whole_batch(epoch, idx)` for in-memory images at model size that only need normalising.

    `images` (file references) or `array` (an ArraySource's uint8 images) hold the pixels;
    `augment` is the training transform (None: `preprocess`'s eval transform). Failed decodes are counted in
    `num_skipped` and passed to `on_skip` (on_error="skip").
    """

    def __init__(
        self,
        captions: list[list[str]],
        *,
        images: list | None,
        array: np.ndarray | None,
        train: bool,
        seed: int,
        image_size: int,
        preprocess: ImagePreprocess,
        augment: TrainTransform | None,
        tokenize: Callable[[list[str]], np.ndarray] | None,
        on_error: str,
        on_skip: Callable[[Skip], None] | None,
        max_image_pixels: int | None,
        max_aspect_ratio: float | None,
        offsets: np.ndarray | None = None,
    ):
        """`offsets`: a mixture's source boundaries in `captions` (sampler.Mixture.offsets)."""
        self.captions, self._images, self._array = captions, images, array
        self._offsets = np.array([0, len(captions)]) if offsets is None else offsets
        self.train, self.seed, self.tokenize = train, seed, tokenize
        self._eval, self._augment = preprocess.eval_transform(image_size), augment
        self._normalize = preprocess.normalize
        self.on_error, self.on_skip = on_error, on_skip
        self.max_image_pixels, self.max_aspect_ratio = max_image_pixels, max_aspect_ratio
        self.num_skipped = 0  # failed decodes replaced by a substitute (on_error="skip")
        self._skip_lock = threading.Lock()
        self._reported: set[tuple[int, int, int]] = set()

    def describe(self, i: int) -> str:
        """The image of sample i, for messages."""
        return "in-memory image" if self._array is not None else str(self._images[i])

    def _caption_rng(
        self, epoch: int, i: int, draw: int | None = None
    ) -> tuple[np.random.Generator | None, int]:
        """(the sample's generator, its caption for this epoch); eval: (None, first caption)."""
        if not self.train:
            return None, 0
        rng = sample_rng(self.seed, epoch, i, draw)
        return rng, int(rng.integers(len(self.captions[i])))  # drawn first: independent of augmentation

    def _transform(self, image, rng: np.random.Generator | None) -> np.ndarray:
        return self._augment(image, rng) if self._augment is not None else self._eval(image)  # (S, S, 3)

    def _decode(self, i: int, rng: np.random.Generator | None) -> np.ndarray:
        # Bounded: limits from the header, then only the crop is decoded and resized (data/decode.py).
        return decode_image(
            self._images[i],
            self._transform,
            rng,
            max_pixels=self.max_image_pixels,
            max_aspect=self.max_aspect_ratio,
        )

    def _decode_or_substitute(self, epoch: int, i: int, draw: int | None) -> tuple[int, np.ndarray, int]:
        """(index used, image, caption choice): sample i, or a substitute if i cannot be decoded."""
        rng, choice = self._caption_rng(epoch, i, draw)
        try:
            return i, self._decode(i, rng), choice
        except Exception as e:  # DataError from decoding, or a transform failing on odd pixels
            failed = [(i, e)]
        # draws index, caption, augmentation (a mixture: per draw, like sample_rng)
        sub = np.random.default_rng([SUBST, self.seed, epoch, i, *([] if draw is None else [draw])])
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1  # its source (one: 0)
        lo, hi = int(self._offsets[s]), int(self._offsets[s + 1])
        for _ in range(MAX_SUBSTITUTES):
            j = lo + int(sub.integers(hi - lo))
            choice = int(sub.integers(len(self.captions[j]))) if self.train else 0
            try:
                x = self._decode(j, sub)
            except Exception as e:
                failed.append((j, e))
                continue
            for k, err in failed:
                self._report(epoch, i, k, j, err)
            return j, x, choice
        raise DataError(
            f"Loader: sample {i} and {MAX_SUBSTITUTES} substitutes in a row cannot be decoded; "
            f"is the data readable? First error: {describe(failed[0][1])}"
        )

    def _report(self, epoch: int, i: int, index: int, substitute: int, e: Exception) -> None:
        """Count and pass on one failed decode, once per (epoch, position): mlx-data's prefetch
        can run a sample's transform twice, and repeated evaluations decode the same samples."""
        with self._skip_lock:
            if (epoch, i, index) in self._reported:
                return
            self._reported.add((epoch, i, index))
        image = self._images[index]
        if isinstance(e, DataError):
            item, reason, detail = e.item or str(image), e.reason, str(e)
        else:
            item, reason, detail = (
                str(image),
                "corrupt_image",
                f"{image}: cannot preprocess image: {describe(e)}",
            )
        skip = Skip(item, reason, detail, "decode", epoch, index, substitute)
        with self._skip_lock:
            self.num_skipped += 1
            if self.on_skip is not None:
                self.on_skip(skip)

    def sample(self, epoch: int, i: int, draw: int | None = None) -> dict:
        """Sample i of `epoch` as an mlx-data record: index, image (S, S, 3), caption choice[, tokens].
        `draw`: a mixture's position of the sample in the epoch order (sample_rng)."""
        if self._array is not None:
            rng, choice = self._caption_rng(epoch, i, draw)
            x = self._transform(self._array[i], rng)
        elif self.on_error == "raise":
            rng, choice = self._caption_rng(epoch, i, draw)
            x = self._decode(i, rng)
        else:
            i, x, choice = self._decode_or_substitute(epoch, i, draw)
        out = {"index": np.asarray(i, np.int64), "image": x, "caption": np.int64(choice)}
        if self.tokenize is not None:
            caption = self.captions[i][choice]
            out["tokens"] = np.asarray(self.tokenize([caption]), np.int32).reshape(-1)  # (L,)
        return out

    def whole_batch(self, epoch: int, idx: np.ndarray) -> dict:
        """Whole batches at once, for in-memory images that only need normalising.

        Per-sample mlx-data records cost more than normalising a small image, so this path
        slices and normalises (B, S, S, 3) in one go and tokenizes once (measured:
        benchmarks/RESULTS.md#numbers-quoted-in-the-code).
        """
        # One caption: no draw needed (it would return 0); the per-sample path agrees.
        choice = [0 if len(self.captions[i]) == 1 else self._caption_rng(epoch, i)[1] for i in idx.tolist()]
        out = {"index": idx, "image": self._normalize(self._array[idx]), "caption": np.array(choice)}
        if self.tokenize is not None:
            caps = [self.captions[i][c] for i, c in zip(idx.tolist(), choice, strict=True)]
            out["tokens"] = np.asarray(self.tokenize(caps), np.int32)  # (B, L)
        return out
