"""mlx_clip.ui.runs: what the web app reads of a runs folder (no model, no server): run status from
the lock and summary, incremental metrics.jsonl reading while a run appends, config diffs, names
that must not leave the root, and sweeps read through optuna."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mlx_clip.run_history import History
from mlx_clip.ui.runs import RunsFolder, config_diff, flatten, run_status


def fake_run(root, name, records=(), config=None, summary=False, lock=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        json.dumps(config or {"train": {"steps": 10}, "data": {"batch_size": 4}})
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        (run / "summary.json").write_text("{}")
    if lock is not None:
        (run / ".lock").write_text(lock)
    return run


def test_lock_file_name_is_the_trainers():
    from mlx_clip.training.run_dir import LOCK_FILE
    from mlx_clip.ui import runs

    assert runs.LOCK_FILE == LOCK_FILE


def test_runs_module_imports_no_mlx():
    modules = "mlx_clip.ui.runs, mlx_clip.ui.__main__"
    code = f"import sys, {modules}; print(any(m.startswith('mlx.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_status(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    assert (
        run_status(fake_run(tmp_path, "a", lock=json.dumps({"pid": os.getpid(), "host": host}))) == "running"
    )
    assert run_status(fake_run(tmp_path, "b", lock=json.dumps({"pid": dead.pid, "host": host}))) == "stopped"
    assert run_status(fake_run(tmp_path, "c", lock="", summary=True)) == "finished"  # a clean exit empties it
    assert run_status(fake_run(tmp_path, "d")) == "stopped"
    other = json.dumps({"pid": dead.pid, "host": host + "-elsewhere"})
    assert run_status(fake_run(tmp_path, "e", lock=other)) == "running"  # cannot be checked: trusted


def test_history_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "tr')
    h = History(path)
    assert [r["step"] for r in h.refresh()] == [1]  # the torn line waits
    with open(path, "a") as f:
        f.write('ain", "step": 2}\nnot json\n{"event": "eval", "step": 2}\n')
    assert [r["step"] for r in h.refresh()] == [1, 2, 2]  # a damaged line is skipped
    path.write_text('{"event": "train", "step": 7}\n')  # replaced (a fresh run): read again
    assert [r["step"] for r in h.refresh()] == [7]


def test_summary_row_and_eta(tmp_path):
    records = [
        {"event": "train", "step": 2, "loss": 3.0, "lr": 1e-3, "img_per_s": 8.0},
        {"event": "eval", "step": 2, "epoch": 0, "zeroshot_top1": 0.5},
    ]
    lock = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    fake_run(tmp_path, "live", records, lock=lock)
    folder = RunsFolder(tmp_path)
    row = folder.summary(folder.resolve("live"))
    assert row["status"] == "running" and row["step"] == 2 and row["total_steps"] == 10
    assert row["eta_s"] == pytest.approx((10 - 2) * 4 / 8.0)  # steps left x batch / (img/s)
    assert row["eval"] == {"zeroshot_top1": 0.5} and row["loss"] == 3.0

    (tmp_path / "live" / ".lock").write_text("")  # ended cleanly at step 2 of 10: interrupted, pruned
    (tmp_path / "live" / "summary.json").write_text("{}")
    assert folder.summary(folder.resolve("live"))["status"] == "stopped"


def test_names_stay_below_the_root(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "study/trial_0")
    fake_run(root, "a")
    outside = fake_run(tmp_path, "outside")
    (root / "link").symlink_to(outside)
    folder = RunsFolder(root)
    assert [folder.name_of(r) for r in folder.run_dirs()] == ["a", "study/trial_0"]
    for bad in ("../outside", str(outside), "link", "", "study", "a/../../outside"):
        with pytest.raises(KeyError):
            folder.resolve(bad)


def test_config_diff():
    a = {"optim": {"lr": 1e-3, "wd": 0.1}, "model": {"arch": "tiny"}}
    b = {"optim": {"lr": 5e-4, "wd": 0.1}, "model": {"arch": "tiny"}, "data": {"hflip": True}}
    assert flatten(a) == {"optim.lr": 1e-3, "optim.wd": 0.1, "model.arch": "tiny"}
    assert config_diff({"a": a, "b": b}) == [
        {"key": "data.hflip", "values": {"a": None, "b": True}},
        {"key": "optim.lr", "values": {"a": 1e-3, "b": 5e-4}},
    ]


def test_sweep_trials_with_best_marked(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path / "runs"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s1", storage=storage, direction="minimize")
    for lr, value in ((1e-3, 0.5), (1e-2, 0.2), (1e-1, None)):
        study.enqueue_trial({"lr": lr})
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.set_user_attr("reason", "diverged" if value is None else "")
        fake_run(root, f"s1/trial_{trial.number}")
        study.tell(trial, value, state=optuna.trial.TrialState.FAIL if value is None else None)
    sweep = {"study": "s1", "storage": storage, "metric": "val_loss", "direction": "minimize"}
    (root / "s1" / "sweep.json").write_text(json.dumps(sweep))
    (out,) = RunsFolder(root).sweeps()
    assert out["name"] == "s1" and out["error"] is None and out["metric"] == "val_loss"
    rows = {t["number"]: t for t in out["trials"]}
    assert [rows[n]["best"] for n in (0, 1, 2)] == [False, True, False]
    assert rows[2]["state"] == "FAIL" and rows[2]["reason"] == "diverged" and rows[1]["value"] == 0.2
    assert rows[0]["run"] == "s1/trial_0" and rows[0]["params"] == {"lr": 1e-3}

    # An unreadable study: the trial run directories are still listed, with the reason.
    (root / "s1" / "sweep.json").write_text(json.dumps(dict(sweep, storage=f"sqlite:///{tmp_path}/none.db")))
    (broken,) = RunsFolder(root).sweeps()
    assert broken["error"] and [t["run"] for t in broken["trials"]] == [
        "s1/trial_0",
        "s1/trial_1",
        "s1/trial_2",
    ]
