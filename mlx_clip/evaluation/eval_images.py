"""An evaluation set's images as batches of model input, through training's eval pipeline.

    loader = eval_loader(ds, image_size=224)                 # a data.pipeline.Loader (train=False)
    for images, positions, keep in eval_batches(loader): ...  # (B, S, S, 3), (B,), (B,) bool
    feats, kept = image_features(ds, encode_image, 224)       # (N', E) and the N' positions in ds

The loader is the one run_data builds for a run's held-out set: the model's eval preprocessing
(CLIP's by default: resize the shorter side, centre crop, OpenAI mean/std) through data/decode.py's
bounded decoding, on mlx-data worker threads in dataset order, so a 10k-image set is one pass of
parallel decoding. An image that passed the scan but fails to decode (cut short after its header)
is replaced in its batch by the loader (on_error="skip") and reported to the set's SkipLog as in
training; here the replacement's row is marked keep=False and left out, so every kept feature is
its own image's and `kept` says which labels or captions go with the features. Framework-free:
`encode_image` maps numpy images to numpy features (MLX or torch_ref alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..data.checks import SkipLog
from ..data.pipeline import Loader
from ..data.transforms import CLIP_PREPROCESS, ImagePreprocess
from .datasets import DataChecks, LabelledImages
from .retrieval_sets import CaptionedImages


def eval_loader(
    dataset: LabelledImages | CaptionedImages,
    image_size: int,
    *,
    batch_size: int = 256,
    num_workers: int = 4,
    prefetch: int = 4,
    data_checks: DataChecks | None = None,
    preprocess: ImagePreprocess = CLIP_PREPROCESS,
) -> Loader:
    """The held-out Loader of `dataset`'s images: the eval transform of `preprocess` (the model's:
    ImagePreprocess.of(model.config)), dataset order, every image once; decode failures go to
    data_checks.log (a SkipLog that counts them and warns, when None)."""
    c = data_checks or DataChecks()
    return Loader(
        dataset.samples(),
        batch_size,
        image_size,
        train=False,
        num_workers=num_workers,
        prefetch=prefetch,
        on_error="skip",
        on_skip=c.log if c.log is not None else SkipLog(),
        max_image_pixels=c.max_image_pixels,
        max_aspect_ratio=c.max_aspect_ratio,
        preprocess=preprocess,
    )


def eval_batches(loader: Loader) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images float32 (B, S, S, 3), positions int64 (B,), keep bool (B,)) per batch of epoch 0.

    keep is False where the loader put a substitute for an image it could not decode: that row
    shows another image of the set, already counted at its own position. Batches keep their size
    (a compiled encoder sees one shape); drop the rows after encoding."""
    for want, batch in zip(loader.rank_batches(0), loader.epoch(0), strict=True):
        yield batch["images"], want, batch["index"] == want


def image_features(
    dataset: LabelledImages | CaptionedImages,
    encode_image: Callable[[np.ndarray], np.ndarray],
    image_size: int,
    **loader_kw,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N', E) of the images that decoded, their positions in `dataset` (N',)), N' <= N.

    `loader_kw` go to eval_loader (batch_size, num_workers, prefetch, data_checks, preprocess)."""
    feats, kept = [], []
    for images, positions, keep in eval_batches(eval_loader(dataset, image_size, **loader_kw)):
        out = np.asarray(encode_image(images))
        feats.append(out[keep])
        kept.append(positions[keep])
    return np.concatenate(feats), np.concatenate(kept)


__all__ = ["eval_batches", "eval_loader", "image_features"]
