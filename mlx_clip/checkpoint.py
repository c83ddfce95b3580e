"""Weights on disk: canonical safetensors, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import to_dict
from .convert import check_state

FORMAT = "mlx_clip"


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's parameters as canonical safetensors (keys = attribute paths)."""
    weights = dict(tree_flatten(model.parameters()))
    metadata = {"format": FORMAT}
    if hasattr(model, "config"):
        metadata["config"] = json.dumps(to_dict(model.config))
    mx.eval(weights)
    mx.save_safetensors(str(path), weights, metadata=metadata)


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises a bare RuntimeError/ValueError on a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load canonical safetensors into `model`; a missing, extra or mis-shaped key is an error."""
    weights = read_safetensors(path)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_state(expected, weights, str(path))
    params = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(params[k].dtype) if v.dtype != params[k].dtype else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model
