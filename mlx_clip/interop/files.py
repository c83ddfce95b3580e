"""File handling shared by the converters (interop_hf.py, interop_open_clip.py) and the CLIs.

* `read_state_dict(path)`: a foreign weights file (.safetensors, or a PyTorch .bin/.pt/.pth read
  with `torch.load(weights_only=True)` only) -> {key: numpy array}, floats as float32.
* `write_checkpoint(out, cfg, state, tokenizer)`: canonical weights -> an mlx_clip checkpoint
  directory (model.safetensors, config.yaml, tokenizer files), the layout that
  `--model.init_from`, `mlx_clip.eval` and the exporters read.
* `read_checkpoint(path)`: a checkpoint, step or run directory -> (dir, ModelConfig, weights, tokenizer).
* `staged_output(out, force)`: build an output directory next to its final place, then move it in.

Key names and layouts never change here: that is convert.py's job.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..config import Config, LossConfig, ModelSection, config_to_yaml, load_config
from ..models.config import ModelConfig, available_models, model_config
from ..models.locate import resolve_checkpoint
from ..models.model import CLIP
from ..models.weights import read_safetensors, save_weights
from ..schema import to_dict
from ..text.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from ..text.tokenizer import Tokenizer
from .layouts import WeightError, check_state

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------
# Reading foreign weight files


def _to_numpy(key: str, x, path: Path) -> np.ndarray:
    """One tensor (MLX or torch) -> numpy; floating point becomes float32 (the training dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    if isinstance(x, mx.array):
        if mx.issubdtype(x.dtype, mx.floating):
            x = x.astype(mx.float32)  # bf16/fp16 have no (or no exact) numpy twin
        return np.array(x)
    raise WeightError(f"{path}: entry '{key}' is a {type(x).__name__}, not a tensor")


def _torch_load(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would build any other
    object (and so could run code) is refused, never executed."""
    try:
        import torch  # noqa: PLC0415  (only .bin/.pt files need torch)
    except ImportError:
        raise WeightError(
            f"{path}: reading a PyTorch pickle needs torch (pip install torch), or convert it to safetensors"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightError(
            f"{path}: refused to load: torch.load(weights_only=True) only accepts tensors and plain "
            f"containers, and this pickle holds something else ({reason})"
        ) from None
    except Exception as e:  # truncated / not a torch file
        raise WeightError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WeightError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    return obj


def _unwrap(state: dict, path: Path) -> dict:
    # open_clip training checkpoints are {"epoch", "name", "state_dict", "optimizer", ...}: only the
    # state dict holds weights. DDP-wrapped models prefix every key with "module.".
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A .safetensors or PyTorch (.bin/.pt/.pth) weights file -> {key: numpy array}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state = _unwrap(_torch_load(path), path)
    else:
        raise WeightError(f"{path}: unsupported weights file (expected .safetensors, .bin, .pt or .pth)")
    return {k: _to_numpy(k, v, path) for k, v in state.items()}


def contiguous(state: dict) -> dict[str, np.ndarray]:
    """Row-major copies where needed, for safetensors (np.ascontiguousarray would turn 0-d into 1-d)."""
    return {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in state.items()}


def read_sharded(index_path: Path) -> dict[str, np.ndarray]:
    """A Hugging Face *.index.json: every shard it names, merged."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightError(f"{index_path}: not a weights index ({e})") from None
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index_path.parent / shard))
    return state


# ---------------------------------------------------------------------------
# mlx_clip checkpoint directories


def checkpoint_config_yaml(cfg) -> str:
    """A full run config for a converted model: its fields written out, named after the matching
    built-in architecture when there is one. A model with SigLIP's logit_bias was trained with the
    sigmoid loss, and its config says so (loss.type siglip)."""
    arch = next((name for name in available_models() if model_config(name) == cfg), "custom")
    loss = LossConfig(type="siglip" if cfg.init_logit_bias is not None else "clip")
    return config_to_yaml(Config(model=ModelSection(arch=arch, **to_dict(cfg)), loss=loss))


def expected_shapes(cfg) -> dict[str, tuple]:
    # Parameters of an unevaluated model are lazy: their shapes cost no compute.
    return {k: tuple(v.shape) for k, v in tree_flatten(CLIP(cfg).parameters())}


def write_checkpoint(
    out: str | Path, cfg, state: dict, tokenizer: Tokenizer | None, source: str, force: bool = False
) -> Path:
    """Canonical weights (numpy) -> OUT/{model.safetensors, config.yaml, tokenizer files}."""
    check_state(expected_shapes(cfg), state, source)
    model = CLIP(cfg)
    model.load_weights([(k, mx.array(v, dtype=mx.float32)) for k, v in state.items()], strict=True)
    mx.eval(model.parameters())
    with staged_output(out, force) as tmp:
        save_weights(model, tmp / "model.safetensors")
        (tmp / "config.yaml").write_text(checkpoint_config_yaml(cfg))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


def read_checkpoint(path: str | Path):
    """A checkpoint / step / run directory -> (step dir, ModelConfig, {key: numpy}, Tokenizer | None)."""
    ckpt = resolve_checkpoint(path)
    weights = ckpt / "model.safetensors"
    if (ckpt / "config.yaml").is_file():
        cfg = load_config(ckpt / "config.yaml").model_config()
    else:  # save_weights also records the architecture in the file's metadata
        _, meta = mx.load(str(weights), return_metadata=True)
        if "config" not in meta:
            raise FileNotFoundError(f"{ckpt}: no config.yaml, and {weights.name} records no config")
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    state = read_safetensors(weights)
    check_state(expected_shapes(cfg), state, str(weights))
    state = {k: _to_numpy(k, v, weights) for k, v in state.items()}
    tokenizer = Tokenizer.load(ckpt) if (ckpt / TOKENIZER_CONFIG_FILE).is_file() else None
    return ckpt, cfg, state, tokenizer


@contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of OUT to fill; on success its files move into OUT.

    A new OUT appears whole (one rename). An existing OUT must be empty unless `force`; then
    same-named files are replaced and other files are left alone (nothing is deleted).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to write into it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        else:
            for p in tmp.iterdir():
                os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
