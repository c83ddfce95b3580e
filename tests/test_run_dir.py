"""Run directories and resume integrity (mlx_clip/training/{run_dir,resume,state}.py, issue #13
findings 1 and 3): one process and one run per OUT, run-scoped pruning, data fingerprints, the
changed keys on --resume, the position in samples, and OUT left as it was by a refused resume."""

import contextlib
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import SMALL, train_run

from mlx_clip.run_args import parse_args
from mlx_clip.train import main as train_main
from mlx_clip.training.checkpoint import find_resumable, prune_checkpoints
from mlx_clip.training.resume import breaks_exactness, config_changes
from mlx_clip.training.state import RunState

QUIET = ["--eval.every", "0", "--train.save_every", "0"]


def snapshot(out):
    """Every file under `out` (but the lock) -> its bytes: what a refused command must not change."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def states(out):
    ck = out / "checkpoints"
    return {p.name: json.loads((p / "state.json").read_text()) for p in sorted(ck.glob("step_*"))}


# ---------------------------------------------------------------------------
# One process per run directory: the lock


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_while_one_holds_the_directory(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):  # a new run, and a --resume, both refused
            with pytest.raises(
                SystemExit, match=rf"busy is in use: pid {holder.pid} on host .*another --out"
            ):
                train_run(tmp_path, "busy", "--steps", "2", *QUIET, *extra)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    unfinished = out / "checkpoints" / ".tmp-step_7-abc"  # the killed run's half-written checkpoint
    unfinished.mkdir(parents=True)
    (unfinished / "model.safetensors").write_bytes(b"x" * 100)
    train_run(tmp_path, "stale", "--steps", "2", *QUIET)
    printed = capsys.readouterr().out
    host = socket.gethostname()
    assert f"taking over the lock of pid {pid} on host {host}, which is no longer running" in printed
    assert "removed 1 unfinished checkpoint(s) left by a killed run" in printed
    assert not unfinished.exists()
    # Released at the end: the file is emptied and the lock is free.
    assert (out / ".lock").read_text() == ""
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(SystemExit, match="nope.csv"):
        train_run(tmp_path, "fails", "--data.train", str(tmp_path / "nope.csv"), "--steps", "2")
    fd = os.open(tmp_path / "fails" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError if still held
    finally:
        os.close(fd)


def test_a_file_system_without_locks_is_reported_not_fatal(tmp_path, monkeypatch):
    from mlx_clip.training.run_dir import RunLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    logged = []
    RunLock(tmp_path, log=logged.append).release()
    want = f"warning: {tmp_path} cannot be locked (No locks available); a second run into it would not be"
    assert len(logged) == 1 and logged[0].startswith(want)


# ---------------------------------------------------------------------------
# One run per run directory: ownership and run-scoped pruning


def test_a_fresh_run_into_a_used_directory_is_refused_and_changes_nothing(tmp_path):
    """Issue #13: `train --out R --steps 20 --save_every 10; train --out R --steps 12 --save_every 4`
    used to prune each new checkpoint as it was written (the old step_20 counted as newest)."""
    out, _ = train_run(tmp_path, "R", "--steps", "20", "--train.save_every", "10", "--eval.every", "0")
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*step_20.*--resume.*new --out"):
        train_run(tmp_path, "R", "--steps", "12", "--train.save_every", "4", "--eval.every", "0")
    assert snapshot(out) == before
    run_ids = {s["run_id"] for s in states(out).values()}
    assert len(run_ids) == 1 and len(run_ids.pop()) == 32


def fake_checkpoint(root, step, run_id):
    """A step_N with only a state.json: all that pruning and find_resumable read."""
    (root / f"step_{step}").mkdir(parents=True)
    (root / f"step_{step}" / "state.json").write_text(json.dumps({"step": step, "run_id": run_id}))


def test_pruning_and_resume_only_consider_the_current_run(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        fake_checkpoint(root, step, "old")
    for step in (4, 8, 12):
        fake_checkpoint(root, step, "new")
    os.symlink("step_12", root / "latest")
    prune_checkpoints(root, keep_last=2, run_id="new")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_12", "step_20", "step_8"]
    assert find_resumable(root) == root / "step_12"  # not the other run's higher step_20


# ---------------------------------------------------------------------------
# Resume integrity


def test_position_in_samples_survives_any_batch_size():
    saved = RunState(batch_size=16)
    for _ in range(15):
        saved.advance(batches_per_epoch=16)  # 256 samples
    assert (saved.epoch, saved.batch_in_epoch, saved.samples_in_epoch) == (0, 15, 240)
    for batch, per_epoch, want in ((16, 16, (0, 15)), (8, 32, (0, 30)), (57, 4, (1, 0)), (100, 2, (1, 0))):
        state = RunState(batch_size=batch)
        state.resume_from(RunState.from_json(saved.to_json()))
        state.seek(per_epoch)
        assert (state.epoch, state.batch_in_epoch) == want, batch
        assert 0 <= state.batch_in_epoch < per_epoch


def test_changed_keys_are_named_and_sorted_by_whether_they_break_exactness():
    old = "data:\n  batch_size: 64\n  num_workers: 2\noptim:\n  lr: 0.001\nmodel:\n  vision_width: 64\n"
    new = "data:\n  batch_size: 57\n  num_workers: 4\noptim:\n  lr: 0.0005\nmodel:\n  vision_width: 96\n"
    changes = config_changes(old, new)
    assert changes == {
        "data.batch_size": (64, 57),
        "data.num_workers": (2, 4),
        "model.vision_width": (64, 96),
        "optim.lr": (0.001, 0.0005),
    }
    assert [k for k in changes if breaks_exactness(k)] == ["data.batch_size", "model.vision_width"]
    assert breaks_exactness("train.seed") and breaks_exactness("loss.type")
    assert not breaks_exactness("train.steps") and not breaks_exactness("model.init_from")


def test_resume_with_another_batch_size_is_refused_then_continues_at_the_sample_position(tmp_path, capsys):
    """Issue #13: `--resume --data.batch_size 57` hung for ever (a batch index past the new epoch's
    end); it is now refused by name, leaves OUT as it was, and with --resume-changed continues from
    the same sample. Run in a subprocess with a timeout, so a hang fails the test."""
    out, _ = train_run(tmp_path, "bs", "--steps", "12", "--stop-after", "4", *QUIET)  # 16 batches of 16
    before = snapshot(out)
    capsys.readouterr()  # only what the refused resume prints, below
    with pytest.raises(
        SystemExit, match=r"cannot resume .*step_4 exactly: changed data.batch_size.*--resume-changed"
    ):
        train_main(["--out", str(out), "--resume", "--data.batch_size", "57"])
    printed = capsys.readouterr().out
    assert "data.batch_size 16 -> 57" in printed and "held out:" not in printed  # before the data is read
    # A resume that fails after the check (the weights do not fit) writes nothing either.
    with pytest.raises(SystemExit, match="shape"):
        train_main(["--out", str(out), "--resume", "--resume-changed", "--model.vision_width", "96"])
    assert snapshot(out) == before  # config.yaml included: a plain --resume still works (below)

    cmd = [sys.executable, "-m", "mlx_clip.train", "--out", str(out), "--resume", "--resume-changed",
           "--data.batch_size", "57", "--stop-after", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 0 sample 64 continues at epoch 0 batch 1 (sample 57)" in proc.stdout
    state = states(out)["step_5"]
    assert (state["batch_size"], state["epoch"], state["batch_in_epoch"], state["samples_in_epoch"]) == (
        57, 0, 2, 114
    )  # fmt: skip
    assert len({s["run_id"] for s in states(out).values()}) == 1  # the same run, continued
    summary = train_main(["--out", str(out), "--resume"])  # plain: the run's own config, now batch 57
    assert summary["step"] == 12


def test_resume_after_the_csv_changed_is_refused_naming_the_fingerprint(tmp_path, capsys):
    from mlx_clip.data.synthetic import write_dataset

    csv = write_dataset(tmp_path / "d", 64, image_size=32, seed=3, fmt="csv")
    args = ["--data.train", str(csv), "--data.val_ratio", "0.25", "--steps", "4", *QUIET]
    out, _ = train_run(tmp_path, "csv", *args, "--stop-after", "2")
    fingerprint = states(out)["step_2"]["data"]["train"]
    assert fingerprint["samples"] == 48 and fingerprint["files"] == {str(csv): csv.stat().st_size}
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[: 1 + len(lines) // 2]))  # halve the rows
    with open(out / "skipped.jsonl", "a") as f:  # a decode-time skip of the first run's epochs
        f.write(json.dumps({"reason": "corrupt_image", "stage": "decode", "item": "x.png"}) + "\n")
    before = snapshot(out)
    with pytest.raises(
        SystemExit, match=r"changed the data fingerprint \(train files: .*train samples: 48 -> 24"
    ):
        train_main(["--out", str(out), "--resume", *SMALL, *args])
    assert snapshot(out) == before


def test_a_checkpoint_without_the_new_fields_still_resumes(tmp_path):
    """state.json written before run ids, fingerprints and positions in samples: resumed from its
    batch position and config, bit for bit as an uninterrupted run."""
    from safetensors.numpy import load_file

    full, _ = train_run(tmp_path, "full", "--steps", "6", *QUIET)
    old, _ = train_run(tmp_path, "old", "--steps", "6", "--stop-after", "3", *QUIET)
    path = old / "checkpoints" / "step_3" / "state.json"
    state = json.loads(path.read_text())
    for key in ("samples_in_epoch", "batch_size", "run_id", "data"):
        del state[key]
    path.write_text(json.dumps(state))
    train_main(["--out", str(old), "--resume"])
    a = load_file(str(full / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(old / "checkpoints" / "step_6" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


# ---------------------------------------------------------------------------
# Arguments and directories that cannot work: one line, before training


@pytest.mark.parametrize("value", ["-1", "0"])
def test_stop_after_must_be_positive(tmp_path, value, capsys):
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path / "x"), "--stop-after", value])
    assert f"--stop-after: must be at least 1 step, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        parse_args(["--resume-changed"])  # only with --resume
    assert "--resume-changed only applies to --resume" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "from the same sample position" in " ".join(capsys.readouterr().out.split())


@contextlib.contextmanager
def read_only_dir(path):
    """A directory this process cannot write to: mode 555 for a user; as root, which ignores modes,
    a real read-only tmpfs (skipped where mounting is not allowed)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"root ignores directory modes and cannot mount a read-only tmpfs here: {mount.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_unwritable_run_directory_is_one_line_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"cannot write to the run directory .*a_file/run: Not a directory"):
        train_main(["--out", str(blocker / "run"), *SMALL, "--steps", "2"])
    with read_only_dir(tmp_path / "ro") as ro:
        reason = "(Permission denied|Read-only file system)"
        with pytest.raises(SystemExit, match=rf"cannot write to the run directory .*ro: {reason}; choose"):
            train_main(["--out", str(ro), *SMALL, "--steps", "2"])
        with pytest.raises(SystemExit, match=rf"cannot write to the run directory .*ro/run: {reason}"):
            train_main(["--out", str(ro / "run"), *SMALL, "--steps", "2"])  # cannot even be created
