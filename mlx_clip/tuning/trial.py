"""One trial: a normal `python -m mlx_clip.train` run in its own process, watched from outside.

The parent reads the run's OUT/metrics.jsonl as it grows and hands each evaluation of the
objective to `report(value, step)`; when that answers "prune", or the time budget is spent, or
the sweep is stopped, the run gets SIGINT, which a run treats as Ctrl-C: it finishes the step in
flight, saves a checkpoint and exits (training/loop.py). A crash, a NaN stop or a killed process
stays inside the trial: it becomes a failed Outcome with the exit status and the log's last line.
Framework-free: the training process alone imports MLX.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..run_history import History

POLL_S = 0.2
GRACE_S = 120.0  # after SIGINT: time to save a checkpoint before the run is killed


@dataclass
class Outcome:
    state: str  # complete | pruned | fail
    value: float | None = None
    reason: str = ""  # fail: why; pruned or stopped by the time budget: at which step


def train_command(config: str | None, out: Path, overrides: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "mlx_clip.train", "--out", str(out)]
    if config:
        cmd += ["--config", config]
    for key, text in overrides.items():
        cmd += [f"--{key}", text]
    return cmd


def run_trial(
    command: list[str],
    out: Path,
    metric: str,
    report: Callable[[float, int], bool],
    seconds: float | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Run `command` (its run directory is `out`) to the end; OUT/train.log gets its output."""
    out.mkdir(parents=True, exist_ok=True)
    tail = MetricsTail(out / "metrics.jsonl", metric)
    with open(out / "train.log", "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        started, signalled, why, last = time.monotonic(), None, None, None
        while True:
            try:
                proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            done = proc.returncode is not None
            for step, value in tail.read():  # each evaluation reaches the pruner, in order,
                if why == "pruned":  # up to the one it pruned at
                    break
                last = (step, value)
                if report(value, step) and not done and why is None:
                    why = "pruned"
            if done:
                break
            if why is None and seconds and time.monotonic() - started > seconds:
                why = "time"
            if why is None and stop is not None and stop.is_set():
                why = "interrupted"
            if why is not None and signalled is None:
                proc.send_signal(signal.SIGINT)  # the run saves a checkpoint and exits
                signalled = time.monotonic()
            if signalled is not None and time.monotonic() - signalled > GRACE_S:
                proc.kill()
    return outcome(proc.returncode, why, last, out, metric, seconds)


def outcome(rc: int, why: str | None, last, out: Path, metric: str, seconds: float | None) -> Outcome:
    # Stopped by the sweep: the decision stands whatever the exit (a run that has left its step
    # loop, e.g. writing curves.png, takes SIGINT as a KeyboardInterrupt).
    if why == "interrupted":
        return Outcome("fail", reason="interrupted: the sweep was stopped")
    if why == "pruned":
        return Outcome("pruned", last[1], f"pruned at step {last[0]}")
    if rc != 0 and not (why == "time" and last is not None):
        return Outcome("fail", reason=f"{exit_text(rc)}: {last_line(out / 'train.log')}")
    if why == "time":
        if last is None:
            return Outcome(
                "fail",
                reason=f"the time budget ({seconds:g}s) ran out before the first evaluation of "
                f"{metric}; set eval.every lower or raise --trial-seconds",
            )
        return Outcome("complete", last[1], f"time budget: {metric} of the evaluation at step {last[0]}")
    summary = json.loads((out / "summary.json").read_text())
    value = summary.get(metric)
    if not isinstance(value, (int, float)):
        shown = ", ".join(k for k, v in summary.items() if isinstance(v, (int, float)))
        return Outcome("fail", reason=f"{out / 'summary.json'} has no {metric} (it has: {shown})")
    if not math.isfinite(value):
        return Outcome("fail", reason=f"{metric} is {value} (the model's embeddings are not finite)")
    return Outcome("complete", float(value))


def exit_text(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if len(lines) > 1 else "(no output)"


class MetricsTail:
    """The evaluations of `metric` appended to a metrics.jsonl since the last read: [(step, value)].
    A line still being written (no newline yet) waits for the next read."""

    def __init__(self, path: Path, metric: str):
        self.history, self.metric, self.seen = History(path), metric, 0

    def read(self) -> list[tuple[int, float]]:
        records = self.history.refresh()
        if len(records) < self.seen:  # the file was replaced: History read it again from the start
            self.seen = 0
        new, self.seen = records[self.seen :], len(records)
        return [
            (int(r["step"]), float(r[self.metric]))
            for r in new
            if r.get("event") == "eval" and isinstance(r.get(self.metric), (int, float))
        ]
