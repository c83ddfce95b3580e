"""RunState: where a run is, the one object that becomes a checkpoint's state.json and back."""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import asdict, dataclass, field, fields


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def new_run_id() -> str:
    return uuid.uuid4().hex


def no_best() -> dict:
    return {"name": None, "value": -math.inf, "checkpoint": None}


@dataclass
class RunState:
    """Everything besides weights and optimizer state that resume needs, and what it reports.

    Batches are a pure function of (seed, epoch, index) (data/pipeline.py), so (epoch,
    batch_in_epoch) is the data position; `samples_in_epoch` (= batch_in_epoch * batch_size, the
    global batch) is the same position in samples, which survives a change of batch size
    (`seek`). `step` counts optimizer steps. `run_id` names the run: it is kept across --resume,
    and pruning only ever touches that run's checkpoints. `data` holds the data fingerprints
    (data/run_data.py) that --resume compares.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_in_epoch: int = 0
    batch_size: int = 0  # the global batch the position was counted in; 0 in older checkpoints
    seed: int = 0
    world_size: int = 1
    config_hash: str = ""
    run_id: str = ""  # "" in older checkpoints
    data: dict = field(default_factory=dict)  # source name -> fingerprint
    best: dict = field(default_factory=no_best)  # name, value and checkpoint of the best evaluation
    metrics: dict = field(default_factory=dict)  # the evaluation saved with this checkpoint, if any
    temperature: dict = field(default_factory=dict)  # Temperature.state_dict()

    def advance(self, batches_per_epoch: int) -> None:
        """One step done: move the data position on, into the next epoch at the end of one."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.samples_in_epoch = self.batch_in_epoch * self.batch_size

    def resume_from(self, saved: RunState) -> None:
        """Continue the saved run: its id, step, data position (in samples), best checkpoint and
        temperature; this run's own seed, ranks, batch size, config hash and data fingerprints
        stand. Call `seek` next to turn the position into a batch."""
        self.step, self.epoch, self.samples_in_epoch = saved.step, saved.epoch, saved.samples_in_epoch
        self.run_id = saved.run_id
        self.best, self.temperature = saved.best, saved.temperature

    def seek(self, batches_per_epoch: int) -> None:
        """batch_in_epoch from samples_in_epoch at this run's batch size: the batch holding that
        sample, or, past the epoch's last full batch, the start of the next epoch. The result is
        always a valid start in [0, batches_per_epoch), whatever the batch size or data size was
        before, so the step loop can neither fail on the position nor wait on an empty epoch."""
        if self.batch_size < 1 or batches_per_epoch < 1:
            got = f"batch_size={self.batch_size}, batches_per_epoch={batches_per_epoch}"
            raise ValueError(f"RunState.seek: both must be >= 1, got {got}")
        start = self.samples_in_epoch // self.batch_size
        if start >= batches_per_epoch:
            self.epoch, start = self.epoch + 1, 0
        self.batch_in_epoch, self.samples_in_epoch = start, start * self.batch_size

    def observe(self, metric: str | None, metrics: dict, checkpoint: str, lower: bool = False) -> bool:
        """Record `metrics` of the checkpoint about to be saved; True when it is the new best:
        `metric` higher than the best so far (`lower`: lower, for a loss or a rank). A non-finite
        value (NaN from non-finite embeddings) never is. A best of another metric (eval.best changed
        on --resume) does not count: the first value of the new metric replaces it."""
        self.metrics = metrics
        value = metrics.get(metric) if metric is not None else None
        if value is None or not math.isfinite(value):
            return False
        best = self.best["value"] if self.best["name"] == metric else None
        if best is not None and not (value < best if lower else value > best):
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
