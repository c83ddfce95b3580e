"""`python -m mlx_clip.train` end to end on small runs: outputs, checkpoints, exact resume, eval CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, train_run
from safetensors.numpy import load_file

from mlx_clip.config import load_config
from mlx_clip.run_args import parse_args
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main


def test_end_to_end_outputs(tmp_path):
    out, summary = train_run(tmp_path, "run", "--steps", "6", "--eval.every", "3", "--train.save_every", "3")
    assert summary["step"] == 6
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert {"step", "loss", "lr", "img_per_s"} <= train[0].keys()
    assert all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals] == [3, 6]
    for key in (
        "zeroshot_top1",
        "zeroshot_top5",
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_mean_rank",
    ):
        assert key in evals[-1] and 0 <= evals[-1][key] <= (48 if "rank" in key else 1)

    ckpts = out / "checkpoints"
    latest = ckpts / "latest"
    assert latest.resolve() == (ckpts / "step_6").resolve()
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "config.yaml", "tokenizer.json"):
        assert (ckpts / "step_6" / name).is_file(), name
    state = json.loads((ckpts / "step_6" / "state.json").read_text())
    assert state["step"] == 6 and "config_hash" in state and "seed" in state and "files" in state
    assert "mlx_rng_key" not in state  # MLX cannot restore its global key; resume reseeds from (seed, step)
    assert "epoch" in state and "batch_in_epoch" in state
    # The resolved config is complete and loads back.
    cfg = load_config(out / "config.yaml")
    assert cfg.model_config().vision_width == 64 and cfg.train.steps == 6
    assert not list(ckpts.glob(".tmp-*"))


def test_resume_is_bit_exact(tmp_path):
    """train 8 == train 4, stop, resume, train 4 -- bit for bit (CPU)."""
    common = ["--steps", "8", "--eval.every", "0", "--train.save_every", "0"]
    full, _ = train_run(tmp_path, "full", *common)
    half, _ = train_run(tmp_path, "half", *common, "--stop-after", "4")
    assert json.loads((half / "checkpoints" / "step_4" / "state.json").read_text())["step"] == 4
    resumed = train_main(["--out", str(half), "--resume", *SMALL, *common])
    assert resumed["step"] == 8
    a = load_file(str(full / "checkpoints" / "step_8" / "model.safetensors"))
    b = load_file(str(half / "checkpoints" / "step_8" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    oa = load_file(str(full / "checkpoints" / "step_8" / "optimizer.safetensors"))
    ob = load_file(str(half / "checkpoints" / "step_8" / "optimizer.safetensors"))
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)


def test_keeps_best_and_last_k(tmp_path):
    out, _ = train_run(
        tmp_path, "keep", "--steps", "8", "--eval.every", "2", "--train.save_every", "2",
        "--train.keep_last", "1",
    )  # fmt: skip
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    state = json.loads((out / "checkpoints" / "step_8" / "state.json").read_text())
    best = state["best"]["checkpoint"]
    assert best in kept and "step_8" in kept
    assert set(kept) == {best, "step_8"}


def test_eval_cli_matches_training_eval(tmp_path):
    out, summary = train_run(tmp_path, "ev", "--steps", "4", "--eval.every", "0")
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_clip.eval", "--checkpoint", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["zeroshot_top1"] == pytest.approx(summary["zeroshot_top1"])
    assert metrics["i2t_R@1"] == pytest.approx(summary["i2t_R@1"])
    assert (out / "checkpoints" / "step_4" / "eval.json").is_file()


def test_cli_overrides_and_errors():
    args, overrides = parse_args(["--steps", "7", "--optim.lr", "3e-4", "--data.batch_size=64"])
    cfg = load_config(None, overrides)
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-4 and cfg.data.batch_size == 64
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(None, [("optim.lrate", "1")])
    with pytest.raises(ConfigError, match="data.batch_size must be an integer or 'auto'"):
        load_config(None, [("data.batch_size", "big")])
    with pytest.raises(ConfigError, match="at least 2 pairs"):
        load_config(None, [("data.batch_size", "1")])
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, [("model.image_size", "60")])


def test_cli_config_error_exits_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  warmup: 10\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_clip.train", "--config", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "bad.yaml" in proc.stderr and "unknown config key 'optim.warmup'" in proc.stderr
    assert "optim.warmup_steps" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_users_csv_trains_with_one_command(tmp_path):
    """A folder of image files plus a CSV: one command trains on it, with a ratio-split val set."""
    from mlx_clip.data.synthetic import write_dataset

    csv = write_dataset(tmp_path / "mydata", 96, image_size=40, seed=3, fmt="csv")
    out = tmp_path / "csvrun"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mlx_clip.train", "--out", str(out), *SMALL, "--data.train", str(csv),
            "--data.val_ratio", "0.25", "--steps", "3", "--eval.every", "0",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["retrieval_images"] == 24
    assert "zeroshot_top1" not in summary  # user data has no class set
    assert (out / "checkpoints" / "step_3" / "model.safetensors").is_file()


def test_missing_data_and_checkpoint_give_one_clear_line(tmp_path):
    for args, needle in (
        (["--data.train", str(tmp_path / "nope.csv")], "nope.csv: no such file"),
        (["--resume"], "no checkpoint found"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_clip.train", "--out", str(tmp_path / "r"), *args],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_resume_is_bit_exact_at_tiny_size(tmp_path):
    """Large enough matmuls for OpenBLAS to thread: train.deterministic keeps resume bit-exact."""
    common = [
        "--steps", "6", "--eval.every", "0", "--train.save_every", "0", "--train.progress", "false",
        "--data.builtin_train_size", "640", "--data.builtin_val_size", "48", "--optim.warmup_steps", "2",
    ]  # fmt: skip
    train_main(["--out", str(tmp_path / "full"), *common])
    train_main(["--out", str(tmp_path / "half"), *common, "--stop-after", "3"])
    train_main(["--out", str(tmp_path / "half"), "--resume", *common])
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_images_are_skipped_and_reported(tmp_path):
    from mlx_clip.data.synthetic import write_dataset

    csv = write_dataset(tmp_path / "d", 64, image_size=40, seed=3, fmt="csv")
    (tmp_path / "d" / "images" / "000005.png").write_bytes(b"")  # zero bytes
    (tmp_path / "d" / "images" / "000007.png").unlink()  # missing
    out, summary = train_run(tmp_path, "bad", "--data.train", str(csv), "--steps", "2",
                             "--eval.every", "0", "--data.max_bad_fraction", "0.05")  # fmt: skip
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert {Path(x["item"]).name for x in lines} == {"000005.png", "000007.png"}
    assert summary["skipped"]["skipped"] == 2

    # Over the allowed share: the run stops before training, naming the bad files.
    for i in range(8, 14):
        (tmp_path / "d" / "images" / f"{i:06d}.png").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="000008.png"):
        train_run(tmp_path, "worse", "--data.train", str(csv), "--steps", "2", "--eval.every", "0")
    assert not (tmp_path / "worse" / "checkpoints").exists()


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    common = ["--steps", "6", "--eval.every", "0", "--train.save_every", "2", "--train.keep_last", "3"]
    full, _ = train_run(tmp_path, "full", *common)
    half, _ = train_run(tmp_path, "half", *common, "--stop-after", "4")
    damaged = half / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the weights
    damaged.write_bytes(bytes(data))
    train_main(["--out", str(half), "--resume", *SMALL, *common])
    out = capsys.readouterr().out
    assert "step_4/model.safetensors: checksum mismatch" in out and "resumed from" in out and "step_2" in out
    a = load_file(str(full / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(half / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import time

    out = tmp_path / "sig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_clip.train", "--out", str(out), *SMALL, "--steps", "5000",
         "--train.log_every", "1", "--eval.every", "0", "--train.save_every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "interrupted at step" in stdout
    latest = (out / "checkpoints" / "latest").resolve()
    state = json.loads((latest / "state.json").read_text())
    assert 3 <= state["step"] < 5000 and latest.name == f"step_{state['step']}"


def nan_batches_at(monkeypatch, bad_steps):
    """Make the training loader's batches at the given 1-based step numbers all-NaN images."""
    from mlx_clip.data.pipeline import Loader

    original = Loader.epoch
    seen = {"n": 0}

    def epoch(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            if self.train:
                seen["n"] += 1
                if seen["n"] in bad_steps:
                    batch = dict(batch, images=np.full_like(batch["images"], np.nan))
            yield batch

    monkeypatch.setattr(Loader, "epoch", epoch)


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    nan_batches_at(monkeypatch, {3})
    out, summary = train_run(tmp_path, "nan", "--steps", "4", "--eval.every", "0",
                             "--train.save_every", "1", "--train.keep_last", "10")  # fmt: skip
    ck = out / "checkpoints"
    w2, w3 = (load_file(str(ck / f"step_{i}" / "model.safetensors")) for i in (2, 3))
    o2, o3 = (load_file(str(ck / f"step_{i}" / "optimizer.safetensors")) for i in (2, 3))
    assert all(np.array_equal(w2[k], w3[k]) for k in w2) and all(np.array_equal(o2[k], o3[k]) for k in o2)
    w4 = load_file(str(ck / "step_4" / "model.safetensors"))
    assert not all(np.array_equal(w3[k], w4[k]) for k in w3) and all(np.isfinite(w4[k]).all() for k in w4)
    assert summary["skipped_steps"] == 1
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skip"] == [3]


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    nan_batches_at(monkeypatch, {3, 4, 5, 6})
    with pytest.raises(SystemExit, match="2 consecutive steps.*Lower optim.lr"):
        train_run(tmp_path, "nan2", "--steps", "8", "--eval.every", "0", "--train.save_every", "2",
                  "--train.max_bad_steps", "2")  # fmt: skip
    latest = (tmp_path / "nan2" / "checkpoints" / "latest").resolve()
    assert latest.name == "step_2"


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import mlx.core as mx

    real_save = mx.save_safetensors
    calls = {"n": 0}

    def save(path, *args, **kwargs):
        if "optimizer" in str(path) and "step_4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)
    with pytest.raises(
        SystemExit, match=r"could not write checkpoint .*step_4.*No space left.*step_2 is intact"
    ):
        train_run(tmp_path, "disk", "--steps", "6", "--eval.every", "0", "--train.save_every", "2")
    ck = tmp_path / "disk" / "checkpoints"
    assert (ck / "latest").resolve().name == "step_2" and not list(ck.glob(".tmp-*"))
    from mlx_clip.training.checkpoint import verify_checkpoint

    assert verify_checkpoint(ck / "step_2")["step"] == 2


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    import os
    import random
    import signal
    import time

    common = [*SMALL, "--steps", "60", "--eval.every", "0", "--train.save_every", "1",
              "--train.keep_last", "2", "--train.log_every", "1"]  # fmt: skip
    full, _ = train_run(tmp_path, "full", *common)
    out = tmp_path / "killed"
    latest = out / "checkpoints" / "latest"

    def newest() -> int:
        return int(os.readlink(latest)[5:]) if latest.is_symlink() else 0

    rng = random.Random(0)
    for _ in range(3):
        before = newest()
        args = [sys.executable, "-m", "mlx_clip.train", "--out", str(out), *common]
        proc = subprocess.Popen(args + (["--resume"] if before else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 60  # training has moved on past the last checkpoint...
        while time.time() < deadline and newest() <= before and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # ...then a kill at a random moment, often mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from mlx_clip.training.checkpoint import find_resumable

    assert int(find_resumable(out / "checkpoints").name[5:]) < 60  # the kills did interrupt it
    train_main(["--out", str(out), "--resume", *common])
    a = load_file(str(full / "checkpoints" / "step_60" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step_60" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "error", [RuntimeError("[metal::malloc] Attempting to allocate 9 GB"), MemoryError()]
)
def test_out_of_memory_suggests_what_to_change(tmp_path, monkeypatch, error):
    import dataclasses

    import mlx_clip.training.loop as trainer

    real = trainer.build_training

    def failing_build_training(*args, **kwargs):
        def step(images, tokens):
            raise error

        return dataclasses.replace(real(*args, **kwargs), step=step)

    monkeypatch.setattr(trainer, "build_training", failing_build_training)
    with pytest.raises(SystemExit, match="out of memory.*smaller data.batch_size.*gradient checkpointing"):
        train_run(tmp_path, "oom", "--steps", "2", "--eval.every", "0")
