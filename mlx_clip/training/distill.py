"""Distillation from a teacher's stored embeddings (loss.distill): set-up and per-batch rows.

At set-up the store (`python -m mlx_clip.embed`; data/embedding_store.py) is read and aligned to
the train loader's samples by sample id; per batch, the teacher's image rows and the rows of the
captions the batch drew enter the compiled step (build.make_distill_grad_fn). The teacher never
runs during training. One process only: a data-parallel run is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..config import Config
from ..data.embedding_store import Aligned, StoreError, align, read_store
from ..data.pipeline import Loader
from ..data.readers import source_root
from ..data.samples import sample_id
from ..schema import ConfigError


@dataclass
class Teacher:
    rows: Aligned
    scale: float  # the teacher's logits are cosine x scale (1 / loss.distill.temperature)
    source: str  # where the rows came from, for the log

    def batch_rows(self, batch: dict) -> tuple[mx.array, mx.array]:
        """(B, D) teacher image rows and (B, D) rows of the captions the batch drew."""
        image, text = self.rows.rows(batch["index"], batch["caption_index"])
        return mx.array(image), mx.array(text)


def train_sample_ids(cfg: Config, loader: Loader) -> list[str]:
    """The train loader's samples' ids, in its order (data/samples.sample_id)."""
    if loader.image_refs is None:  # the built-in data: its index
        return [str(i) for i in range(loader.num_samples)]
    root = source_root(cfg.data.train, cfg.data.format)
    return [sample_id(ref, root) for ref in loader.image_refs]


def load_teacher(cfg: Config, loader: Loader, world_size: int = 1) -> Teacher | None:
    """The teacher rows of every training sample (None when loss.distill is off)."""
    d = cfg.loss.distill
    if not d.enabled:
        return None
    if world_size > 1:
        raise ConfigError(
            f"loss.distill runs on one process only; this run has {world_size} ranks: "
            "train without mlx.launch or without loss.distill"
        )
    if cfg.data.is_mixture:
        raise ConfigError(
            "loss.distill with a mixture (data.train as a list) is not supported yet: sample ids are "
            "relative to one source; distill on one source (python -m mlx_clip.embed --data SRC)"
        )
    store = read_store(d.embeddings)
    digest = store.index.get("source_digest")
    if cfg.data.train == "builtin" and digest != loader.digest():
        raise StoreError(
            f"loss.distill.embeddings={d.embeddings}: embedded from "
            f"{store.index.get('source_description')!r}, "
            "not this run's built-in data (another size, split, image size or paraphrases); embed it "
            "with this run's --config and overrides"
        )
    captions = [len(c) for c in loader.captions]
    rows = align(store, train_sample_ids(cfg, loader), captions)
    scale = 1 / d.temperature if d.temperature else float(store.index["logit_scale"])
    return Teacher(rows, scale, f"{store.index['teacher']} ({store.index['embed_dim']}-dim)")
