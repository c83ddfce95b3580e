"""Run checkpoints: OUT/checkpoints/step_N/ written atomically with checksums, found again for
--resume and model.init_from, and pruned."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..interop.files import fsync_dir, fsync_tree
from ..interop.layouts import WeightError, check_state
from ..models.adapters import load_into, save_model_file
from ..models.locate import EMA_WEIGHTS, file_checksums, verify_files
from ..models.weights import FORMAT, read_safetensors, write_safetensors
from .state import RunState

# ---------------------------------------------------------------------------
# Run checkpoints: OUT/checkpoints/step_N/{model,optimizer}.safetensors, state.json,
# tokenizer files and config.yaml; `latest` points at the newest complete one.

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "config.yaml")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names it and the checkpoint kept."""


def save_checkpoint(
    ckpt_root: str | Path,
    model: nn.Module,
    optimizer,
    tokenizer,
    config_yaml: str,
    state: RunState,
    ema=None,
) -> Path:
    """Write step_N (N = state.step) atomically: a temporary directory, fsynced, then renamed into
    place. state.json holds the run state and a sha256 per file. Any failure to write (a full disk:
    OSError from Python, RuntimeError "[write] ..." from MLX) is a CheckpointWriteError naming the
    checkpoint and the previous one, which stays intact, as does `latest`."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{state.step}"
    tmp = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{state.step}-", dir=ckpt_root))
        save_model_file(model, tmp / "model.safetensors")  # a LoRA run: adapters + base reference
        if ema is not None:  # the same kind of weights file, with the EMA of the trainable tensors
            with ema.swapped_in(model):
                save_model_file(model, tmp / EMA_WEIGHTS)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.eval(opt_state)
        write_safetensors(tmp / "optimizer.safetensors", opt_state, metadata={"format": FORMAT})
        tokenizer.save(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        files = file_checksums(tmp)
        (tmp / "state.json").write_text(json.dumps({**state.to_json(), "files": files}, indent=1))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except OSError as e:  # write_safetensors turns MLX's write RuntimeError into an OSError
        # Full disk, lost permissions...: the temp dir goes, `latest` and older checkpoints stay.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {final}: {e}{_kept(ckpt_root)}") from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _point_latest(ckpt_root, final.name)
    except OSError as e:
        raise CheckpointWriteError(
            f"checkpoint {final} is complete, but {ckpt_root / 'latest'} could not be updated to "
            f"name it ({e}); --resume still finds it"
        ) from e
    return final


def _kept(ckpt_root: Path) -> str:
    """What the failure message says survives: `latest`'s checkpoint, if there is one."""
    link = ckpt_root / "latest"
    if link.is_symlink():
        return f"; the previous checkpoint {os.readlink(link)} is intact"
    if link.is_file():
        return f"; the previous checkpoint {link.read_text().strip()} is intact"
    return "; there is no earlier checkpoint"


def _point_latest(ckpt_root: Path, name: str) -> None:
    """Atomically repoint `latest` (a symlink; a small text file where symlinks are unavailable)."""
    link = ckpt_root / "latest"
    tmp = ckpt_root / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(name, tmp)
    except OSError:
        tmp.write_text(name)
    os.replace(tmp, link)


def verify_checkpoint(ckpt: str | Path) -> dict:
    """state.json of a complete, undamaged checkpoint; ValueError/FileNotFoundError naming the file."""
    ckpt = Path(ckpt)
    state_path = ckpt / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: missing; {ckpt} is not a complete checkpoint")
    return verify_files(ckpt, resume=True)


def checkpoint_steps(ckpt_root: str | Path) -> list[Path]:
    """The step_N directories under ckpt_root, oldest first."""
    steps = (p for p in Path(ckpt_root).glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    return sorted(steps, key=lambda p: int(p.name[5:]))


def remove_stale_temps(ckpt_root: str | Path, log=print) -> None:
    """Delete the temporary step directories a killed run left (`.tmp-step_N-*`). Call it only
    while holding the run directory's lock (run_dir.py): then no live process is writing one."""
    stale = [p for p in Path(ckpt_root).glob(".tmp-step_*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log(f"removed {len(stale)} unfinished checkpoint(s) left by a killed run in {ckpt_root}")


def run_id_of(ckpt: Path) -> str | None:
    """The run id in ckpt's state.json ("" for checkpoints older than run ids); None if unreadable."""
    try:
        return json.loads((ckpt / "state.json").read_text()).get("run_id", "")
    except (OSError, ValueError, AttributeError):
        return None


def find_resumable(ckpt_root: str | Path, log=print) -> Path:
    """The newest intact step_N under ckpt_root, of the run `latest` points at when that can be
    read; damaged newer ones are reported and passed over."""
    ckpt_root = Path(ckpt_root)
    steps = checkpoint_steps(ckpt_root)[::-1]
    if not steps:
        raise FileNotFoundError(f"no checkpoint found at {ckpt_root} (nothing to resume)")
    owner = run_id_of(ckpt_root / "latest")
    if owner is not None:  # an older run's step_N left in the directory is not this run's past
        steps = [p for p in steps if run_id_of(p) in (owner, None)]
    for ckpt in steps:
        try:
            verify_checkpoint(ckpt)
        except (ValueError, FileNotFoundError) as e:
            log(f"warning: {e}; falling back to an earlier checkpoint")
            continue
        return ckpt
    raise WeightError(f"every checkpoint under {ckpt_root} is damaged; cannot resume")


def load_checkpoint(ckpt: str | Path, model: nn.Module, optimizer=None) -> RunState:
    """Restore model (and optimizer) from an intact step_N directory; returns its run state."""
    ckpt = Path(ckpt)
    state = verify_checkpoint(ckpt)
    load_into(model, ckpt / "model.safetensors")
    if optimizer is not None:
        opt = read_safetensors(ckpt / "optimizer.safetensors")
        optimizer.init(model.trainable_parameters())
        expected = dict(tree_flatten(optimizer.state))
        check_state({k: v.shape for k, v in expected.items()}, opt, str(ckpt / "optimizer.safetensors"))
        optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(optimizer.state)
    return RunState.from_json(state)


def load_ema(ckpt: str | Path, ema, log=print) -> None:
    """Restore a ModelEMA from an intact checkpoint's ema.safetensors; a checkpoint saved without
    one (train.ema_decay was 0) leaves the EMA at the restored weights, and says so."""
    path = Path(ckpt) / EMA_WEIGHTS
    if not path.is_file():
        log(f"note: {ckpt} holds no EMA (ema.safetensors); the EMA starts from its weights")
        return
    ema.load(read_safetensors(path), str(path))
    mx.eval(ema.state)


def prune_checkpoints(
    ckpt_root: str | Path, keep_last: int, keep: set[str] = frozenset(), run_id: str | None = None
) -> None:
    """Delete all step_N but the newest `keep_last` and the names in `keep` (the best one). With
    `run_id`, only that run's checkpoints count and are deleted, so another run's higher step
    numbers can never make this run's newest checkpoint look old."""
    steps = checkpoint_steps(ckpt_root)
    if run_id is not None:
        steps = [p for p in steps if run_id_of(p) == run_id]
    for p in steps[:-keep_last]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
