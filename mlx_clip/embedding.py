"""A teacher's embeddings of a training source, for distillation (`loss.distill`; CLI: mlx_clip/embed.py).

The source is read as training reads `data.train` (the same readers and keys; `builtin` is the
built-in dataset the run's config generates), every sample's image and every one of its captions
is encoded by the teacher (any checkpoint `mlx_clip.load` takes), and the L2-normalised rows are
written by data/embedding_store.py, keyed by sample id (data/samples.sample_id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .data.embedding_store import write_store
from .data.pipeline import ArraySource, Loader
from .data.readers import read_samples, source_root
from .data.run_data import builtin_sources
from .data.samples import sample_id
from .inference import encode_texts, load, logit_scale
from .models.locate import checkpoint_weights, file_sha256, resolve_checkpoint
from .models.streams import Encoders
from .schema import ConfigError


@dataclass
class TrainingSource:
    """What a run's config trains on: its samples, their ids, and how to describe them."""

    spec: str  # data.train
    description: str
    samples: list | ArraySource
    ids: list[str]
    digest: str | None  # the built-in data: the train loader's digest of its samples


def training_source(cfg: Config) -> TrainingSource:
    """The whole `data.train` source (before any val split; bad entries left out, as training's
    checks leave them out)."""
    d = cfg.data
    if d.is_mixture:
        raise ConfigError(
            "mlx_clip.embed reads one source: pass --data SRC, not a mixture (data.train as a list)"
        )
    if d.train == "builtin":
        description, array, _, _ = builtin_sources(d, cfg.model_config(), with_train=True)
        digest = Loader(array, 2, array.images.shape[1], train=False, num_workers=0).digest()
        return TrainingSource(d.train, description, array, [str(i) for i in range(len(array))], digest)
    samples = read_samples(d.train, d.image_key, d.caption_key, d.format, on_error="skip", skipped=[])
    root = source_root(d.train, d.format)
    return TrainingSource(d.train, d.train, samples, [sample_id(s.image, root) for s in samples], None)


def encode_source(model, tokenizer, preprocess, source, batch_size: int = 128, num_workers: int = 2):
    """(kept sample positions, (n, D) image rows, (m, D) rows of every caption of those samples).
    An image that cannot be decoded is left out (the loader substitutes another sample for it,
    which is recognised by its index)."""
    files = not isinstance(source, ArraySource)
    loader = Loader(
        source,
        batch_size,
        preprocess.image_size,
        train=False,
        num_workers=num_workers,
        preprocess=preprocess.settings,
        on_error="skip" if files else "raise",
    )
    expected = loader.rank_batches(0)
    kept, images = [], []
    for k, batch in enumerate(loader.epoch(0)):
        ok = batch["index"] == expected[k]  # (B,) False where a substitute took a bad image's place
        if ok.any():
            kept.append(expected[k][ok])
            images.append(Encoders.of(model).image(batch["images"][ok]))  # (b, D)
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    dim = model.config.embed_dim
    image = np.concatenate(images) if images else np.zeros((0, dim), np.float32)
    texts = [c for i in kept.tolist() for c in loader.captions[i]]
    return kept, image, encode_texts(model, tokenizer, texts, batch_size)


def embed(
    checkpoint: str | Path,
    cfg: Config,
    out: str | Path,
    *,
    ema: bool = False,
    verify: bool = True,
    dtype: str = "float16",
    batch_size: int = 128,
    shard_samples: int = 4096,
    log=print,
) -> dict:
    """Embed cfg's training source with the teacher at `checkpoint` into `out`; returns index.json."""
    model, tokenizer, preprocess = load(checkpoint, verify=verify, ema=ema)
    ckpt = resolve_checkpoint(checkpoint)
    src = training_source(cfg)
    log(f"embedding {len(src.ids)} samples of {src.description} with {ckpt}")
    kept, image, text = encode_source(
        model, tokenizer, preprocess, src.samples, batch_size, cfg.data.num_workers
    )
    captions = (
        src.samples.captions if isinstance(src.samples, ArraySource) else [s.captions for s in src.samples]
    )
    if len(kept) < len(src.ids):
        log(f"left out {len(src.ids) - len(kept)} samples whose image cannot be decoded")
    meta = {
        "teacher": str(ckpt),
        "teacher_sha256": file_sha256(checkpoint_weights(ckpt, ema)),
        "teacher_ema": ema,
        "logit_scale": logit_scale(model),
        "source": src.spec,
        "source_description": src.description,
        "source_digest": src.digest,
    }
    ids = [src.ids[i] for i in kept.tolist()]
    counts = [len(captions[i]) for i in kept.tolist()]
    path = write_store(out, ids, image, text, counts, meta, dtype, shard_samples)
    log(f"wrote {len(ids)} image and {len(text)} caption embeddings (dim {image.shape[1]}) to {path.parent}")
    return {**meta, "samples": len(ids), "captions": len(text)}
