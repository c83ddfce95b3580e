"""A sweep: an Optuna study in a database file, its trials run as training processes.

    study = open_study(storage, name, settings, resume)   # the settings live in the study
    run_sweep(study, n_trials, workers)                   # ask -> run a trial -> tell, K at a time

Every change of a trial's state is written to the database at once, so a sweep killed at any
point leaves the study as it was; `--resume` marks the trials its dead process left running as
failed ("interrupted"), queues their parameters again, and goes on until `n_trials` trials have
finished (complete, pruned or failed; interrupted trials do not count). Framework-free.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..config import Config, load_config
from ..evaluation.spec import best_metric_problem, lower_is_better
from ..procs import pid_alive
from ..schema import ConfigError
from .space import Param, load_space, override_text, sample
from .trial import run_trial, train_command

SETTINGS_ATTR = "mlx_clip_sweep"
PRUNERS = ("median", "hyperband", "none")


class SweepError(ValueError):
    """The sweep cannot start as asked; the message says what to change."""


@dataclass
class Settings:
    """What a study was started with; stored in the study, so --resume and --report need no more."""

    config: str | None  # the base run config (None: the built-in defaults)
    space: str
    metric: str
    out: str  # runs/<study>: trial_<n>/, best.yaml, plots/
    trial_steps: int | None = None  # train.steps of each trial (None: the base config's)
    trial_seconds: float | None = None
    seed: int = 0
    pruner: str = "median"
    pruner_warmup: int = 0  # median: no pruning before this training step
    pruner_startup: int = 2  # median: finished trials before any is pruned

    def base(self) -> Config:
        return load_config(self.config)

    def params(self) -> list[Param]:
        return load_space(self.space)


def check_settings(s: Settings) -> None:
    if s.pruner not in PRUNERS:
        raise SweepError(f"--pruner {s.pruner!r}: expected one of {', '.join(PRUNERS)}")
    try:
        base = s.base()
    except ConfigError as e:
        raise SweepError(f"--config: {e}") from None
    problem = (
        best_metric_problem(s.metric, base.eval.sets) if s.metric != "auto" else "auto is not one metric"
    )
    if problem:
        raise SweepError(f"--metric {s.metric!r} is not a metric the runs report; {problem}")
    s.params()  # SpaceError names the key
    steps = s.trial_steps or base.train.steps
    if s.pruner != "none" and not 0 < base.eval.every < steps:
        print(
            f"warning: eval.every={base.eval.every} gives no evaluation before step {steps}, so the "
            f"{s.pruner} pruner has nothing to act on; set eval.every in --config below the trial's steps"
        )


def open_study(storage: str, name: str, settings: Settings | None, resume: bool) -> optuna.Study:
    """A new study (`settings` stored in it), or with `resume` the existing one; refuses a new
    study under a name that exists, and --resume of one that does not."""
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    db = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
    names = [s.study_name for s in optuna.get_all_study_summaries(db, include_best_trial=False)]
    if name in names and not resume:
        raise SweepError(
            f"study {name!r} already exists in {storage}; continue it with --resume, or name another"
        )
    if name not in names:
        if resume:
            raise SweepError(
                f"no study {name!r} in {storage} to resume (studies there: {', '.join(names) or 'none'})"
            )
        check_settings(settings)
        direction = "minimize" if lower_is_better(settings.metric) else "maximize"
        study = optuna.create_study(storage=db, study_name=name, direction=direction)
        study.set_user_attr(SETTINGS_ATTR, dataclasses.asdict(settings))
        write_pointer(settings, name, storage, direction)
    study = optuna.load_study(study_name=name, storage=db)
    stored = Settings(**study.user_attrs[SETTINGS_ATTR])
    study.sampler = optuna.samplers.TPESampler(seed=stored.seed + len(study.trials))  # (a resume draws anew)
    study.pruner = make_pruner(stored, stored.base())
    return study


def write_pointer(s: Settings, name: str, storage: str, direction: str) -> None:
    """runs/<study>/sweep.json: where the study's database is, so that a reader of runs/ (the web
    app) finds a sweep from its folder alone."""
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        storage = "sqlite:///" + str(Path(storage.removeprefix("sqlite:///")).resolve())
    record = {"study": name, "storage": storage, "metric": s.metric, "direction": direction}
    Path(s.out).mkdir(parents=True, exist_ok=True)
    (Path(s.out) / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")


def settings_of(study: optuna.Study) -> Settings:
    return Settings(**study.user_attrs[SETTINGS_ATTR])


def make_pruner(s: Settings, base: Config) -> optuna.pruners.BasePruner:
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup, n_warmup_steps=s.pruner_warmup)
    if s.pruner == "hyperband":  # its resource is the training step of an evaluation
        return optuna.pruners.HyperbandPruner(min_resource=max(1, base.eval.every), max_resource="auto")
    return optuna.pruners.NopPruner()


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished or running (in any process); a trial interrupted by a stopped sweep is run again."""
    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get("interrupted", False)
    return trial.state != TrialState.WAITING


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a sweep process of this host that no longer runs: FAIL
    ("interrupted"), their parameters queued again. Returns their numbers."""
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, where = t.user_attrs.get("sweep_pid"), t.user_attrs.get("host", host)
        if where != host or (pid is not None and pid_alive(pid)):
            continue
        trial = optuna.trial.Trial(study, t._trial_id)
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("reason", "interrupted: its sweep process was killed")
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        failed.append(t.number)
    return failed


def run_sweep(study: optuna.Study, n_trials: int, workers: int = 1) -> None:
    """Run trials until `n_trials` count (counted()); `workers` trials at a time, each a thread
    that waits on its training process. Ctrl-C stops the trials in flight (each saves a
    checkpoint, is recorded as interrupted and queued again) and is raised again."""
    settings = settings_of(study)
    params, base = settings.params(), settings.base()
    lock, stop, errors = threading.Lock(), threading.Event(), []
    done = [threading.Event() for _ in range(workers)]

    def work(finished: threading.Event):
        try:
            while not stop.is_set():
                with lock:  # one ask at a time, so K threads never overshoot n_trials
                    if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= n_trials:
                        return
                    trial = study.ask()
                    trial.set_user_attr("sweep_pid", os.getpid())
                    trial.set_user_attr("host", socket.gethostname())
                    values = sample(trial, params, base)
                run_one(study, trial, values, settings, stop)
        except BaseException as e:  # noqa: B036 (handed to the main thread)
            errors.append(e)
            stop.set()
        finally:
            finished.set()

    for i, finished in enumerate(done):
        threading.Thread(target=work, args=(finished,), name=f"sweep-worker-{i}").start()
    # (Events, not Thread.join: a join cut short by Ctrl-C may not wait again on Python 3.11)
    try:
        wait_all(done)
    except KeyboardInterrupt:
        stop.set()  # each worker stops its run, which saves a checkpoint, and records it
        wait_all(done)
        raise
    if errors:
        raise errors[0]


def wait_all(events: list[threading.Event]) -> None:
    for event in events:
        while not event.wait(0.5):
            pass


def run_one(
    study: optuna.Study, trial: optuna.Trial, values: dict, s: Settings, stop: threading.Event
) -> None:
    """Validate the trial's config here (a bad value fails without a process), run it, tell the result."""
    out = Path(s.out) / f"trial_{trial.number}"
    trial.set_user_attr("run_dir", str(out))
    overrides = {k: override_text(v) for k, v in values.items()}
    if s.trial_steps:
        overrides["train.steps"] = str(s.trial_steps)
    shown = " ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"trial {trial.number}: {shown}", flush=True)
    try:
        load_config(s.config, list(overrides.items()), log=None)
    except ConfigError as e:
        return tell(study, trial, "fail", None, f"config error: {e}")

    def report(value: float, step: int) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    command = train_command(s.config, out, overrides)
    result = run_trial(command, out, s.metric, report, s.trial_seconds, stop)
    if result.reason.startswith("interrupted"):
        trial.set_user_attr("interrupted", True)
        tell(study, trial, "fail", None, result.reason)
        study.enqueue_trial(values)
        return
    tell(study, trial, result.state, result.value, result.reason)


def tell(study: optuna.Study, trial: optuna.Trial, state: str, value: float | None, reason: str) -> None:
    if reason:
        trial.set_user_attr("reason", reason)
    states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}
    study.tell(trial, value if state == "complete" else None, state=states[state])
    shown = f" {value:.4g}" if value is not None else ""
    print(f"trial {trial.number}: {state}{shown}{f' ({reason})' if reason else ''}", flush=True)
