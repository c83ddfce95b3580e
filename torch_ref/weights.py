"""PyTorch mirror of mlx_clip/models/weights.py: the same canonical safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mlx_clip.interop.layouts import WeightError, canonical_to_torch, check_state, torch_to_canonical
from mlx_clip.schema import to_dict

FORMAT = "mlx_clip"


def save_weights(model: nn.Module, path: str | Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT}
    if hasattr(model, "config"):
        metadata["config"] = json.dumps(to_dict(model.config))
    save_file(torch_to_canonical(state), str(path), metadata=metadata)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Strict: a missing, extra or mis-shaped key is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    for key, value in state.items():  # as mlx_clip's load_weights: never cast ints, bools or float8
        if not value.is_floating_point() or value.element_size() == 1:
            raise WeightError(
                f"{path}: tensor '{key}' has dtype {value.dtype}, not a float32/float16/bfloat16 weight; "
                "weights are not cast from other dtypes: convert the file to float32 or float16 first"
            )
    state = canonical_to_torch(state)
    own = model.state_dict()
    check_state({k: tuple(v.shape) for k, v in own.items()}, state, str(path))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model
