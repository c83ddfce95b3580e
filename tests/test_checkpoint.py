"""Weights and run checkpoints on disk, called directly (mlx_clip/models/weights.py,
mlx_clip/training/checkpoint.py): strict loading, atomic step_N directories with checksums, falling
back past a damaged one, pruning, and finding a checkpoint from a file, step, root or run directory.

The training CLI's use of them (resume, Ctrl-C, full disk, kills) is tested in tests/test_train.py.
"""

import errno
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import save_step, trained
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip.interop.layouts import WeightError
from mlx_clip.models.locate import resolve_checkpoint, resolve_init
from mlx_clip.training.checkpoint import (
    CHECKPOINT_FILES,
    CheckpointWriteError,
    find_resumable,
    load_checkpoint,
    prune_checkpoints,
    verify_checkpoint,
)
from mlx_clip.training.state import RunState


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def damage(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# Strict weights


@pytest.mark.parametrize("loader", ["mlx", "torch"])
def test_strict_loading_names_the_key(tmp_path, loader):
    m = mlx_clip.create_model("tiny")
    good = dict(tree_flatten(m.parameters()))
    if loader == "mlx":
        target, load = mlx_clip.create_model("tiny"), mlx_clip.load_weights
    else:
        pytest.importorskip("torch")
        import torch_ref

        target, load = torch_ref.create_model("tiny", device="cpu"), torch_ref.load_weights

    missing = dict(good)
    del missing["text.ln_final.bias"]
    mx.save_safetensors(str(tmp_path / "missing.safetensors"), missing)
    with pytest.raises(WeightError, match="missing key 'text.ln_final.bias'"):
        load(target, tmp_path / "missing.safetensors")

    extra = dict(good, **{"visual.extra.weight": mx.zeros((2,))})
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra)
    with pytest.raises(WeightError, match="unexpected key 'visual.extra.weight'"):
        load(target, tmp_path / "extra.safetensors")

    bad = dict(good, **{"visual.proj.weight": mx.zeros((3, 4))})
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), bad)
    with pytest.raises(WeightError, match=r"'visual.proj.weight' has shape \(3, 4\)"):
        load(target, tmp_path / "bad.safetensors")

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(target, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load(target, tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------
# Run checkpoints


def test_save_is_complete_checksummed_and_loads_back_exactly(tmp_path):
    model, opt = trained(seed=1)
    root = tmp_path / "checkpoints"
    ckpt = save_step(root, 3, model, opt)
    assert ckpt == root / "step_3" and (root / "latest").resolve() == ckpt.resolve()
    assert not list(root.glob(".tmp-*")) and not (root / ".latest.tmp").exists()
    state = verify_checkpoint(ckpt)
    assert state["step"] == 3 and state["epoch"] == 0 and state["seed"] == 0
    # Every file but state.json itself carries a checksum.
    assert set(state["files"]) == {*CHECKPOINT_FILES, "tokenizer_config.json"} - {"state.json"}
    assert json.loads((ckpt / "state.json").read_text()) == state

    other, other_opt = trained(seed=2)
    assert load_checkpoint(ckpt, other, other_opt) == RunState.from_json(state)
    for want, got in ((model.parameters(), other.parameters()), (opt.state, other_opt.state)):
        want, got = flat(want), flat(got)
        assert want.keys() == got.keys()
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_damaged_checkpoint_is_refused_and_passed_over(tmp_path):
    model, opt = trained(seed=1)
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        save_step(root, step, model, opt)
    damage(root / "step_4" / "model.safetensors")
    with pytest.raises(ValueError, match=r"step_4/model.safetensors: checksum mismatch"):
        verify_checkpoint(root / "step_4")
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(root / "step_4", model)
    logged = []
    assert find_resumable(root, log=logged.append) == root / "step_2"
    assert len(logged) == 1 and "step_4" in logged[0] and "falling back" in logged[0]

    (root / "step_2" / "state.json").unlink()  # an incomplete one
    with pytest.raises(WeightError, match="every checkpoint .* is damaged"):
        find_resumable(root, log=logged.append)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        find_resumable(tmp_path / "empty")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained(seed=1)
    root = tmp_path / "checkpoints"
    save_step(root, 2, model, opt)
    real_save = mx.save_safetensors

    def full_disk(path, *args, **kwargs):
        if "optimizer" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"step_4.*No space left.*step_2 is intact"):
        save_step(root, 4, model, opt)
    assert not (root / "step_4").exists() and not list(root.glob(".tmp-*"))
    assert (root / "latest").resolve().name == "step_2" and verify_checkpoint(root / "step_2")["step"] == 2


def test_prune_keeps_the_newest_and_the_named(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 10, 11, 12):
        (root / f"step_{step}").mkdir(parents=True)
    (root / "step_x").mkdir()  # not a step: left alone
    prune_checkpoints(root, keep_last=2, keep={"step_2"})
    assert sorted(p.name for p in root.iterdir()) == ["step_11", "step_12", "step_2", "step_x"]


def test_resolve_from_a_file_step_root_or_run_directory(tmp_path):
    model, opt = trained(seed=1)
    run = tmp_path / "run"
    ckpt = save_step(run / "checkpoints", 5, model, opt).resolve()
    for where in (run, run / "checkpoints"):
        assert resolve_checkpoint(where) == ckpt
    assert resolve_checkpoint(ckpt) == ckpt  # a step directory: its model.safetensors
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "nothing")

    assert resolve_init(None) == (None, None) and resolve_init("") == (None, None)
    assert resolve_init(str(run)) == (ckpt / "model.safetensors", ckpt)  # with its tokenizer
    weights = tmp_path / "bare" / "w.safetensors"
    weights.parent.mkdir()
    mlx_clip.save_weights(model, weights)
    assert resolve_init(str(weights)) == (weights, None)  # no tokenizer beside it
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.init_from: no weights"):
        resolve_init(str(run))
