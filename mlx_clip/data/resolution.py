"""data.resolution_schedule: the image size each training step uses (progressive resizing).

FLIP and CLIPA train most steps at a lower resolution, where a step costs a fraction of a native
one (fewer patches), and the last ones at the model's native size. The schedule is a list of
[fraction, size] pairs: each size starts at that fraction of train.steps, the first at 0.0. The
phase starting at fraction f starts at step floor(f * train.steps) (0-based), so
[[0.0, 112], [0.5, 224]] over 450 steps trains steps 1-225 at 112 px and 226-450 at 224 px.

Only training batches change size: the model resamples its position embedding to their patch grid
(models/transformer.py), its checkpoints keep the native grid, and evaluation runs at the native
size. Framework-free: the config validates a schedule here, and the trainer asks it for a step's
size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KEY = "data.resolution_schedule"


@dataclass(frozen=True)
class ResolutionSchedule:
    """(first step, image size) per phase, in step order; one phase at the native size without one."""

    phases: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, schedule: list | None, steps: int, native: int) -> ResolutionSchedule:
        """The config's schedule (validated: schedule_problem) over `steps` training steps."""
        if schedule is None:
            return cls(((0, native),))
        return cls(tuple((math.floor(fraction * steps), int(size)) for fraction, size in schedule))

    @property
    def sizes(self) -> list[int]:
        return sorted({size for _, size in self.phases})

    def size_at(self, step: int) -> int:
        """The image size of 0-based training step `step`."""
        return next(size for start, size in reversed(self.phases) if start <= step)


def schedule_problem(schedule: list | None, steps: int, patch_size: int) -> str | None:
    """What is wrong with a data.resolution_schedule value (None: nothing), naming the entry."""
    if schedule is None:
        return None
    pairs = "a non-empty list of [fraction, size] pairs, e.g. [[0.0, 112], [0.5, 224]]"
    if not schedule:
        return f"{KEY} must be null or {pairs}, got []"
    starts = []
    for i, entry in enumerate(schedule):
        where = f"{KEY}[{i}]"
        if len(entry) != 2:
            return f"{where} must be a [fraction, size] pair, got {entry}"
        fraction, size = entry
        if not 0 <= fraction < 1:
            return f"{where}: the fraction of train.steps where it starts must be in [0, 1), got {fraction}"
        if isinstance(size, float) or size < patch_size or size % patch_size:
            return (
                f"{where}: the image size must be a whole multiple of the patch size {patch_size} "
                f"(model.patch_size), got {size}"
            )
        start = math.floor(fraction * steps)
        if i == 0 and fraction != 0:
            return f"{where}: the first phase must start at fraction 0.0, got {fraction}"
        if i and fraction <= schedule[i - 1][0]:
            return f"{where}: the fractions must increase, got {fraction} after {schedule[i - 1][0]}"
        if i and start == starts[-1]:
            return (
                f"{where} starts at step {start}, as {KEY}[{i - 1}] does (train.steps={steps}): "
                "that phase would have no steps; space the fractions further apart"
            )
        starts.append(start)
    return None
