"""Find a model on disk, framework-free: a run directory, its checkpoints/ root, a step_N
checkpoint, a converted directory or a weights file; and check it against its checksums.

A checkpoint's state.json lists a sha256 per file under "files" (training writes it with each
step_N; convert and export write one with only "files"). `verify_files` is the one place those
checksums are checked: by --resume, mlx_clip.load, eval, export and model.init_from.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..interop.layouts import WeightError

MANIFEST = "state.json"
# Read only by --resume: loading a model for inference, export or fine-tuning skips its checksum.
TRAINING_ONLY_FILES = ("optimizer.safetensors",)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{name: sha256} of the files directly in `directory` (sorted), but those named in `skip`:
    the "files" of a state.json."""
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def read_manifest(ckpt: Path) -> dict | None:
    """ckpt/state.json as a dict, or None when there is none; ValueError naming it if unreadable."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise WeightError(f"{path}: not a checkpoint manifest (expected an object with 'files')")
    return manifest


def verify_files(ckpt: Path, resume: bool = False, hint: str = "") -> dict | None:
    """Check every file ckpt/state.json lists against its sha256; returns the manifest (None
    without one). A file that differs is a WeightError naming it, with `hint` (how to skip the
    check) appended. For `resume` every listed file must be present; otherwise a missing one is
    left to the reader, and the optimizer state (not needed) is not hashed."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return None
    for name, digest in manifest.get("files", {}).items():
        path = ckpt / name
        if not resume and (name in TRAINING_ONLY_FILES or not path.is_file()):
            continue
        if not path.is_file() or file_sha256(path) != digest:
            raise WeightError(
                f"{path}: checksum mismatch or missing (it does not match {ckpt / MANIFEST}); "
                f"the checkpoint is damaged or mixes files of two models{hint}"
            )
    return manifest


def model_sha256(ckpt: Path, verified: bool) -> str:
    """sha256 of ckpt/model.safetensors: the one its state.json lists when verify_files has just
    checked the file against it (`verified`), so a large checkpoint is not read twice; else hashed."""
    manifest = read_manifest(ckpt) if verified else None
    digest = (manifest or {}).get("files", {}).get("model.safetensors")
    return digest or file_sha256(ckpt / "model.safetensors")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_N directory, a checkpoints/ root, or a run directory -> the newest checkpoint dir."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        link = root / "latest"
        if link.is_symlink():
            return (root / os.readlink(link)).resolve()
        if link.is_file():
            return root / link.read_text().strip()
    if (path / "model.safetensors").is_file():
        return path
    raise FileNotFoundError(
        f"no checkpoint found at {path} (expected step_N/, checkpoints/latest or a run dir)"
    )


EMA_WEIGHTS = "ema.safetensors"  # a run with train.ema_decay: the EMA weights beside model.safetensors


def checkpoint_weights(ckpt: Path, ema: bool = False) -> Path:
    """A checkpoint directory's weights file: model.safetensors, or with `ema` the EMA's."""
    if not ema:
        return ckpt / "model.safetensors"
    if not (ckpt / EMA_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{ckpt / EMA_WEIGHTS}: missing; only runs trained with train.ema_decay > 0 save an EMA"
        )
    return ckpt / EMA_WEIGHTS


def safetensors_header(path: str | Path) -> dict:
    """A safetensors file's JSON header: {key: {"dtype", ...}, "__metadata__": {...}}."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > Path(path).stat().st_size:
                raise ValueError(f"header of {size} bytes is longer than the file")
            return json.loads(f.read(size))
    except (struct.error, ValueError, TypeError, MemoryError, OverflowError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def saved_config(path: str | Path) -> dict | None:
    """The ModelConfig fields save_weights recorded in a weights file's header; None without them."""
    text = (safetensors_header(path).get("__metadata__") or {}).get("config")
    return json.loads(text) if text else None


def checkpoint_model_config(path: str | Path, where: str = "model.init_from") -> dict:
    """The ModelConfig fields saved with a checkpoint (a weights file, a checkpoint or a run
    directory, a converted directory), from its weights file's header: nothing else is read."""
    path = Path(path)
    weights = path if path.is_file() else resolve_checkpoint(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{where}: no weights at {weights}")
    config = saved_config(weights)
    if config is None:
        raise WeightError(
            f"{where}: {weights} records no architecture in its header (not written by mlx_clip); "
            "name the architecture with model.arch instead"
        )
    return config


def resolve_init(init_from: str | None) -> tuple[Path | None, Path | None]:
    """model.init_from (a .safetensors file, a checkpoint dir or a run dir) -> (weights, tokenizer dir).

    A directory is checked against its checksums (state.json); naming its model.safetensors file
    instead skips that check."""
    if not init_from:
        return None, None
    path = Path(init_from)
    if path.is_file():
        weights, folder = path, path.parent
    else:
        folder = resolve_checkpoint(path)
        weights = folder / "model.safetensors"
        skip = f"; to use it anyway, set model.init_from to the file {weights}"
        verify_files(folder, hint=skip)
    if not weights.is_file():
        raise FileNotFoundError(f"model.init_from: no weights at {weights}")
    if "lora_base" in (safetensors_header(weights).get("__metadata__") or {}):  # models/adapters.py
        raise WeightError(
            f"model.init_from {weights} is a LoRA checkpoint (adapters only): merge it into its base "
            "first (python -m mlx_clip.export --merge --to mlx_clip --checkpoint RUN --out DIR) "
            "and start from DIR"
        )
    tokenizer = folder if (folder / "tokenizer_config.json").is_file() else None
    return weights, tokenizer
