"""File handling shared by the converters (interop_hf.py, interop_open_clip.py) and the CLIs.

* `read_state_dict(path)`: a foreign weights file (.safetensors, or a PyTorch .bin/.pt/.pth read
  with `torch.load(weights_only=True)` only) -> {key: numpy array}, floats as float32.
* `write_checkpoint(out, cfg, state, tokenizer)`: canonical weights -> an mlx_clip checkpoint
  directory (model.safetensors, config.yaml, tokenizer files), the layout that
  `--model.init_from`, `mlx_clip.eval` and the exporters read.
* `read_checkpoint(path)`: a checkpoint, step or run directory -> (dir, ModelConfig, weights, tokenizer).
* `staged_output(out, force)`: build an output directory next to its final place, with a checksum
  manifest (state.json), then move it in; `--force` replaces an old output as a whole.

Key names and layouts never change here: that is convert.py's job.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from safetensors import SafetensorError

from ..config import Config, LossConfig, ModelSection, config_to_yaml, load_config
from ..models.config import ModelConfig, available_models, model_config
from ..models.locate import MANIFEST, checkpoint_weights, file_checksums, resolve_checkpoint
from ..models.model import CLIP
from ..models.weights import (
    FLOAT_DTYPES,
    NOT_CAST,
    read_safetensors,
    read_weights,
    safetensors_dtypes,
    save_weights,
)
from ..procs import pid_alive
from ..schema import to_dict
from ..text.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from ..text.vocab import AnyTokenizer, load_saved
from .layouts import WeightError, check_state

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------
# Reading foreign weight files


# Integer and bool tensors are read as they are: a foreign file may carry integer buffers
# (position_ids), which the layouts drop; as a weight, write_checkpoint refuses them by name.
INTEGER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


def _to_numpy(key: str, x, path: Path) -> np.ndarray:
    """One tensor (MLX or torch) -> numpy; floating point becomes float32 (the training dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() == 1:  # float8: quantized, scales kept apart
            raise WeightError(f"{path}: tensor '{key}' has dtype {x.dtype}; {NOT_CAST}")
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
        # MLX reads 8-bit floats (F8_E4M3...) as raw uint8 bytes: refuse them by the file's own name.
        for key, dtype in safetensors_dtypes(path).items():
            if dtype not in FLOAT_DTYPES + INTEGER_DTYPES:
                raise WeightError(f"{path}: tensor '{key}' has dtype {dtype}; {NOT_CAST}")
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
    out: str | Path, cfg, state: dict, tokenizer: AnyTokenizer | None, source: str, force: bool = False
) -> Path:
    """Canonical weights (numpy) -> OUT/{model.safetensors, config.yaml, tokenizer files}."""
    check_state(expected_shapes(cfg), state, source)
    for key, value in state.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise WeightError(f"{source}: weight '{key}' has dtype {value.dtype}, not a float; {NOT_CAST}")
    model = CLIP(cfg)
    model.load_weights([(k, mx.array(v, dtype=mx.float32)) for k, v in state.items()], strict=True)
    mx.eval(model.parameters())
    with staged_output(out, force) as tmp:
        save_weights(model, tmp / "model.safetensors")
        (tmp / "config.yaml").write_text(checkpoint_config_yaml(cfg))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


def read_checkpoint(path: str | Path, ema: bool = False):
    """A checkpoint / step / run directory -> (step dir, ModelConfig, {key: numpy}, Tokenizer | None);
    `ema`: the EMA weights (ema.safetensors) instead of model.safetensors."""
    ckpt = resolve_checkpoint(path)
    weights = checkpoint_weights(ckpt, ema)
    if (ckpt / "config.yaml").is_file():
        cfg = load_config(ckpt / "config.yaml", log=None).model_config()
    else:  # save_weights also records the architecture in the file's metadata
        _, meta = mx.load(str(weights), return_metadata=True)
        if "config" not in meta:
            raise FileNotFoundError(f"{ckpt}: no config.yaml, and {weights.name} records no config")
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    state = read_weights(weights)
    check_state(expected_shapes(cfg), state, str(weights))
    state = {k: _to_numpy(k, v, weights) for k, v in state.items()}
    tokenizer = load_saved(ckpt) if (ckpt / TOKENIZER_CONFIG_FILE).is_file() else None
    return ckpt, cfg, state, tokenizer


# ---------------------------------------------------------------------------
# Output directories: staged beside OUT, then moved in whole

# In a staging directory while it is filled: the PID of the process filling it.
STAGING_MARKER = ".mlx_clip_staging"


def _staging_dir(out: Path, kind: str) -> Path:
    """OUT's sibling .NAME.tmp-PID-XXXXXXXX (new output) or .NAME.old-PID-XXXXXXXX (the replaced one)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_stale(out: Path, log=print) -> None:
    """Undo what a killed convert/export left beside OUT: a replaced output whose successor never
    moved in goes back to OUT; other staging directories are removed. Only directories named by
    _staging_dir whose process is gone are touched (a .tmp- one also needs its marker)."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(old|tmp)-(\d+)-[0-9a-f]{{8}}")
    for path in sorted(out.parent.iterdir()):  # .old- before .tmp-
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or pid_alive(int(match[2])):
            continue
        if match[1] == "old" and not out.exists():
            os.rename(path, out)
            log(f"restored {out} from {path.name}, left by an interrupted --force (process {match[2]})")
        elif match[1] == "old" or (path / STAGING_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}, left by an interrupted convert/export (process {match[2]})")
    marker = out / STAGING_MARKER  # a kill just after the move in
    if marker.is_file():
        pid = marker.read_text().strip()
        if not pid.isdigit() or not pid_alive(int(pid)):
            marker.unlink()


def _check_replaceable(out: Path) -> None:
    """--force replaces OUT as a whole: only when it looks like an earlier output (plain files,
    weights among them), never a folder of other things, such as a home directory."""
    if out.is_symlink():
        raise FileExistsError(
            f"{out} is a symbolic link; --force replaces OUT itself, so name the real directory"
        )
    entries = sorted(out.iterdir())
    other = next((p for p in entries if not p.is_file() or p.is_symlink()), None)
    if other is not None or not any(p.suffix in (".safetensors", *TORCH_SUFFIXES) for p in entries):
        what = f"it holds {other.name}" if other is not None else "it holds no weights file"
        raise FileExistsError(
            f"{out} does not look like an earlier convert/export output ({what}), and --force "
            "replaces the whole directory: choose a new or empty --out"
        )


def write_manifest(directory: Path) -> None:
    """directory/state.json: {"files": {name: sha256}}, what mlx_clip.load and eval check."""
    skip = (MANIFEST, STAGING_MARKER)
    (directory / MANIFEST).write_text(json.dumps({"files": file_checksums(directory, skip)}, indent=1))


def fsync_tree(directory: Path) -> None:
    """Flush a directory's files and the directory itself to disk (before a rename makes it live)."""
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(path: Path) -> None:
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


def _move_in(tmp: Path, out: Path) -> None:
    """Make the full directory `tmp` OUT. Replacing: old aside, new in, old removed. A kill leaves
    OUT whole (old or new), or, between the two renames, absent with the old one beside it, which
    the next convert/export puts back (clean_stale)."""
    if not out.exists() or not any(out.iterdir()):
        os.rename(tmp, out)  # also replaces an empty directory, in one step
    else:
        old = _staging_dir(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    (out / STAGING_MARKER).unlink(missing_ok=True)


@contextmanager
def staged_output(out: str | Path, force: bool = False, log=print) -> Iterator[Path]:
    """Yield a temporary sibling of OUT to fill; on success it gets a checksum manifest and
    replaces OUT in one move.

    An existing OUT must be empty unless `force`; then it must look like an earlier output, and
    it is replaced as a whole, so old and new files never mix. Leftovers of killed runs beside OUT
    are cleaned up first (clean_stale).
    """
    out = Path(os.path.abspath(out))  # "." and "dir/" get a name, and a parent to stage beside
    clean_stale(out, log)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_dir(out, "tmp")
    tmp.mkdir()
    try:
        (tmp / STAGING_MARKER).write_text(str(os.getpid()))
        try:
            yield tmp
        except SafetensorError as e:  # safetensors' save_file on a full disk: not an OSError
            if "I/O error" not in str(e):
                raise
            raise OSError(f"could not write {out}: {e}") from e
        write_manifest(tmp)
        fsync_tree(tmp)
        _move_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
