"""Weights on disk: canonical safetensors (keys = attribute paths, MLX layouts), strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..interop.layouts import WeightError, check_state, resize_positional_embedding
from ..schema import to_dict
from .locate import safetensors_header

FORMAT = "mlx_clip"
# Safetensors dtypes that model weights may have: every float that MLX reads as itself. Anything
# else (BOOL, I64, U8, F8_E4M3 (which MLX reads as raw uint8 bytes), ...) is refused by name, not
# cast to float32: an integer or 8-bit float tensor where a weight belongs is a broken or quantized
# file, and casting it would silently give a different model.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
NOT_CAST = "weights are not cast from other dtypes: convert the file to float32 or float16 first"


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's parameters as canonical safetensors (keys = attribute paths)."""
    weights = dict(tree_flatten(model.parameters()))
    metadata = {"format": FORMAT}
    if hasattr(model, "config"):
        metadata["config"] = json.dumps(to_dict(model.config))
    mx.eval(weights)
    write_safetensors(path, weights, metadata)


def write_safetensors(path: str | Path, arrays: dict[str, mx.array], metadata: dict) -> None:
    """mx.save_safetensors, whose write failures become an OSError naming the file: MLX raises a
    RuntimeError ("[write] Unable to write N bytes to file.") on a full disk, not an OSError."""
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MB free on that disk"
        except OSError:
            free = ""
        raise OSError(f"{path}: could not write ({e}{free})") from e


def safetensors_dtypes(path: str | Path) -> dict[str, str]:
    """{key: dtype as the file's header names it (F32, BF16, I64, F8_E4M3...)}."""
    header = safetensors_header(path)
    try:
        return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def check_float_dtypes(path: str | Path) -> None:
    """Refuse a weights file with a tensor that is not floating point, naming it."""
    for key, dtype in safetensors_dtypes(path).items():
        if dtype not in FLOAT_DTYPES:
            raise WeightError(
                f"{path}: tensor '{key}' has dtype {dtype}, not {', '.join(FLOAT_DTYPES)}; {NOT_CAST}"
            )


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises a bare RuntimeError/ValueError on a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _load_into(model: nn.Module, weights: dict[str, mx.array], source: str) -> nn.Module:
    """Strict: same keys and shapes as the model (errors name the key); dtypes follow the model."""
    params = dict(tree_flatten(model.parameters()))
    check_state({k: v.shape for k, v in params.items()}, weights, source)
    weights = {k: v.astype(params[k].dtype) if v.dtype != params[k].dtype else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def read_weights(path: str | Path) -> dict[str, mx.array]:
    """A model weights file: read_safetensors, refusing any tensor that is not floating point
    (checked in the header first: MLX cannot read every dtype a file may declare)."""
    if Path(path).is_file():
        check_float_dtypes(path)
    return read_safetensors(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load canonical safetensors into `model`; a missing, extra or mis-shaped key, or a tensor that
    is not floating point, is an error."""
    return _load_into(model, read_weights(path), str(path))


def load_init_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Strict load for fine-tuning, except that a position grid of another image size is resampled
    (bicubic) to the model's, so a 224 px model can be fine-tuned at 160 or 336 px."""
    weights = read_weights(path)
    key = "visual.positional_embedding"
    want = model.visual.positional_embedding.shape
    if key in weights and weights[key].shape != want and weights[key].shape[1:] == want[1:]:
        class_token = model.config.vision_pool == "cls"
        grid = int(round((want[0] - class_token) ** 0.5))
        pe = np.array(weights[key].astype(mx.float32))
        resized = resize_positional_embedding(pe, grid, class_token=class_token)
        print(f"{path}: resampling {key} {tuple(weights[key].shape)} -> {tuple(resized.shape)}")
        weights[key] = mx.array(resized).astype(weights[key].dtype)
    # SigLIP's bias is part of the objective, not of the towers: a CLIP checkpoint fine-tuned with
    # loss.type siglip starts from the configured bias; a SigLIP one fine-tuned with another loss drops it.
    has_bias = "logit_bias" in model.parameters()
    if has_bias and "logit_bias" not in weights:
        weights["logit_bias"] = model.logit_bias
        print(f"{path}: no logit_bias; starting it at {model.logit_bias.item():g} (model.init_logit_bias)")
    elif not has_bias and "logit_bias" in weights:
        del weights["logit_bias"]
        print(f"{path}: logit_bias not used by this objective (loss.type is not siglip); dropped")
    return _load_into(model, weights, str(path))
