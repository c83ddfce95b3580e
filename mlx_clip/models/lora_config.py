"""The `finetune:` section (LoRA / QLoRA) and which linears get adapters, framework-free.

mlx_clip.models.lora (MLX) and torch_ref.lora (PyTorch) both wrap exactly the module paths
`lora_targets` lists, so an adapter has the same key in both frameworks:

    <linear>.weight, <linear>.bias   the base, unchanged (a base checkpoint loads as before)
    <linear>.lora_a  (rank, in)      A: Kaiming-uniform, as PEFT and mlx-lm (lora_a_init: the same
                                     numbers in both frameworks for a seed)
    <linear>.lora_b  (out, rank)     B: zeros, so step 0 is the base model exactly

    y = base(x) + (alpha / rank) * dropout(x) @ lora_a.T @ lora_b.T

A tower named in `towers` has its whole base frozen (LoRA implies optim.lock_*); only the
adapters train, plus its LayerNorms with `train_norms`. A tower not named trains as optim.lock_*
says. logit_scale / logit_bias train only with `train_logit_scale`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..schema import ConfigError
from .config import ModelConfig

LoraTower = Literal["image", "text"]
# attn_qkv: attention in_proj; attn_out: out_proj; mlp: c_fc and c_proj; proj: the tower's
# output projection (visual.proj, text.text_projection or text.head)
LoraTarget = Literal["attn_qkv", "attn_out", "mlp", "proj"]
QuantizeBits = Literal["none", 4, 8]
GROUP_SIZES = (32, 64, 128)  # what mx.quantize's affine mode accepts; models/quantize.py uses it too

_BLOCK_LINEARS = {
    "attn_qkv": ("attn.in_proj",),
    "attn_out": ("attn.out_proj",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}
_TOWERS = {"image": ("visual", "vision"), "text": ("text", "text")}  # tower -> (module, ModelConfig prefix)


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    towers: list[LoraTower] = field(default_factory=lambda: ["image", "text"])
    targets: list[LoraTarget] = field(default_factory=lambda: ["attn_qkv", "attn_out", "mlp"])
    layers: int | Literal["all"] = "all"  # or N: the last N residual blocks of each tower
    train_norms: bool = False  # the LoRA towers' LayerNorms train too
    train_logit_scale: bool = False  # logit_scale (and SigLIP's logit_bias) train too

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class FinetuneConfig:
    """Parameter-efficient fine-tuning of the model.init_from base (docs: models/lora_config.py)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    # QLoRA: the frozen base linears that get adapters are quantized (mx.quantize) to 4 or 8 bits
    quantize_base: QuantizeBits = "none"
    quantize_group_size: int = 64

    @property
    def bits(self) -> int | None:
        return None if self.quantize_base == "none" else int(self.quantize_base)

    def validate(self, mcfg: ModelConfig, optim, init_from: str | None) -> None:
        lora, where = self.lora, "finetune.lora"
        if not lora.enabled:
            if self.quantize_base != "none":
                raise ConfigError(
                    "finetune.quantize_base quantizes the base under LoRA: set finetune.lora.enabled true"
                )
            return
        if lora.rank <= 0:
            raise ConfigError(f"{where}.rank must be a positive integer, got {lora.rank}")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {lora.dropout}")
        if not lora.towers or not lora.targets:
            raise ConfigError(f"{where}.towers and {where}.targets must each name at least one")
        for name, value, allowed in (
            ("towers", lora.towers, LoraTower),
            ("targets", lora.targets, LoraTarget),
        ):
            if len(set(value)) != len(value):
                raise ConfigError(
                    f"{where}.{name} names an entry twice: {value} (allowed: {typing.get_args(allowed)})"
                )
        for tower in lora.towers:
            n = getattr(optim, f"lock_{tower}_unlocked_layers")
            if n:  # those blocks would train in full and carry adapters at once
                raise ConfigError(
                    f"{where}.towers has {tower!r}, whose base LoRA freezes, but "
                    f"optim.lock_{tower}_unlocked_layers is {n} (blocks trained in full): set it to 0, "
                    f"or leave {tower!r} out of {where}.towers"
                )
            layers = getattr(mcfg, f"{_TOWERS[tower][1]}_layers")
            if lora.layers != "all" and not 1 <= lora.layers <= layers:
                raise ConfigError(
                    f"{where}.layers must be 'all' or in [1, {layers}] ({tower} tower), got {lora.layers}"
                )
        if not init_from:  # the adapters' checkpoint refers to its base by path and hash
            raise ConfigError(
                f"{where}.enabled needs model.init_from: the base weights the adapters train on, which "
                "each LoRA checkpoint names by path and sha256 (convert a pretrained model, or save one)"
            )
        if self.quantize_group_size not in GROUP_SIZES:
            raise ConfigError(
                f"finetune.quantize_group_size must be one of {GROUP_SIZES}, got {self.quantize_group_size}"
            )


def lora_targets(mcfg: ModelConfig, lora: LoraConfig) -> list[str]:
    """The module paths of the linears that get adapters, towers in order, blocks in order."""
    paths = []
    for tower in ("image", "text"):
        if tower not in lora.towers:
            continue
        module, prefix = _TOWERS[tower]
        n = getattr(mcfg, f"{prefix}_layers")
        first = 0 if lora.layers == "all" else n - lora.layers
        for i in range(first, n):
            for target in lora.targets:
                paths += [
                    f"{module}.transformer.resblocks.{i}.{name}" for name in _BLOCK_LINEARS.get(target, ())
                ]
        if "proj" in lora.targets:
            paths += _projection(mcfg, tower)
    return paths


def _projection(mcfg: ModelConfig, tower: str) -> list[str]:
    if tower == "image":
        return ["visual.proj"] if mcfg.vision_proj else []
    return {"proj": ["text.text_projection"], "head": ["text.head"]}.get(mcfg.text_proj, [])


def is_norm(path: str) -> bool:
    """A LayerNorm's weight or bias (ln_pre, ln_1, ln_2, ln_post, ln_final, the MAP head's norm)."""
    module = path.rsplit(".", 2)[-2] if path.count(".") >= 1 else ""
    return module.startswith("ln_") or module == "norm"


def frozen_by_lora(path: str, lora: LoraConfig) -> bool:
    """Whether LoRA freezes the parameter at `path` (the base of a LoRA tower, and the logit scale
    and bias unless they train); the adapters never are."""
    if path.endswith((".lora_a", ".lora_b")):
        return False
    if path in ("logit_scale", "logit_bias"):
        return not lora.train_logit_scale
    for tower in lora.towers:
        if path.startswith(_TOWERS[tower][0] + "."):
            return not (lora.train_norms and is_norm(path))
    return False


def lora_a_init(seed: int, index: int, rank: int, in_dims: int) -> np.ndarray:
    """The initial A of the index-th adapter (lora_targets order): U(-1/sqrt(in), 1/sqrt(in)),
    i.e. Kaiming-uniform with a = sqrt(5) as torch's Linear and PEFT, drawn with numpy so that
    mlx_clip and torch_ref start from the very same adapters."""
    bound = 1 / math.sqrt(in_dims)
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-bound, bound, (rank, in_dims)).astype(np.float32)
