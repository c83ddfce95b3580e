"""AdamW with CLIP's parameter groups and a warmup + cosine schedule.

`lr_at` and `decays` are plain Python so torch_ref.train uses the very same
schedule and grouping.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from ..config import OptimConfig
from ..models.config import ModelConfig

# 2-D tensors that are embeddings-as-positions, not projections: no weight decay.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def decays(path: str, ndim: int) -> bool:
    """Weight decay applies to matrices only: not gains, biases, positions or logit_scale."""
    return ndim >= 2 and not path.endswith(NO_DECAY_NAMES)


def tower_lr(path: str, cfg: OptimConfig) -> float:
    """Base learning rate of a parameter: optim.image_lr / text_lr for the towers, else optim.lr."""
    if path.startswith("visual.") and cfg.image_lr is not None:
        return cfg.image_lr
    if path.startswith("text.") and cfg.text_lr is not None:
        return cfg.text_lr
    return cfg.lr


def is_locked(path: str, cfg: OptimConfig, mcfg: ModelConfig) -> bool:
    """Locked (frozen) parameters of LiT-style fine-tuning: a tower but its last N blocks + head."""
    for prefix, locked, unlocked, layers, head in (
        ("visual.", cfg.lock_image, cfg.lock_image_unlocked_layers, mcfg.vision_layers, ("ln_post", "proj")),
        (
            "text.",
            cfg.lock_text,
            cfg.lock_text_unlocked_layers,
            mcfg.text_layers,
            ("ln_final", "text_projection"),
        ),
    ):
        if not (locked and path.startswith(prefix)):
            continue
        parts = path[len(prefix) :].split(".")
        if unlocked and parts[0] in head:
            return False
        if unlocked and parts[:2] == ["transformer", "resblocks"] and int(parts[2]) >= layers - unlocked:
            return False
        return True
    return False


def lr_at(step: int, cfg: OptimConfig, total_steps: int, base_lr: float | None = None) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at total_steps.

    With base_lr (a tower's own rate) the whole curve, floor included, scales by base_lr / lr.
    """
    scale = 1.0 if base_lr is None else base_lr / cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return scale * cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return scale * (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress)))


def mx_schedule(cfg: OptimConfig, total_steps: int, base_lr: float | None = None):
    """lr_at as an MLX function of the optimizer's step counter (usable inside mx.compile)."""
    warmup = cfg.warmup_steps
    decay_steps = max(1, total_steps - warmup)
    scale = 1.0 if base_lr is None else base_lr / cfg.lr

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = cfg.lr * (step + 1) / max(1, warmup)
        progress = mx.minimum(1.0, (step - warmup) / decay_steps)
        cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + mx.cos(math.pi * progress))
        return scale * (mx.where(step < warmup, warm, cosine) if warmup else cosine)

    return schedule


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optim.Optimizer:
    """AdamW groups sharing one schedule: (per-tower learning rate) x (with / without weight decay)."""

    def adamw(base_lr: float, weight_decay: float) -> optim.AdamW:
        return optim.AdamW(
            learning_rate=mx_schedule(cfg, total_steps, base_lr),
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=weight_decay,
            bias_correction=True,  # as torch.optim.AdamW
        )

    rates = sorted({cfg.lr, cfg.image_lr or cfg.lr, cfg.text_lr or cfg.lr})
    groups = [(lr, wd) for lr in rates for wd in (cfg.weight_decay, 0.0)]
    filters = [
        (lambda path, w, lr=lr, wd=wd: tower_lr(path, cfg) == lr and (wd > 0) == decays(path, w.ndim))
        for lr, wd in groups[:-1]
    ]
    return optim.MultiOptimizer([adamw(lr, wd) for lr, wd in groups], filters)


def lock_parameters(model, cfg: OptimConfig) -> list[str]:
    """Freeze the locked parameters in place (they get no gradient); returns their paths."""
    locked = []
    for path, module in model.named_modules():
        for key, value in module.items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, mx.array) and is_locked(full, cfg, model.config):
                module.freeze(recurse=False, keys=[key])
                locked.append(full)
    return locked
