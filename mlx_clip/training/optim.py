"""AdamW with CLIP's parameter groups and a warmup + cosine schedule, in MLX.

The rules themselves (which tensors decay or are locked, each one's base rate, the learning-rate
curve) are framework-free, in optim_rules.py, so torch_ref.train applies the very same ones.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from ..config import OptimConfig
from .optim_rules import decays, is_locked, learning_rate, tower_lr


class PlacedAdamW(optim.AdamW):
    """AdamW whose per-tensor update runs through `place(update, gradient, parameter, state)`.

    The training step passes streams.Lanes.run to spread the updates over its CPU streams; the
    default calls the update as it is. Same values either way: only where the work runs changes.
    """

    def __init__(self, *args, place=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.place = place or (lambda update, *arrays: update(*arrays))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        return self.place(super().apply_single, gradient, parameter, state)


def build_optimizer(cfg: OptimConfig, total_steps: int, place=None) -> optim.Optimizer:
    """AdamW groups sharing one schedule: (per-tower learning rate) x (with / without weight decay).
    `place` decides where each tensor's update runs (PlacedAdamW)."""

    def adamw(base_lr: float, weight_decay: float) -> optim.AdamW:
        return PlacedAdamW(
            learning_rate=mx_schedule(cfg, total_steps, base_lr),
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=weight_decay,
            bias_correction=True,  # as torch.optim.AdamW
            place=place,
        )

    rates = sorted({cfg.lr, cfg.image_lr or cfg.lr, cfg.text_lr or cfg.lr})
    groups = [(lr, wd) for lr in rates for wd in (cfg.weight_decay, 0.0)]
    filters = [
        (lambda path, w, lr=lr, wd=wd: tower_lr(path, cfg) == lr and (wd > 0) == decays(path, w.ndim))
        for lr, wd in groups[:-1]
    ]
    return optim.MultiOptimizer([adamw(lr, wd) for lr, wd in groups], filters)


def mx_schedule(cfg: OptimConfig, total_steps: int, base_lr: float | None = None):
    """The learning-rate curve as an MLX function of the optimizer's step counter (usable inside
    mx.compile)."""
    return lambda step: learning_rate(step.astype(mx.float32), cfg, total_steps, base_lr, ops=MLX_OPS)


MLX_OPS = (mx.minimum, mx.cos, mx.where)


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
