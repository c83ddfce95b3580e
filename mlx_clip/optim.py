"""AdamW with CLIP's parameter groups and a warmup + cosine schedule.

`lr_at` and `decays` are plain Python so torch_ref.train uses the very same
schedule and grouping.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from .config import OptimConfig

# 2-D tensors that are embeddings-as-positions, not projections: no weight decay.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def decays(path: str, ndim: int) -> bool:
    """Weight decay applies to matrices only: not gains, biases, positions or logit_scale."""
    return ndim >= 2 and not path.endswith(NO_DECAY_NAMES)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def mx_schedule(cfg: OptimConfig, total_steps: int):
    """lr_at as an MLX function of the optimizer's step counter (usable inside mx.compile)."""
    warmup = cfg.warmup_steps
    decay_steps = max(1, total_steps - warmup)

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = cfg.lr * (step + 1) / max(1, warmup)
        progress = mx.minimum(1.0, (step - warmup) / decay_steps)
        cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, cosine) if warmup else cosine

    return schedule


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optim.Optimizer:
    """Two AdamW groups sharing one schedule: with and without weight decay."""

    def adamw(weight_decay: float) -> optim.AdamW:
        return optim.AdamW(
            learning_rate=mx_schedule(cfg, total_steps),
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=weight_decay,
            bias_correction=True,  # as torch.optim.AdamW
        )

    return optim.MultiOptimizer(
        [adamw(cfg.weight_decay), adamw(0.0)],
        [lambda path, w: decays(path, w.ndim)],
    )
