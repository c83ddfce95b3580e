"""`data.batch_size auto`: the largest training batch whose step fits a memory budget.

The peak memory of a training step is, to a very good approximation, a + c * batch: the weights,
gradients and optimizer state, plus activations that grow with the batch (the B x B logits are
negligible next to them for any batch that fits). So two measured steps at small batches give the
line, the line gives the batch for the budget, and one more step at that batch checks it.
Each probe is a real step (the run's own compiled step, precision, checkpointing and accumulation)
on a fresh model with random data, measured with MLX's allocator peak.
"""

from __future__ import annotations

import os
from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..config import Config
from ..models import streams
from .build import build_training

DEFAULT_FRACTION = 0.6  # of device memory, when train.memory_budget_gb is not set
PROBES = (8, 16)  # per-rank batches measured to fit the line
MAX_BATCH = 65536


def device_memory_bytes() -> int:
    """Memory the default device can use: the GPU's recommended working set where MLX reports it
    (Metal, CUDA), else the machine's RAM (the CPU backend)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(cfg: Config) -> int:
    if cfg.train.memory_budget_gb is not None:
        return int(cfg.train.memory_budget_gb * 2**30)
    return int(DEFAULT_FRACTION * device_memory_bytes())


def step_peak_bytes(cfg: Config, batch: int, n_streams: int | None = None) -> int:
    """Peak MLX memory of one training step with `batch` pairs on this process: the run's own step
    (build_training, `n_streams` streams; default train.streams resolved) on a fresh model."""
    mcfg = cfg.model_config()
    mx.clear_cache()
    mx.reset_peak_memory()
    run_cfg = replace(cfg, data=replace(cfg.data, batch_size=batch), train=replace(cfg.train, seed=0))
    n_streams = streams.resolve(cfg.train.streams) if n_streams is None else n_streams
    training = build_training(run_cfg, n_streams=n_streams, mcfg=mcfg)
    rng = np.random.default_rng(0)
    images = mx.array(rng.standard_normal((batch, mcfg.image_size, mcfg.image_size, 3), np.float32))
    tokens = rng.integers(1, mcfg.vocab_size - 1, (batch, mcfg.context_length)).astype(np.int32)
    tokens[:, -1] = mcfg.vocab_size - 1  # an end-of-text token (the largest id) in every row
    loss, grad_norm = training.run_step(images, mx.array(tokens), 0)  # with the EMA's, if any
    mx.eval(training.state, loss, grad_norm)
    peak = mx.get_peak_memory()
    del training, loss, grad_norm
    mx.clear_cache()
    return peak


def find_batch_size(
    cfg: Config, world_size: int = 1, max_batch: int | None = None, log=print, n_streams: int | None = None
) -> int:
    """The largest global batch (a multiple of 8 x ranks x accum_steps) whose step fits the budget.

    Each rank holds batch / world_size pairs, so the fit is per rank. `max_batch` caps the result
    (e.g. the number of training samples). Raises ValueError when not even the smallest batch fits.
    """
    budget = budget_bytes(cfg)
    quantum = 8 * cfg.optim.accum_steps  # per rank: micro-batches of at least 8
    b1, b2 = (p * cfg.optim.accum_steps for p in PROBES)
    p1, p2 = step_peak_bytes(cfg, b1, n_streams), step_peak_bytes(cfg, b2, n_streams)
    slope = max((p2 - p1) / (b2 - b1), 1.0)
    fixed = p1 - slope * b1
    limit = (max_batch or MAX_BATCH * world_size) // world_size
    per_rank = min(int((budget - fixed) / slope), limit, MAX_BATCH)
    per_rank = per_rank // quantum * quantum
    log(
        f"batch_size auto: step peak {p1 / 2**20:.0f} MiB at {b1}, {p2 / 2**20:.0f} MiB at {b2} per rank "
        f"-> {slope / 2**20:.2f} MiB per pair over {fixed / 2**20:.0f} MiB; budget {budget / 2**30:.2f} GiB"
    )
    while per_rank >= quantum:
        peak = step_peak_bytes(cfg, per_rank, n_streams)
        if peak <= budget:
            log(
                f"batch_size auto: {per_rank * world_size} ({per_rank} per rank), measured peak "
                f"{peak / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB"
            )
            return per_rank * world_size
        log(
            f"batch_size auto: {per_rank} per rank peaked at {peak / 2**30:.2f} GiB, over budget; trying less"
        )
        per_rank = int(per_rank * budget / peak * 0.95) // quantum * quantum
    raise ValueError(
        f"data.batch_size auto: not even {quantum} pairs per rank fit train.memory_budget_gb="
        f"{budget / 2**30:.2f} GiB (peak {p1 / 2**30:.2f} GiB at {b1}); raise the budget, use "
        "train.grad_checkpointing, train.precision bfloat16 or a smaller model"
    )
