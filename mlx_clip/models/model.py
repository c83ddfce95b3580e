"""CLIP in MLX: two towers, their projections and a learnable temperature (and SigLIP's bias).

ModelConfig's tower options (transformer.py) build CLIP, SigLIP and their mixes from this one class.

The model returns features and the logit scale, never a loss (see loss.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_map_with_path

from .config import ModelConfig, model_config
from .init_table import LOGIT_SCALE_MAX, init_rule, logit_scale_init
from .transformer import TextTransformer, VisionTransformer


def _normalize(x: mx.array) -> mx.array:
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.lora = None  # a LoRA model's settings and base (models/lora.py LoraBase), not a parameter
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.logit_scale = mx.array(logit_scale_init(cfg))
        if cfg.init_logit_bias is not None:  # SigLIP's learnable bias
            self.logit_bias = mx.array(float(cfg.init_logit_bias))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (less memory, ~1/3
        more compute); the results are the same."""
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def encode_image(
        self, images: mx.array, normalize: bool = True, keep: mx.array | None = None
    ) -> mx.array:
        """images: (B, H, W, 3) float, already normalized with the CLIP mean/std. keep: patch
        dropout's (B, K) int indices of the patches each image keeps (training steps only)."""
        x = self.visual(images, keep)
        return _normalize(x) if normalize else x

    def encode_text(self, tokens: mx.array, normalize: bool = True) -> mx.array:
        """tokens: (B, context_length) int32 as the tokenizer lays them out (CLIP: EOT-terminated,
        zero-padded); the config's text_pool says which position is pooled."""
        x = self.text(tokens)
        return _normalize(x) if normalize else x

    def __call__(self, images: mx.array, tokens: mx.array, keep: mx.array | None = None):
        image_features = self.encode_image(images, keep=keep)
        text_features = self.encode_text(tokens)
        # Clamp so the temperature never exceeds 100 (CLIP paper, sec. 2.5).
        return image_features, text_features, mx.exp(mx.minimum(self.logit_scale, LOGIT_SCALE_MAX))


def encode_pair(
    model: CLIP, images: mx.array, tokens: mx.array, dtype=None, keep: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Both towers' L2-normalised features, in float32; `keep` as CLIP.encode_image's.

    dtype=mx.bfloat16 is mixed precision: the towers run in bf16 on bf16 copies of the weights,
    cast inside the traced function, so the gradients flow back (in float32) to the float32
    master weights, which the optimizer keeps; the features are normalised in float32.
    """
    if dtype is None or dtype == mx.float32:
        return model.encode_image(images, keep=keep), model.encode_text(tokens)
    master = model.parameters()
    # scalars stay fp32; a quantized (QLoRA) base's packed integer weights stay as they are
    model.update(
        tree_map(lambda p: p.astype(dtype) if p.ndim and mx.issubdtype(p.dtype, mx.floating) else p, master)
    )
    try:
        x = model.encode_image(images.astype(dtype), normalize=False, keep=keep)
        t = model.encode_text(tokens, normalize=False)
    finally:
        model.update(master)
    return _normalize(x.astype(mx.float32)), _normalize(t.astype(mx.float32))


def init_weights(model: CLIP, seed: int | None = None) -> CLIP:
    """CLIP / open_clip initialisation (init_table.py), in place."""
    if seed is not None:
        mx.random.seed(seed)

    def init(path: str, p: mx.array) -> mx.array:
        rule = init_rule(path, model.config)
        if rule is None:
            return p
        kind, value = rule
        return mx.full(p.shape, value) if kind == "fill" else value * mx.random.normal(p.shape)

    model.update(tree_map_with_path(init, model.parameters()))
    return model


def create_model(arch: str | ModelConfig = "tiny", seed: int | None = 0) -> CLIP:
    """Build a CLIP from an architecture name ('tiny', 'vit_b32', ...), a YAML path or a ModelConfig."""
    # The one conversion, at the public edge: a name or path is resolved, a given config is checked.
    cfg = arch if isinstance(arch, ModelConfig) else model_config(arch)
    cfg.validate()
    if seed is not None:
        mx.random.seed(seed)
    model = init_weights(CLIP(cfg))
    mx.eval(model.parameters())
    return model
