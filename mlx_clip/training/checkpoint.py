"""Run checkpoints: OUT/checkpoints/step_N/ written atomically with checksums, found again for
--resume and model.init_from, and pruned."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..interop.layouts import WeightError, check_state
from ..models.weights import FORMAT, load_weights, read_safetensors, save_weights
from .state import RunState

# ---------------------------------------------------------------------------
# Run checkpoints: OUT/checkpoints/step_N/{model,optimizer}.safetensors, state.json,
# tokenizer files and config.yaml; `latest` points at the newest complete one.

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "config.yaml")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names it and the checkpoint kept."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: str | Path,
    model: nn.Module,
    optimizer,
    tokenizer,
    config_yaml: str,
    state: RunState,
) -> Path:
    """Write step_N (N = state.step) atomically: a temporary directory, fsynced, then renamed into
    place. state.json holds the run state and a sha256 per file."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{state.step}-", dir=ckpt_root))
    try:
        save_weights(model, tmp / "model.safetensors")
        opt_state = dict(tree_flatten(optimizer.state))
        mx.eval(opt_state)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state, metadata={"format": FORMAT})
        tokenizer.save(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "state.json").write_text(json.dumps({**state.to_json(), "files": files}, indent=1))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except OSError as e:
        # Full disk, lost permissions...: the temp dir goes, `latest` and older checkpoints stay.
        shutil.rmtree(tmp, ignore_errors=True)
        previous = os.readlink(ckpt_root / "latest") if (ckpt_root / "latest").is_symlink() else None
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise CheckpointWriteError(f"could not write checkpoint {final}: {e}{kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(ckpt_root, final.name)
    return final


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
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_path}: unreadable ({e})") from None
    for name, digest in state.get("files", {}).items():
        if not (ckpt / name).is_file() or _sha256(ckpt / name) != digest:
            raise ValueError(f"{ckpt / name}: checksum mismatch or missing; the checkpoint is damaged")
    return state


def checkpoint_steps(ckpt_root: str | Path) -> list[Path]:
    """The step_N directories under ckpt_root, oldest first."""
    steps = (p for p in Path(ckpt_root).glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    return sorted(steps, key=lambda p: int(p.name[5:]))


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
    load_weights(model, ckpt / "model.safetensors")
    if optimizer is not None:
        opt = read_safetensors(ckpt / "optimizer.safetensors")
        optimizer.init(model.trainable_parameters())
        expected = dict(tree_flatten(optimizer.state))
        check_state({k: v.shape for k, v in expected.items()}, opt, str(ckpt / "optimizer.safetensors"))
        optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(optimizer.state)
    return RunState.from_json(state)


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
