"""An exponential moving average (EMA) of the trainable weights: train.ema_decay, train.ema_warmup.

After each accepted optimizer step,  ema <- d * ema + (1 - d) * weights.  The decay d of step s
(0-based) warms up so that the averaging window 1 / (1 - d) grows linearly from 1 step (d = 0:
the EMA starts as the trained weights, not the initial ones) to 1 / (1 - ema_decay) at step
ema_warmup, and stays there. A step the trainer rejects (non-finite loss, gradient or weights)
leaves the EMA as it was.

The update is its own compiled function, queued after the training step and evaluated in the
same mx.eval (Training.state holds the EMA's arrays), so a step still costs one evaluation.
Checkpoints hold the EMA as ema.safetensors: a complete weights file (the EMA of the trainable
tensors, the others as trained), loadable wherever a model.safetensors is.
"""

from __future__ import annotations

import contextlib
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import TrainConfig


def ema_decay_at(step: int, decay: float, warmup: int) -> float:
    """The decay used after step `step` (0-based): the full `decay` from step `warmup` on; before
    it, the window 1 / (1 - d) is 1 + (1 / (1 - decay) - 1) * step / warmup."""
    if step >= warmup:
        return decay
    window = 1.0 + (1.0 / (1.0 - decay) - 1.0) * step / warmup
    return 1.0 - 1.0 / window


class ModelEMA:
    """The EMA of a model's trainable parameters. `state` (a dict path -> array, mutated in place
    so a compiled function keeps tracking it) goes into Training.state."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.decay, self.warmup = cfg.ema_decay, cfg.ema_warmup
        self.state: dict[str, mx.array] = {}
        self.reset(model)
        self._update = None  # compiled on first use, once the state's keys are final

    def reset(self, model: nn.Module) -> None:
        """Start the average at the model's current trainable weights."""
        self.state.clear()
        self.state.update(tree_flatten(model.trainable_parameters()))

    def update(self, model: nn.Module, step: int, loss: mx.array, grad_norm: mx.array) -> None:
        """Queue the update after training step `step` (0-based); lazy: evaluate Training.state.
        A non-finite loss or grad_norm marks a rejected step (build.make_update)."""
        if self._update is None:
            inputs = [model.state, self.state]

            @partial(mx.compile, inputs=inputs, outputs=[self.state])
            def ema_update(decay, ok):
                weights = dict(tree_flatten(model.trainable_parameters()))
                for key, average in self.state.items():
                    new = decay * average + (1 - decay) * weights[key]
                    self.state[key] = mx.where(ok, new, average)

            self._update = ema_update
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm)
        self._update(mx.array(ema_decay_at(step, self.decay, self.warmup), mx.float32), ok)

    def tree(self) -> dict:
        """The EMA weights nested as the model's parameters."""
        return tree_unflatten(list(self.state.items()))

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Inside the block the model holds the EMA weights; after it, its own arrays again."""
        raw = model.trainable_parameters()
        model.update(self.tree())
        try:
            yield model
        finally:
            model.update(raw)

    def load(self, weights: dict[str, mx.array], where: str) -> None:
        """Take the EMA from a checkpoint's ema.safetensors (every trainable tensor, same shapes)."""
        missing = [k for k in self.state if k not in weights]
        wrong = [k for k in self.state if k in weights and weights[k].shape != self.state[k].shape]
        if missing or wrong:
            raise ValueError(
                f"{where}: not this model's EMA (missing {missing[:3]}, other shapes {wrong[:3]}); "
                "resume with the config the checkpoint was trained with"
            )
        for key in self.state:
            self.state[key] = weights[key]
