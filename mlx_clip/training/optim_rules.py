"""The optimiser's rules, framework-free: which tensors decay or are locked, each one's base
learning rate, and the learning-rate curve. mlx_clip.training.optim builds MLX's AdamW from them
and torch_ref.train builds PyTorch's, so both train the same groups on the same schedule.
"""

from __future__ import annotations

import math

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
        (
            "visual.",
            cfg.lock_image,
            cfg.lock_image_unlocked_layers,
            mcfg.vision_layers,
            ("ln_post", "attn_pool", "proj"),
        ),
        (
            "text.",
            cfg.lock_text,
            cfg.lock_text_unlocked_layers,
            mcfg.text_layers,
            ("ln_final", "text_projection", "head"),
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


PYTHON_OPS = (min, math.cos, lambda cond, a, b: a if cond else b)


def learning_rate(step, cfg: OptimConfig, total_steps: int, base_lr: float | None = None, ops=PYTHON_OPS):
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at total_steps.

    With base_lr (a tower's own rate) the whole curve, floor included, scales by base_lr / lr.
    The one formula for every framework: `ops` = (minimum, cos, where) of plain Python (floats,
    the default) or of an array library (optim.mx_schedule runs it inside the compiled step).
    """
    minimum, cos, where = ops
    warmup = cfg.warmup_steps
    scale = 1.0 if base_lr is None else base_lr / cfg.lr
    warm = cfg.lr * (step + 1) / max(1, warmup)
    progress = minimum(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + cos(math.pi * progress))
    return scale * (where(step < warmup, warm, cosine) if warmup else cosine)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, base_lr: float | None = None) -> float:
    """The learning rate of step `step` (0-based), as a Python float."""
    return learning_rate(step, cfg, total_steps, base_lr)
