"""python -m mlx_clip.sweep (mlx_clip/tuning/): studies of a few `tiny` trials on the SMALL built-in
dataset, each trial a real training process of 6 steps evaluated at step 3 and 6."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL

from mlx_clip.config import config_to_yaml, load_config

optuna = pytest.importorskip("optuna")

from mlx_clip.sweep import main as sweep  # noqa: E402
from mlx_clip.tuning.space import SpaceError, load_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--train.steps", "6", "--eval.every", "3", "--train.save_every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """SMALL as a run config file: 6 steps, evaluated at steps 3 and 6."""
    args = SMALL + STEPS
    pairs = [(args[i][2:], args[i + 1]) for i in range(0, len(args), 2)]
    path = tmp_path_factory.mktemp("sweep") / "base.yaml"
    path.write_text(config_to_yaml(load_config(None, pairs)))
    return path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/sweeps.db")


def run_sweep(tmp_path, base, space_text, name, *extra):
    space = write(tmp_path / f"{name}.yaml", space_text)
    storage = f"sqlite:///{tmp_path}/sweeps.db"
    sweep(["--config", str(base), "--space", space, "--study", name, "--storage", storage, *extra])
    return load(tmp_path, name)


def test_a_bad_space_is_refused_naming_the_key(tmp_path, base, capsys):
    cases = {
        "optim.lrr: {type: float, low: 1.0e-4, high: 1.0e-2}": ["optim.lrr", "did you mean 'optim.lr'"],
        "optim.lr: {type: normal, low: 0, high: 1}": ["optim.lr", "float | int | categorical"],
        "optim.lr: {type: float, low: 0.1, high: 0.01}": ["optim.lr", "low must be below high"],
        "optim.lr: {type: float, low: 0, high: 0.1, log: true}": ["optim.lr", "log: needs low > 0"],
        "optim.lr: {type: float, lo: 0, high: 0.1}": ["optim.lr", "unknown field(s) lo"],
        "optim: {type: categorical, choices: [1]}": ["'optim' is a section"],
        "loss.type: {type: categorical, choices: []}": ["loss.type", "non-empty list"],
        "loss.margin: {type: float, low: 0.1, high: 0.5, when: {loss.type: hard_negative}}\n"
        "loss.type: {type: categorical, choices: [clip, hard_negative]}": ["loss.margin", "listed below"],
        "loss.margin: {type: float, low: 0.1, high: 0.5, when: {loss.typo: x}}": ["loss.typo"],
    }
    for text, words in cases.items():
        with pytest.raises(SpaceError) as e:
            load_space(write(tmp_path / "space.yaml", text))
        assert "space.yaml" in str(e.value) and all(w in str(e.value) for w in words), (text, str(e.value))
    with pytest.raises(SystemExit) as e:  # the CLI says the same, before any trial
        run_sweep(tmp_path, base, "optim.lrr: {type: float, low: 0.1, high: 0.2}", "bad", "--trials", "1")
    assert "optim.lrr" in str(e.value) and not (tmp_path / "runs").exists()


def test_four_trials_finish_and_the_best_yaml_trains(tmp_path, base, monkeypatch, capsys):
    """Two workers, a conditional key; the table, best.yaml (trains), trials.txt and 3 PNGs."""
    monkeypatch.chdir(tmp_path)
    space = (
        "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "loss.type: {type: categorical, choices: [clip, hard_negative]}\n"
        "loss.margin: {type: float, low: 0.05, high: 0.5, when: {loss.type: hard_negative}}\n"
    )
    study = run_sweep(tmp_path, base, space, "four", "--trials", "4", "--workers", "2", "--pruner", "none")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # the condition: a margin exactly where the loss is hard_negative
        assert ("loss.margin" in t.params) == (t.params["loss.type"] == "hard_negative")
        run = tmp_path / "runs" / "four" / f"trial_{t.number}"
        assert (run / "summary.json").is_file() and (run / "config.yaml").is_file()
        assert load_config(run / "config.yaml").optim.lr == pytest.approx(t.params["optim.lr"])
    out = tmp_path / "runs" / "four"
    assert study.direction.name == "MAXIMIZE"  # zeroshot_top1, the default metric here
    pointer = json.loads((out / "sweep.json").read_text())  # how the web app finds the study
    assert pointer == {
        "study": "four",
        "storage": f"sqlite:///{tmp_path.resolve()}/sweeps.db",
        "metric": "zeroshot_top1",
        "direction": "maximize",
    }
    assert [p.name for p in sorted((out / "plots").glob("*.png"))] == [
        "history.png",
        "importance.png",
        "parallel.png",
    ]
    assert "zeroshot_top1" in capsys.readouterr().out
    best = study.best_trial
    cfg = load_config(out / "best.yaml")
    assert (
        cfg.optim.lr == pytest.approx(best.params["optim.lr"]) and cfg.loss.type == best.params["loss.type"]
    )

    from mlx_clip.train import main as train_main

    summary = train_main(
        ["--config", str(out / "best.yaml"), "--out", str(tmp_path / "best"), "--steps", "2"]
    )
    assert summary["step"] == 2


def test_failed_and_pruned_trials_are_recorded_and_the_study_goes_on(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A value the config refuses (no process is started) and a run that stops at its data.
    space = (
        "loss.label_smoothing: {type: categorical, choices: [0.0, 1.5]}\n"
        "data.val: {type: categorical, choices: [/no/such/val.csv]}\n"
    )
    study = run_sweep(tmp_path, base, space, "fails", "--trials", "3", "--seed", "1")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "FAIL" for t in trials)
    reasons = [t.user_attrs["reason"] for t in trials]
    for t, reason in zip(trials, reasons, strict=True):
        expected = (
            "label_smoothing" if t.params["loss.label_smoothing"] == 1.5 else "/no/such/val.csv: no such"
        )
        assert expected in reason, reason
    assert {t.params["loss.label_smoothing"] for t in trials} == {0.0, 1.5}  # both kinds happened

    # A run behind the finished one at its step-3 evaluation is pruned there (median pruner from
    # the first finished trial): lr 1e-2 jumps the val loss up at step 3, lr 1e-9 leaves it.
    # The sweep prunes a run it reads the evaluation of while the run goes on (one that has
    # finished by then is complete): 30 steps leave it seconds, even on a busy machine.
    space = "optim.lr: {type: categorical, choices: [1.0e-2, 1.0e-9]}\n"
    extra = ["--trials", "3", "--trial-steps", "30", "--metric", "val_loss", "--pruner-startup", "1"]
    study = run_sweep(tmp_path, base, space, "prune", *extra)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    first = next(t for t in trials if t.state.name == "COMPLETE")
    assert pruned and all(t.intermediate_values[3] > first.intermediate_values[3] for t in pruned)
    assert all(
        t.user_attrs["reason"] == "pruned at step 3" and 6 not in t.intermediate_values for t in pruned
    )
    assert len(trials) == 3 and {t.state.name for t in trials} == {"COMPLETE", "PRUNED"}


def test_a_killed_sweep_resumes_to_n_trials(tmp_path, base):
    """SIGKILL to the sweep and its trial while trial 1 trains; --resume keeps trial 0, records
    trial 1 as interrupted, runs its values again and finishes 3 trials."""
    space = write(tmp_path / "space.yaml", "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    storage = f"sqlite:///{tmp_path}/sweeps.db"
    args = ["--config", str(base), "--space", space, "--study", "k", "--storage", storage]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mlx_clip.sweep", *args, "--trials", "3", "--pruner", "none"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "runs" / "k" / "trial_1" / "train.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep did not reach trial 1"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running trial
    proc.wait()
    first = load(tmp_path, "k").get_trials()
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]

    sweep([*args, "--resume", "--trials", "3"])  # (the study holds its runs/ path, absolute)
    trials = load(tmp_path, "k").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].value == first[0].value
    assert "interrupted" in trials[1].user_attrs["reason"]
    assert trials[2].params == first[1].params  # the interrupted values, run again


def test_the_time_budget_stops_a_trial_with_its_last_evaluation(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
    extra = ["--trials", "1", "--trial-steps", "100000", "--trial-seconds", "5", "--metric", "val_loss"]
    study = run_sweep(tmp_path, base, space, "budget", *extra)
    (trial,) = study.get_trials()
    assert trial.state.name == "COMPLETE", trial.user_attrs
    last = max(trial.intermediate_values)
    assert trial.value == trial.intermediate_values[last] and last % 3 == 0
    assert trial.user_attrs["reason"] == f"time budget: val_loss of the evaluation at step {last}"
    run = tmp_path / "runs" / "budget" / "trial_0"
    assert list((run / "checkpoints").glob("step_*"))  # stopped as after Ctrl-C: with a checkpoint
