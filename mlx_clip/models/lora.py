"""LoRA and QLoRA for the CLIP towers, in MLX: adapters on nn.Linear / nn.QuantizedLinear, and
merging them back into plain Linear weights.

Which linears get adapters, the keys and the formula: models/lora_config.py (shared with
torch_ref/lora.py). A LoRALinear keeps its base's own keys (weight, bias; and scales, biases when
quantized) beside lora_a and lora_b, so a base checkpoint loads into the LoRA model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .kernels import quantized_matmul
from .lora_config import FinetuneConfig, LoraConfig, frozen_by_lora, lora_a_init, lora_targets


@dataclass(frozen=True)
class LoraBase:
    """What a LoRA model was built on: its settings and the base weights file (path and sha256).
    Kept on the model as `model.lora` (a plain attribute, not a parameter)."""

    finetune: FinetuneConfig
    path: str
    sha256: str


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ lora_a.T @ lora_b.T, the base frozen by the caller."""

    def __init__(self, linear: nn.Module, lora_a: mx.array, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.bits = getattr(linear, "bits", None)  # None: a float base; 4 / 8: nn.QuantizedLinear
        self.group_size = getattr(linear, "group_size", None)
        self.mode = getattr(linear, "mode", "affine")  # what kernels.quantized_matmul reads of a layer
        for key in ("weight", "scales", "biases", "bias"):  # the base's own keys, unchanged
            if key in linear:
                self[key] = linear[key]
        rank = lora_a.shape[0]
        self.lora_a = lora_a  # (rank, in): lora_config.lora_a_init
        self.lora_b = mx.zeros((self.weight.shape[0], rank))  # (out, rank): zero, so y = base(x) at first
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def base(self, x: mx.array) -> mx.array:
        if self.bits is None:
            y = x @ self.weight.T
        else:  # (kernels.py: dequantize + BLAS on MLX's CPU backend, mx.quantized_matmul elsewhere)
            y = quantized_matmul(x, self)
        return y + self.bias if "bias" in self else y

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T  # (..., rank) -> (..., out)
        return self.base(x) + (self.scale * z).astype(x.dtype)

    def float_weight(self) -> mx.array:
        """The base weight in float32 (dequantized for a quantized base)."""
        if self.bits is None:
            return self.weight.astype(mx.float32)
        w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)
        return w.astype(mx.float32)

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (in eval mode): W + scale * B @ A."""
        weight = self.float_weight() + self.scale * (self.lora_b @ self.lora_a)
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in self)
        out.weight = weight
        if "bias" in self:
            out.bias = self.bias.astype(mx.float32)
        return out


def _module(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a dotted path, through lists (resblocks.3)."""
    *parents, name = path.split(".")
    parent = model
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    return parent, name


def _get(model: nn.Module, path: str) -> nn.Module:
    parent, name = _module(model, path)
    return parent[name]


def quantize_linears(model: nn.Module, paths: list[str], bits: int, group_size: int) -> None:
    """QLoRA: the nn.Linear at each path becomes an nn.QuantizedLinear (mx.quantize), in place."""
    for path in paths:
        parent, name = _module(model, path)
        linear = parent[name]
        if linear.weight.shape[1] % group_size:
            raise ValueError(
                f"{path}: input width {linear.weight.shape[1]} is not a multiple of "
                f"finetune.quantize_group_size={group_size}; choose a group size that divides it"
            )
        parent[name] = nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)


def apply_lora(model: nn.Module, finetune: FinetuneConfig, seed: int = 0) -> list[str]:
    """Wrap the targeted linears of `model` (quantized first for QLoRA) with LoRALinear, in place;
    returns their paths. A starts as lora_a_init(seed, ...), as in torch_ref. Freezing is
    freeze_for_lora's job."""
    lora = finetune.lora
    paths = lora_targets(model.config, lora)
    in_dims = [_get(model, path).weight.shape[1] for path in paths]  # before quantizing packs them
    if finetune.bits is not None:
        quantize_linears(model, paths, finetune.bits, finetune.quantize_group_size)
    for i, path in enumerate(paths):
        parent, name = _module(model, path)
        lora_a = mx.array(lora_a_init(seed, i, lora.rank, in_dims[i]))
        parent[name] = LoRALinear(parent[name], lora_a, lora.alpha, lora.dropout)
    mx.eval(model.parameters())
    return paths


def freeze_for_lora(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Freeze what LoRA freezes (lora_config.frozen_by_lora), in place; returns those paths."""
    frozen = []
    for path, module in model.named_modules():
        for key, value in module.items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, mx.array) and frozen_by_lora(full, lora):
                module.freeze(recurse=False, keys=[key])
                frozen.append(full)
    return frozen


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into a plain float32 Linear, in place; the model is then a plain CLIP
    (no `lora`). Returns notes for the user (a quantized base is dequantized first)."""
    layers = lora_layers(model)
    bits = {m.bits for _, m in layers if m.bits is not None}
    for path, layer in layers:
        parent, name = _module(model, path)
        parent[name] = layer.merged()
    model.lora = None
    model.unfreeze()
    mx.eval(model.parameters())
    notes = [f"merged {len(layers)} LoRA adapters into their base weights"]
    if bits:
        notes.append(
            f"the base was quantized ({', '.join(map(str, sorted(bits)))}-bit): dequantized before merging"
        )
    return notes


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """What a LoRA checkpoint stores: the trainable parameters (the adapters, and what else trains),
    plus logit_scale / logit_bias (scalars a zero-shot needs even when frozen)."""
    out = dict(tree_flatten(model.trainable_parameters()))
    for key in ("logit_scale", "logit_bias"):
        if key in model:
            out[key] = model[key]
    return out
