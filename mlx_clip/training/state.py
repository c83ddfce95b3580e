"""RunState: where a run is, the one object that becomes a checkpoint's state.json and back."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def no_best() -> dict:
    return {"name": None, "value": -math.inf, "checkpoint": None}


@dataclass
class RunState:
    """Everything besides weights and optimizer state that resume needs, and what it reports.

    Batches are a pure function of (seed, epoch, index) (data/pipeline.py), so (epoch,
    batch_in_epoch) is the data position; `step` counts optimizer steps.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1
    config_hash: str = ""
    best: dict = field(default_factory=no_best)  # name, value and checkpoint of the best evaluation
    metrics: dict = field(default_factory=dict)  # the evaluation saved with this checkpoint, if any
    temperature: dict = field(default_factory=dict)  # Temperature.state_dict()

    def advance(self, batches_per_epoch: int) -> None:
        """One step done: move the data position on, into the next epoch at the end of one."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def resume_from(self, saved: RunState) -> None:
        """Continue from a checkpoint's position, best checkpoint and temperature; this run's own
        seed, ranks and config hash stand."""
        self.step, self.epoch, self.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
        self.best, self.temperature = saved.best, saved.temperature

    def observe(self, metric: str | None, metrics: dict, checkpoint: str) -> bool:
        """Record `metrics` of the checkpoint about to be saved; True when it is the new best. A
        non-finite value (NaN from non-finite embeddings) never is."""
        self.metrics = metrics
        value = metrics.get(metric) if metric is not None else None
        if value is None or not math.isfinite(value) or not value > self.best["value"]:
            return False
        self.best = {"name": metric, "value": metrics[metric], "checkpoint": checkpoint}
        return True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> RunState:
        """The saved state; keys a checkpoint does not have (older ones) keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})
