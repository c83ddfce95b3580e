"""Find a model on disk, framework-free: a run directory, its checkpoints/ root, a step_N
checkpoint, a converted directory or a weights file."""

from __future__ import annotations

import os
from pathlib import Path


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


def resolve_init(init_from: str | None) -> tuple[Path | None, Path | None]:
    """model.init_from (a .safetensors file, a checkpoint dir or a run dir) -> (weights, tokenizer dir)."""
    if not init_from:
        return None, None
    path = Path(init_from)
    if path.is_file():
        weights, folder = path, path.parent
    else:
        folder = resolve_checkpoint(path)
        weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"model.init_from: no weights at {weights}")
    tokenizer = folder if (folder / "tokenizer_config.json").is_file() else None
    return weights, tokenizer
