"""LoRA checkpoints on disk: the adapters only, plus a reference to the base weights.

A LoRA run's step_N/model.safetensors holds adapter_weights(model) (models/lora.py) and, in its
header beside the architecture ("config"): "lora" (the finetune section) and "lora_base"
({"path", "sha256"} of the model.init_from weights file). Loading one (mlx_clip.load, eval,
predict, export --merge, --resume) reads the base from that path, checks its sha256 and applies
the adapters; a base that moved or changed is an error naming the path and the hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..interop.layouts import WeightError, check_state
from ..schema import from_dict, to_dict
from .config import ModelConfig
from .locate import file_sha256, safetensors_header
from .lora import LoraBase, adapter_weights, apply_lora, freeze_for_lora
from .lora_config import FinetuneConfig
from .model import create_model
from .weights import FORMAT, load_init_weights, load_weights, read_weights, save_weights, write_safetensors


def build_lora_model(
    model: nn.Module, finetune: FinetuneConfig, base: str | Path, sha256: str | None = None, seed: int = 0
) -> list[str]:
    """Load the base weights file into `model`, quantize (QLoRA) and wrap the targeted linears (A
    drawn from `seed`), and freeze what LoRA freezes, in place; returns the frozen paths.
    `sha256`: the hash the base must have (a checkpoint's reference); None computes it (a new run)."""
    base = Path(base).resolve()
    if sha256 is not None:
        check_base(base, sha256)
    digest = sha256 or file_sha256(base)
    load_init_weights(model, base)
    apply_lora(model, finetune, seed)
    model.lora = LoraBase(finetune, str(base), digest)
    return freeze_for_lora(model, finetune.lora)


def check_base(path: Path, sha256: str, where: str = "this LoRA checkpoint") -> None:
    if not path.is_file():
        raise WeightError(
            f"{where} needs its base weights {path} (sha256 {sha256}), which are not there: move "
            "the file back to that path (or merge and export the adapters where it is)"
        )
    if file_sha256(path) != sha256:
        raise WeightError(
            f"{where} was trained on base weights {path} with sha256 {sha256}, and that file has "
            "changed since: restore the original base file (the adapters only fit that one)"
        )


def save_model_file(model: nn.Module, path: str | Path) -> None:
    """A checkpoint's model.safetensors: every parameter, or for a LoRA model the adapters and the
    reference to its base (module docstring)."""
    lora: LoraBase | None = getattr(model, "lora", None)
    if lora is None:
        return save_weights(model, path)
    weights = adapter_weights(model)
    mx.eval(weights)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(to_dict(model.config)),
        "lora": json.dumps(to_dict(lora.finetune)),
        "lora_base": json.dumps({"path": lora.path, "sha256": lora.sha256}),
    }
    write_safetensors(path, weights, metadata)


def lora_reference(path: str | Path) -> LoraBase | None:
    """The LoRA settings and base reference in a weights file's header; None for a full model."""
    meta = safetensors_header(path).get("__metadata__") or {}
    if "lora_base" not in meta:
        return None
    base = json.loads(meta["lora_base"])
    finetune = from_dict(FinetuneConfig, json.loads(meta["lora"]))
    return LoraBase(finetune, base["path"], base["sha256"])


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """A LoRA checkpoint's tensors into a LoRA model built on the same base (strict: the same keys
    and shapes as adapter_weights(model))."""
    ref = lora_reference(path)
    if ref is None:
        raise WeightError(
            f"{path}: a full model's weights, not a LoRA checkpoint (finetune.lora.enabled differs)"
        )
    if ref.sha256 != model.lora.sha256:
        raise WeightError(
            f"{path} holds adapters for base {ref.path} (sha256 {ref.sha256}), but this model's base is "
            f"{model.lora.path} (sha256 {model.lora.sha256}); set model.init_from to the checkpoint's base"
        )
    weights = read_weights(path)
    expected = adapter_weights(model)
    check_state({k: v.shape for k, v in expected.items()}, weights, str(path))
    model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """A checkpoint's model.safetensors into `model`: adapters into a LoRA model, else every weight."""
    return (
        load_adapters(model, path) if getattr(model, "lora", None) is not None else load_weights(model, path)
    )


def load_model(mcfg: ModelConfig, path: str | Path) -> nn.Module:
    """A model from a checkpoint's weights file: a full model, or for a LoRA checkpoint its base
    (found by path, checked by sha256) with the adapters applied."""
    model = create_model(mcfg, seed=None)
    ref = lora_reference(path)
    if ref is None:
        return load_weights(model, path)
    build_lora_model(model, ref.finetune, ref.path, ref.sha256)
    return load_adapters(model, path)
