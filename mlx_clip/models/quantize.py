"""Weight-only quantization of a trained model's linear layers, for inference (embedding, search).

    quantize_model(model, bits=8, group_size=64)   # in place; nn.Linear -> QuantizedLinear
    quantization(model)                            # "q8g64", or None for a float model

MLX's affine quantization (mx.quantize) stores each row of a weight in groups of `group_size`
inputs: `bits`-bit integers with a float scale and offset per group, so a layer can be quantized
only when the group size divides its input width. Those that it does not divide stay in float (one
warning says how many). The embeddings (token, positional, class), the patch embedding (a custom
matmul on a conv-layout weight), the LayerNorms and the logit scale and bias stay in float too:
only the linears, which hold most of the weights of a ViT, are quantized. On MLX's CPU backend
their matmul dequantizes the weight first (kernels.quantized_matmul): an image embeds at 0.8-0.9x
the float32 speed there, against ~0.1x with MLX's own quantized matmul (benchmarks/quantized.py).
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .kernels import quantized_matmul
from .lora_config import GROUP_SIZES  # what mx.quantize accepts, kept where MLX is not imported

BITS = (4, 8)


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's QuantizedLinear whose matmul takes the backend's fastest path (kernels.quantized_matmul)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self)
        return y + self.bias if "bias" in self else y


def check_quantization(bits: int, group_size: int) -> None:
    """Refuse a bit width or group size that quantize_model cannot use, naming the value."""
    if bits not in BITS:
        raise ValueError(f"quantize={bits!r}: the bit width must be one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r}: must be one of {', '.join(map(str, GROUP_SIZES))} (mx.quantize)"
        )


def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """Replace, in place, every nn.Linear whose input width `group_size` divides by a
    QuantizedLinear of `bits` bits; the others stay in float, and a warning says how many.
    A group size that divides no linear layer's input width is a ValueError."""
    check_quantization(bits, group_size)
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    fits = {path for path, m in linears.items() if m.weight.shape[1] % group_size == 0}  # (out, in)
    if not fits:
        widths = sorted({m.weight.shape[1] for m in linears.values()})
        raise ValueError(
            f"group_size={group_size}: divides the input width of none of the model's {len(linears)} "
            f"linear layers (widths {widths}); choose a group size that divides them"
        )

    def swap(path: str, m: nn.Module) -> nn.Module:
        return QuantizedLinear.from_linear(m, group_size, bits) if path in fits else m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    mx.eval(model.parameters())
    left = sorted(set(linears) - fits)
    if left:
        widths = sorted({linears[p].weight.shape[1] for p in left})
        warnings.warn(
            f"quantize={bits}, group_size={group_size}: {len(left)} of {len(linears)} linear layers "
            f"stay in float (input widths {widths} are not multiples of {group_size})",
            stacklevel=2,
        )
    return model


def quantization(model: nn.Module) -> str | None:
    """The tag "q{bits}g{group_size}" of a model with quantized linears (quantize_model), None for
    a float one: what tells the two apart where their outputs are kept (the folder-search cache)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            return f"q{m.bits}g{m.group_size}"
    return None


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all the model's arrays (quantized weights with their scales and offsets)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
