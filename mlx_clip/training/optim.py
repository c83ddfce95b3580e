"""AdamW (or Lion) with CLIP's parameter groups and a warmup + schedule, in MLX.

The rules themselves (which tensors decay or are locked, each one's base rate, the learning-rate
curve) are framework-free, in optim_rules.py, so torch_ref.train applies the very same ones.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from ..config import OptimConfig
from ..models.config import ModelConfig
from .optim_rules import base_rates, decays, is_locked, learning_rate, param_lr


class Placed:
    """Mixin: the optimizer's per-tensor update runs through `place(update, gradient, parameter,
    state)`. The training step passes streams.Lanes.run to spread the updates over its CPU
    streams; the default calls the update as it is. Same values either way: only where the work
    runs changes."""

    def __init__(self, *args, place=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.place = place or (lambda update, *arrays: update(*arrays))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        return self.place(super().apply_single, gradient, parameter, state)


class PlacedAdamW(Placed, optim.AdamW):
    pass


class PlacedLion(Placed, optim.Lion):
    pass


def build_optimizer(
    cfg: OptimConfig, total_steps: int, place=None, mcfg: ModelConfig | None = None
) -> optim.Optimizer:
    """optim.optimizer groups sharing one schedule: (per-tower and per-layer learning rate) x
    (with / without weight decay). `place` decides where each tensor's update runs (Placed);
    `mcfg` (the architecture) is needed only for layer-wise decay."""

    def make(base_lr: float, weight_decay: float) -> optim.Optimizer:
        schedule = mx_schedule(cfg, total_steps, base_lr)
        if cfg.optimizer == "lion":
            return PlacedLion(schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=weight_decay, place=place)
        return PlacedAdamW(
            learning_rate=schedule,
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=weight_decay,
            bias_correction=True,  # as torch.optim.AdamW
            place=place,
        )

    # A group is (rate, decayed or not), matched by that flag rather than by weight_decay > 0,
    # which with optim.weight_decay 0 would send every matrix to the last group's rate.
    groups = [(lr, decayed) for lr in base_rates(cfg, mcfg) for decayed in (True, False)]
    filters = [
        (lambda path, w, lr=lr, d=decayed: param_lr(path, cfg, mcfg) == lr and decays(path, w.ndim) == d)
        for lr, decayed in groups[:-1]
    ]
    optimizers = [make(lr, cfg.weight_decay if decayed else 0.0) for lr, decayed in groups]
    return optim.MultiOptimizer(optimizers, filters)


def mx_schedule(cfg: OptimConfig, total_steps: int, base_lr: float | None = None):
    """The learning-rate curve as an MLX function of the optimizer's step counter (usable inside
    mx.compile)."""

    def schedule(step):
        lr = learning_rate(step.astype(mx.float32), cfg, total_steps, base_lr, ops=MLX_OPS)
        return lr if isinstance(lr, mx.array) else mx.array(lr, mx.float32)  # const without warmup

    return schedule


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
