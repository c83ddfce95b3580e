"""Real write failures and integrity (issue 13, findings 5 and 6): a full disk during a checkpoint,
metrics.jsonl or summary.json; checksums checked by load, eval, export and model.init_from; atomic
convert/export --force with clean-up after kills; non-float tensors refused by name.

A full disk is a real small tmpfs where the tests run as root and `mount` works, and is simulated
with MLX's own error text everywhere else.
"""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ODD_ARCH, SMALL, save_step, train_run, trained
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip import eval as eval_cli
from mlx_clip import export
from mlx_clip.interop.files import (
    STAGING_MARKER,
    clean_stale,
    contiguous,
    read_state_dict,
    staged_output,
    write_checkpoint,
)
from mlx_clip.interop.layouts import WeightError, canonical_to_hf, hf_to_canonical
from mlx_clip.models.locate import resolve_init, verify_files
from mlx_clip.models.weights import load_weights
from mlx_clip.training.checkpoint import CheckpointWriteError, verify_checkpoint
from mlx_clip.training.logging import Logger, read_history, write_curves

REPO = Path(__file__).resolve().parents[1]
# What MLX raises when a write hits a full disk (mx.save_safetensors on a full tmpfs).
MLX_FULL_DISK = "[write] Unable to write 1351517 bytes to file."


def flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def dir_size(path):
    """Bytes a tmpfs needs for the files under `path` (whole 4 KB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in Path(path).rglob("*") if p.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes under tmp_path; unmounted after the test."""
    mounted = []

    def mount(size):
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a real full disk needs root to mount a tmpfs")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        size = -(-size // 4096) * 4096
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


# ---------------------------------------------------------------------------
# Finding 5: a full disk during a checkpoint gives the promised message


def test_mlx_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained(1)
    root = tmp_path / "checkpoints"
    save_step(root, 2, model, opt)
    real_save = mx.save_safetensors

    def full_disk(path, *args, **kwargs):
        if "optimizer" in str(path):
            raise RuntimeError(MLX_FULL_DISK)  # not an OSError: what MLX really raises
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"step_4.*optimizer.safetensors.*Unable to write.*step_2 is intact"
    ):
        save_step(root, 4, model, opt)
    assert not (root / "step_4").exists() and not list(root.glob(".tmp-*"))
    assert (root / "latest").resolve().name == "step_2" and verify_checkpoint(root / "step_2")["step"] == 2


def test_real_full_disk_keeps_the_previous_checkpoint(tmp_path, tmpfs):
    model, opt = trained(1)
    size = dir_size(save_step(tmp_path / "probe", 1, model, opt))
    root = tmpfs(int(size * 1.6)) / "checkpoints"  # room for one checkpoint, not two
    save_step(root, 2, model, opt)
    with pytest.raises(
        CheckpointWriteError, match=r"could not write checkpoint .*step_4: .*step_2 is intact"
    ):
        save_step(root, 4, model, opt)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]
    assert verify_checkpoint(root / "step_2")["step"] == 2


def test_cli_full_disk_is_one_line(tmp_path, tmpfs):
    """The issue's reproduction: train on a disk that holds one checkpoint; the final save fails."""
    probe, _ = train_run(tmp_path, "probe", "--steps", "2", "--eval.every", "0")
    run_files = dir_size(probe) - dir_size(probe / "checkpoints")
    ckpt = dir_size(probe / "checkpoints" / "step_2")
    out = tmpfs(run_files + int(ckpt * 1.6)) / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_run(out.parent, "run", "--steps", "4", "--eval.every", "0", "--train.save_every", "2")
    message = str(exit_info.value.code)
    assert message.startswith("error: could not write checkpoint") and "\n" not in message
    assert "step_4" in message and "step_2 is intact" in message
    assert verify_checkpoint(out / "checkpoints" / "step_2")["step"] == 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert read_history(out, log=pytest.fail)  # whole lines only


def test_cli_full_disk_simulated_is_one_line(tmp_path, monkeypatch):
    real_save = mx.save_safetensors

    def save(path, *args, **kwargs):
        if "step_4" in str(path):
            raise RuntimeError(MLX_FULL_DISK)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)
    with pytest.raises(SystemExit) as exit_info:
        train_run(tmp_path, "run", "--steps", "4", "--eval.every", "0", "--train.save_every", "2")
    message = str(exit_info.value.code)
    assert message.startswith("error: could not write checkpoint") and "\n" not in message
    assert "step_2 is intact" in message


def test_summary_write_failure_names_the_saved_checkpoint(tmp_path, monkeypatch):
    real_write = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(SystemExit) as exit_info:
        train_run(tmp_path, "run", "--steps", "2", "--eval.every", "0")
    message = str(exit_info.value.code)
    assert "summary.json" in message and "No space left" in message and "step_2 is saved" in message
    assert not (tmp_path / "run" / "summary.json").exists()


# ---------------------------------------------------------------------------
# Finding 5: metrics.jsonl lines are whole


def test_failed_metrics_write_is_undone_and_reported(tmp_path, monkeypatch, capsys):
    logger = Logger(tmp_path, total_steps=10, progress=False)
    logger.log({"event": "train", "step": 1, "loss": 1.0})
    real_write = os.write

    def half_then_full(fd, data):  # what a filling disk does: part of the bytes, then ENOSPC
        if fd == logger.fd:
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    logger.log({"event": "train", "step": 2, "loss": 0.5})
    logger.log({"event": "train", "step": 3, "loss": 0.4})
    monkeypatch.setattr(os, "write", real_write)
    logger.log({"event": "train", "step": 4, "loss": 0.3})
    logger.close()
    printed = capsys.readouterr().out
    assert printed.count("could not append") == 1 and "2 records were dropped" in printed
    assert [r["step"] for r in read_history(tmp_path, log=pytest.fail)] == [1, 4]


def test_real_full_disk_metrics_line_is_whole(tmpfs, capsys):
    """Two 4 KB pages: metrics.jsonl 20 bytes short of filling the first, a file taking the second.
    The next record is written in part by the kernel (a short write), then cut back off."""
    out = tmpfs(8192)
    logger = Logger(out, total_steps=10, progress=False)
    first = {"event": "train", "step": 1, "note": ""}
    first["note"] = "x" * (4096 - 20 - len(json.dumps(first) + "\n"))
    logger.log(first)
    assert (out / "metrics.jsonl").stat().st_size == 4096 - 20
    (out / "filler").write_bytes(b"x" * 4096)
    logger.log({"event": "train", "step": 2, "loss": 0.123456789, "lr": 0.001})  # does not fit
    assert (out / "metrics.jsonl").stat().st_size == 4096 - 20
    (out / "filler").unlink()
    logger.log({"event": "train", "step": 3, "loss": 0.25})
    logger.close()
    assert [r["step"] for r in read_history(out, log=pytest.fail)] == [1, 3]
    printed = capsys.readouterr().out
    assert "could not append" in printed and "1 records were dropped" in printed


def test_torn_last_line_is_skipped_and_garbage_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "train", "st')
    warned = []
    assert read_history(tmp_path, log=warned.append) == [{"event": "train", "step": 1}]
    assert "line 2 is incomplete" in warned[0]
    path.write_text('{"event": "train", "step": 1}\n{"event": "tr\n{"event": "train", "step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_history(tmp_path)
    warned.clear()
    write_curves(tmp_path, log=warned.append)  # at the end of a run: a warning, not a crash
    assert len(warned) == 1 and "curves.png not written" in warned[0] and "line 2" in warned[0]
    assert not (tmp_path / "curves.png").exists()


def test_next_run_after_a_torn_line_works(tmp_path):
    """The issue's reproduction: a half line at the end of metrics.jsonl, then --resume."""
    out, _ = train_run(tmp_path, "run", "--steps", "2", "--eval.every", "0")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 3, "lo')
    (out / "curves.png").unlink()
    summary = mlx_clip_train(out, "--steps", "4", "--eval.every", "0", "--resume")
    assert summary["step"] == 4 and (out / "curves.png").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # the torn line was cut off
    assert [r["step"] for r in read_history(out, log=pytest.fail) if r["event"] == "train"] == [2, 4]


def mlx_clip_train(out, *extra):
    from mlx_clip.train import main as train_main

    return train_main(["--out", str(out), *SMALL, *extra])


# ---------------------------------------------------------------------------
# Finding 6: checksums in load, eval, export and init_from


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "run"
    mlx_clip_train(out, "--steps", "2", "--eval.every", "0")
    return out


@pytest.fixture
def damaged(run_dir, tmp_path):
    """A copy of the run's checkpoint with one byte of model.safetensors flipped."""
    ckpt = shutil.copytree(run_dir / "checkpoints" / "step_2", tmp_path / "damaged")
    flip_byte(ckpt / "model.safetensors")
    return ckpt


def test_load_refuses_a_damaged_model(damaged):
    with pytest.raises(WeightError, match=r"damaged/model.safetensors: checksum mismatch.*verify=False"):
        mlx_clip.load(damaged)
    model, _, _ = mlx_clip.load(damaged, verify=False)  # the opt-out
    assert model.config.embed_dim == 32


def test_eval_and_export_refuse_a_damaged_model(damaged, tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*model.safetensors: checksum mismatch.*--no-verify"):
        eval_cli.main(["--checkpoint", str(damaged)])
    args = ["--checkpoint", str(damaged), "--to", "torch_ref", "--out", str(tmp_path / "tr")]
    with pytest.raises(SystemExit, match=r"error: .*model.safetensors: checksum mismatch"):
        export.main(args)
    assert not (tmp_path / "tr").exists()
    export.main([*args, "--no-verify"])
    assert (tmp_path / "tr" / "model.safetensors").is_file()
    metrics = eval_cli.main(["--checkpoint", str(damaged), "--no-verify", "--out", str(tmp_path / "e.json")])
    assert "zeroshot_top1" in metrics


def test_init_from_refuses_a_damaged_model(damaged, tmp_path):
    with pytest.raises(
        WeightError, match=r"model.safetensors: checksum mismatch.*model.init_from to the file"
    ):
        resolve_init(str(damaged))
    assert resolve_init(str(damaged / "model.safetensors"))[0] == damaged / "model.safetensors"
    with pytest.raises(SystemExit, match=r"^error: .*checksum mismatch"):
        train_run(tmp_path, "ft", "--steps", "1", "--model.init_from", str(damaged))


def test_load_refuses_a_mixed_directory(tmp_path):
    """A converted directory (write_checkpoint) has a manifest: another model's file is caught."""
    cfg = mlx_clip.ModelConfig.from_dict(ODD_ARCH)
    for name, seed in (("a", 1), ("b", 2)):
        state = {k: np.array(v) for k, v in tree_flatten(trained(seed)[0].parameters())}
        write_checkpoint(tmp_path / name, cfg, state, None, "test")
    assert set(verify_files(tmp_path / "a")["files"]) == {"model.safetensors", "config.yaml"}
    shutil.copyfile(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(WeightError, match=r"a/model.safetensors: checksum mismatch .*mixes files"):
        mlx_clip.load(tmp_path / "a")


# ---------------------------------------------------------------------------
# Finding 6: convert / export --force replace atomically, and clean up after kills

KILL_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from mlx_clip.interop import files

out, kill_at = Path(sys.argv[1]), sys.argv[2]
real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

def rename(a, b):  # kill_at "rename1": before moving the old OUT aside; "rename2": before the new in
    renames.append(a)
    if kill_at == f"rename{len(renames)}":
        os._exit(9)
    real_rename(a, b)

def rmtree(path, *args, **kwargs):  # "rmtree": with the new output in, before the old is removed
    if kill_at == "rmtree" and ".old-" in str(path):
        os._exit(9)
    real_rmtree(path, *args, **kwargs)

os.rename, shutil.rmtree = rename, rmtree
with files.staged_output(out, force=True) as tmp:
    (tmp / "model.safetensors").write_text("new weights")
    if kill_at == "fill":
        os._exit(9)
    (tmp / "config.yaml").write_text("new config")
"""


def contents(directory):
    skip = ("state.json", STAGING_MARKER)
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.name not in skip}


def siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


OLD = {"model.safetensors": "old weights", "tokenizer.json": "old tokenizer"}
NEW = {"model.safetensors": "new weights", "config.yaml": "new config"}


@pytest.mark.parametrize("kill_at", ["fill", "rename1", "rename2", "rmtree"])
def test_force_killed_at_any_point_leaves_old_or_new_whole(tmp_path, kill_at):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        for name, text in OLD.items():
            (tmp / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), kill_at], env=env, timeout=120)
    assert done.returncode == 9
    assert siblings(out)  # the killed run left something behind
    if kill_at == "rename2":  # between the moves: OUT is absent, the old one whole beside it
        assert not out.exists()
    else:
        assert contents(out) in (OLD, NEW) and verify_files(out) is not None
    logged = []
    clean_stale(out, log=logged.append)  # what the next convert/export does first
    assert contents(out) == (NEW if kill_at == "rmtree" else OLD) and siblings(out) == []
    assert logged and all("interrupted" in line for line in logged)
    verify_files(out)
    with staged_output(out, force=True, log=logged.append) as tmp:
        for name, text in NEW.items():
            (tmp / name).write_text(text)
    assert contents(out) == NEW and siblings(out) == []  # the old tokenizer.json did not stay


def test_export_to_a_full_disk_is_one_line(run_dir, tmpfs):
    """safetensors' save_file raises its own SafetensorError on a full disk: still one line, and the
    partial output is gone."""
    disk = tmpfs(64 * 1024)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(run_dir), "--to", "hf", "--out", str(disk / "hf")])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: could not write {disk / 'hf'}") and "No space left" in message
    assert "\n" not in message
    assert list(disk.iterdir()) == []


def test_staging_of_a_live_process_and_foreign_folders_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    (live / STAGING_MARKER).write_text(str(os.getpid()))
    unmarked = tmp_path / ".out.tmp-999999999-0123abcd"  # a dead PID, but not our marker
    unmarked.mkdir()
    clean_stale(out, log=pytest.fail)
    assert live.is_dir() and unmarked.is_dir()

    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "model.safetensors").write_text("x")
    with pytest.raises(FileExistsError, match=r"does not look like an earlier .*Documents"):
        with staged_output(home, force=True):
            pass
    assert (home / "Documents").is_dir() and not list(tmp_path.glob(".home.*"))


# ---------------------------------------------------------------------------
# Finding 6: non-float tensors are refused by name, not cast


def retype(path, key, dtype):
    """Rewrite the safetensors header so `key` declares `dtype` (same element size), data unchanged."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


@pytest.mark.parametrize("dtype", ["bool", "int32", "F8_E4M3"])
def test_non_float_weights_are_refused_by_name(tmp_path, dtype):
    model, _ = trained(1)
    weights = dict(tree_flatten(model.parameters()))
    key = "visual.ln_post.weight"
    shape = weights[key].shape
    bad = {
        "bool": mx.ones(shape, mx.bool_),
        "int32": mx.ones(shape, mx.int32),
        "F8_E4M3": mx.ones(shape, mx.uint8),
    }
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), dict(weights, **{key: bad[dtype]}))
    if dtype == "F8_E4M3":
        retype(path, key, "F8_E4M3")  # MLX would read it as raw uint8 bytes
    name = {"bool": "BOOL", "int32": "I32", "F8_E4M3": "F8_E4M3"}[dtype]
    with pytest.raises(
        WeightError, match=rf"model.safetensors: tensor '{key}' has dtype {name}, not F32, F16, BF16"
    ):
        load_weights(model, path)
    torch_ref = pytest.importorskip("torch_ref")  # the PyTorch mirror refuses it too
    with pytest.raises(WeightError, match=rf"model.safetensors: tensor '{key}' has dtype torch\."):
        torch_ref.load_weights(torch_ref.create_model(model.config, device="cpu"), path)


def test_foreign_files_keep_integer_buffers_and_refuse_integer_weights(tmp_path):
    from safetensors.numpy import save_file

    cfg = mlx_clip.ModelConfig.from_dict(ODD_ARCH)
    canonical = {k: np.array(v) for k, v in tree_flatten(trained(1)[0].parameters())}
    hf = contiguous(canonical_to_hf(canonical, cfg))
    ids = np.arange(cfg.context_length, dtype=np.int64)[None]
    save_file(dict(hf, **{"text_model.embeddings.position_ids": ids}), str(tmp_path / "hf.safetensors"))
    state = read_state_dict(tmp_path / "hf.safetensors")
    assert state["text_model.embeddings.position_ids"].dtype == np.int64  # a buffer, dropped next
    write_checkpoint(
        tmp_path / "ok", cfg, hf_to_canonical(state, cfg, np.concatenate), None, "hf.safetensors"
    )

    key = "text_model.final_layer_norm.weight"
    save_file(dict(hf, **{key: hf[key].astype(np.int32)}), str(tmp_path / "int.safetensors"))
    state = hf_to_canonical(read_state_dict(tmp_path / "int.safetensors"), cfg, np.concatenate)
    with pytest.raises(WeightError, match=r"int.safetensors: weight 'text.ln_final.weight' has dtype int32"):
        write_checkpoint(tmp_path / "bad", cfg, state, None, str(tmp_path / "int.safetensors"))
    assert not (tmp_path / "bad").exists()

    save_file(dict(hf, **{key: hf[key].astype(np.uint8)}), str(tmp_path / "f8.safetensors"))
    retype(tmp_path / "f8.safetensors", key, "F8_E5M2")
    with pytest.raises(WeightError, match=rf"f8.safetensors: tensor '{key}' has dtype F8_E5M2"):
        read_state_dict(tmp_path / "f8.safetensors")


def test_torch_float8_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    torch.save({"w": torch.ones(3).to(torch.float8_e4m3fn)}, tmp_path / "w.pt")
    with pytest.raises(WeightError, match=r"w.pt: tensor 'w' has dtype torch.float8_e4m3fn"):
        read_state_dict(tmp_path / "w.pt")
