"""What the web app shows of a runs folder: each training run's status and latest numbers, its
history for the curves, config diffs between runs, and sweeps with their trials. Framework-free
(no MLX), read-only: the UI never writes into a run directory.

A run is any directory below the root (at most MAX_DEPTH levels down) holding metrics.jsonl or
config.yaml, named by its path relative to the root ("exp1", "study/trial_3"). Its status:
- "running": OUT/.lock names a live process on this host (training/run_dir.py writes its pid there
  and empties the file on a clean exit; the lock is not probed with flock, which could make a
  starting run think the directory is in use);
- "finished": summary.json exists (written at the end of training) and the run reached train.steps;
- "stopped": otherwise (killed, crashed, interrupted or pruned before its end; a lock left by a
  dead process).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import yaml

from ..procs import pid_alive
from ..run_history import History

LOCK_FILE = ".lock"  # training/run_dir.py LOCK_FILE (tests/test_ui_runs.py checks they agree)
SWEEP_FILE = "sweep.json"  # runs/<study>/sweep.json: {"study", "storage", "metric", "direction"}
MAX_DEPTH = 3  # runs/<study>/trial_<n> is two levels; one more for a folder of studies
SKIP_DIRS = {"checkpoints", "tensorboard", "plots", "__pycache__"}


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: the dotted keys of the CLI overrides."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_config(run: Path) -> dict:
    """A run's resolved config.yaml as a nested dict ({} when missing or unreadable)."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def config_diff(configs: dict[str, dict]) -> list[dict]:
    """The dotted keys whose values differ between the named configs, sorted by key:
    [{"key": "optim.lr", "values": {"run_a": 0.001, "run_b": null}}, ...] (null: not set)."""
    flat = {name: flatten(c) for name, c in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    rows = []
    for key in keys:
        values = {name: f.get(key) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            rows.append({"key": key, "values": values})
    return rows


def run_status(run: Path) -> str:
    """ "running", "finished" or "stopped" (module doc)."""
    try:
        holder = json.loads((run / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        holder = None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
        if holder.get("host", socket.gethostname()) != socket.gethostname() or pid_alive(holder["pid"]):
            return "running"  # another host's process cannot be checked from here: trust the lock
    return "finished" if (run / "summary.json").is_file() else "stopped"


class RunsFolder:
    """The runs below one root, their histories kept between requests so a poll reads only
    the new lines of each metrics.jsonl."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.histories: dict[Path, History] = {}
        self.lock = threading.Lock()  # the server's threads share the histories
        self.storages: dict[str, object] = {}  # a sweep's storage URL -> its open Optuna storage
        self.db_lock = threading.Lock()  # ... and share those

    def run_dirs(self) -> list[Path]:
        return self._scan()[0]

    def _scan(self) -> tuple[list[Path], list[Path]]:
        """(run directories, sweep directories) below the root, at most MAX_DEPTH levels down,
        in one walk that skips hidden folders and what a run keeps inside it (SKIP_DIRS)."""
        found, sweeps = [], []

        def walk(directory: Path, depth: int):
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                return
            for e in entries:
                if e.name.startswith(".") or e.name in SKIP_DIRS or not e.is_dir(follow_symlinks=False):
                    continue
                path = Path(e.path)
                if (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
                    found.append(path)
                if depth < MAX_DEPTH and (path / SWEEP_FILE).is_file():
                    sweeps.append(path)
                if depth < MAX_DEPTH:
                    walk(path, depth + 1)

        walk(self.root, 1)
        return found, sweeps

    def resolve(self, name: str) -> Path:
        """A run's name -> its directory; a KeyError for anything that is not a run below the root
        (an absolute path, "..", a symlink out of it)."""
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or path not in set(self.run_dirs()):
            raise KeyError(f"no run named {name!r} under {self.root}")
        return path

    def name_of(self, run: Path) -> str:
        return run.relative_to(self.root).as_posix()

    def history(self, run: Path) -> list[dict]:
        with self.lock:
            if run not in self.histories:
                self.histories[run] = History(run / "metrics.jsonl")
            return list(self.histories[run].refresh())

    def summary(self, run: Path) -> dict:
        """One row of the runs table: status, step of total, last train numbers, ETA, last eval."""
        records, config = self.history(run), read_config(run)
        train = [r for r in records if r.get("event") == "train"]
        evals = [r for r in records if r.get("event") == "eval"]
        last = train[-1] if train else {}
        total = config.get("train", {}).get("steps")
        batch = config.get("data", {}).get("batch_size")
        status = run_status(run)
        step = max((r.get("step", 0) for r in records if isinstance(r.get("step"), int)), default=0)
        if status == "finished" and isinstance(total, int) and step < total:
            status = "stopped"  # ended cleanly before train.steps: Ctrl-C, a pruned sweep trial
        eta = None
        if (
            status == "running"
            and isinstance(total, int)
            and isinstance(batch, int)
            and last.get("img_per_s")
        ):
            eta = max(0, total - step) * batch / last["img_per_s"]
        metrics = {
            k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("event", "step", "epoch")
        }
        return {
            "name": self.name_of(run),
            "status": status,
            "step": step,
            "total_steps": total if isinstance(total, int) else None,
            "loss": last.get("loss"),
            "lr": last.get("lr"),
            "img_per_s": last.get("img_per_s"),
            "eta_s": eta,
            "eval": metrics,
            "checkpoint": (run / "checkpoints" / "latest").exists(),
            "updated": _mtime(run / "metrics.jsonl"),
        }

    def detail(self, name: str) -> dict:
        """A run's summary row, its train and eval records (for the curves), config and summary.json."""
        run = self.resolve(name)
        records = self.history(run)
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        return {
            **self.summary(run),
            "train": [r for r in records if r.get("event") == "train"],
            "evals": [r for r in records if r.get("event") == "eval"],
            "config": read_config(run),
            "summary": summary,
        }

    def diff(self, names: list[str]) -> list[dict]:
        return config_diff({n: read_config(self.resolve(n)) for n in names})

    def sweeps(self) -> list[dict]:
        """Every sweep (a directory with sweep.json) and its trials (sweep_trials)."""
        with self.db_lock:
            return [sweep_trials(d, self.root, self.storages) for d in self._scan()[1]]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def sweep_trials(study_dir: Path, root: Path, storages: dict | None = None) -> dict:
    """A sweep's study and its trials: number, state, value, params, reason, run (the trial's run
    directory, relative to root, when there is one), and "best" on the best completed trial.
    Optuna is imported here only; without it, or with an unreadable study, the trial run
    directories are listed alone and "error" says why. `storages` keeps each storage URL's open
    storage between calls (opening one costs ~40 ms, the runs page polls every 2 s)."""
    meta = json.loads((study_dir / SWEEP_FILE).read_text())
    out = {
        "name": study_dir.relative_to(root).as_posix(),
        "study": meta.get("study"),
        "metric": meta.get("metric"),
        "direction": meta.get("direction"),
        "trials": [],
        "error": None,
    }
    runs = {p.name: p.relative_to(root).as_posix() for p in study_dir.glob("trial_*") if p.is_dir()}
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storages = {} if storages is None else storages
        if meta["storage"] not in storages:
            storages[meta["storage"]] = optuna.storages.get_storage(meta["storage"])
        study = optuna.load_study(study_name=meta["study"], storage=storages[meta["storage"]])
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        pick = max if meta.get("direction", "maximize") == "maximize" else min
        best = pick(done, key=lambda t: t.value).number if done else None
        for t in trials:
            out["trials"].append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.value,
                    "params": t.params,
                    "reason": t.user_attrs.get("reason", ""),
                    "run": runs.get(f"trial_{t.number}"),
                    "best": t.number == best,
                }
            )
    except Exception as e:  # no optuna, a missing or locked database: still list the run dirs
        out["error"] = f"{type(e).__name__}: {e}"
        for name in sorted(runs, key=lambda n: int(n.split("_")[1]) if n.split("_")[1].isdigit() else 0):
            number = name.split("_", 1)[1]
            out["trials"].append(
                {
                    "number": int(number) if number.isdigit() else number,
                    "state": None,
                    "value": None,
                    "params": {},
                    "reason": "",
                    "run": runs[name],
                    "best": False,
                }  # fmt: skip
            )
    return out
