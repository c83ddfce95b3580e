"""The softmax temperature: learnable (CLIP) or scheduled from the config.

tau is the temperature, logits = cosine / tau, and the model's `logit_scale` parameter is
log(1 / tau). A learnable temperature is trained like any weight (clamped at tau >= 0.01). A
scheduled one freezes that parameter and the trainer writes log(1 / tau_t) into it before step t,
so checkpoints, inference and export see the temperature in use.

Framework-free: mlx_clip.training and torch_ref.train share it.
"""

from __future__ import annotations

import math

from ..config import TemperatureConfig


class Temperature:
    def __init__(self, cfg: TemperatureConfig, total_steps: int):
        self.cfg = cfg
        self.total = max(1, total_steps)
        # adaptive: the current tau and the plateau bookkeeping (saved in checkpoints)
        self.tau = cfg.start
        self.best_loss = math.inf
        self.bad_evals = 0

    @property
    def learnable(self) -> bool:
        return self.cfg.schedule == "learnable"

    def at(self, step: int) -> float:
        """tau used by optimizer step `step` (0-based); a learnable temperature has no schedule."""
        c = self.cfg
        t = min(max(step, 0), self.total) / self.total  # progress through the run, 0..1
        if c.schedule in ("constant", "learnable"):
            return c.start
        if c.schedule == "warmup":  # linear from start to end over warmup_steps, then end
            w = min(step, c.warmup_steps) / c.warmup_steps if c.warmup_steps else 1.0
            return c.start + (c.end - c.start) * w
        if c.schedule == "cosine":
            return c.end + (c.start - c.end) * 0.5 * (1 + math.cos(math.pi * t))
        if c.schedule == "exponential":  # geometric: start * (end/start)^t
            return c.start * (c.end / c.start) ** t
        if c.schedule == "adaptive":
            return self.tau
        raise ValueError(f"unknown temperature schedule {c.schedule!r}")

    def logit_scale_param(self, step: int) -> float:
        """The value of the model's logit_scale parameter, log(1 / tau), for `step`."""
        return math.log(1.0 / self.at(step))

    def observe(self, val_loss: float) -> bool:
        """adaptive: feed an evaluation's val loss; lowers tau after `patience` evaluations without a
        relative improvement of at least `threshold`. Returns True when tau changed."""
        if self.cfg.schedule != "adaptive" or not math.isfinite(val_loss):
            return False
        if self.best_loss == math.inf or val_loss < self.best_loss * (1 - self.cfg.threshold):
            self.best_loss, self.bad_evals = val_loss, 0
            return False
        self.bad_evals += 1
        if self.bad_evals < self.cfg.patience:
            return False
        self.bad_evals = 0
        new = max(self.cfg.end, self.tau * self.cfg.factor)
        changed, self.tau = new != self.tau, new
        return changed

    def state_dict(self) -> dict:
        return {"tau": self.tau, "best_loss": self.best_loss, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.tau = float(state.get("tau", self.cfg.start))
        self.best_loss = float(state.get("best_loss", math.inf))
        self.bad_evals = int(state.get("bad_evals", 0))
