"""Patch dropout (FLIP, Li et al. 2023): which image patches a training step keeps.

`model.patch_dropout: p` keeps a random (1 - p) of each training image's patches; evaluation and
inference keep them all. The model takes the kept indices as an input (CLIP.encode_image(images,
keep=...), in MLX and torch_ref alike), so the draw lives here, on the host, in numpy: the MLX
trainer (training/build.py) and torch_ref.train draw the same indices.

The draw is a pure function of (train.seed, step) over the rows of the global batch, as the
batches are of (seed, epoch, index): a resumed run draws what the uninterrupted one drew, and the
streams, micro-batches and data-parallel ranks that split a batch each take their own rows of the
one draw, so the result does not depend on how the batch was split.

Framework-free: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STREAM = 0xF11B  # keeps this draw apart from the data pipeline's (seed, ...) streams


def num_kept(n_patches: int, p: float) -> int:
    """How many of `n_patches` a step keeps at patch dropout `p`: open_clip's PatchDropout count,
    max(1, int(n_patches * (1 - p))), truncated, not rounded (196 patches at p = 0.3: 137)."""
    return max(1, int(n_patches * (1 - p)))


def draw_keep(p: float, n_patches: int, seed: int, step: int, batch: int) -> np.ndarray:
    """The kept patch indices of every row of a global batch of `batch` images at training step
    `step` (0-based): (batch, num_kept) int32, each row a uniform random subset, in ascending order.

    Ascending order changes nothing (the positions were added before the drop, and attention and
    pooling do not care about token order) but keeps the gather's reads in order."""
    rng = np.random.default_rng([_STREAM, seed, step])
    order = np.argsort(rng.random((batch, n_patches)), axis=1)  # a random permutation per row
    return np.sort(order[:, : num_kept(n_patches, p)], axis=1).astype(np.int32)


@dataclass(frozen=True)
class PatchDropout:
    """A run's patch dropout: `keep(step, batch, height, width)` gives this rank's rows of step
    `step`'s draw for a local batch of `batch` images of height x width pixels."""

    p: float
    patch_size: int
    seed: int
    rank: int = 0  # data parallel: this rank's rows of the global batch (data/pipeline.py
    world_size: int = 1  # gives rank r the r-th contiguous slice of each global batch)

    def keep(self, step: int, batch: int, height: int, width: int) -> np.ndarray:
        # From the pixels, not the config: the patch grid is the images' (as PatchEmbed's).
        n = (height // self.patch_size) * (width // self.patch_size)
        rows = draw_keep(self.p, n, self.seed, step, batch * self.world_size)
        return rows[self.rank * batch : (self.rank + 1) * batch]


def patch_dropout(mcfg, seed: int, rank: int = 0, world_size: int = 1) -> PatchDropout | None:
    """The run's PatchDropout for architecture `mcfg` (a ModelConfig), or None at p = 0."""
    if not mcfg.patch_dropout:
        return None
    return PatchDropout(mcfg.patch_dropout, mcfg.patch_size, seed, rank, world_size)
