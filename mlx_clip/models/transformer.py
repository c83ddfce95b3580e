"""Transformer building blocks and the two CLIP towers, in MLX.

Attribute names here are the checkpoint keys. torch_ref/transformer.py mirrors
this file name for name, so both frameworks share one key scheme.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import Activation, ModelConfig
from .kernels import activation, checkpoint_block


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def __call__(self, x: mx.array, causal: bool = False) -> mx.array:
        B, L, D = x.shape
        h = self.heads
        qkv = self.in_proj(x).reshape(B, L, 3, h, D // h)  # (B, L, 3, h, hd)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, B, h, L, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=(D // h) ** -0.5, mask="causal" if causal else None
        )  # (B, h, L, hd)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: Activation):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = activation(act)  # "quick_gelu" or "gelu"

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: Activation, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def __call__(self, x: mx.array, causal: bool = False) -> mx.array:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.resblocks = [
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, eps) for _ in range(layers)
        ]
        self.grad_checkpointing = False  # set by CLIP.set_grad_checkpointing

    def __call__(self, x: mx.array, causal: bool = False) -> mx.array:
        for block in self.resblocks:
            x = checkpoint_block(block, x, causal) if self.grad_checkpointing else block(x, causal=causal)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a stride-p conv without bias).

    The weight keeps MLX's conv layout (out, kh, kw, in). Because stride equals
    kernel size, the conv is exactly a reshape plus one matmul, which is much
    faster than a strided conv (and its backward) on MLX's CPU backend.
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        scale = (in_channels * patch_size * patch_size) ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (width, patch_size, patch_size, in_channels))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        x = x.reshape(B, gh, p, gw, p, C).transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
        x = x.reshape(B, gh * gw, p * p * C)  # (B, N, p*p*C), same order as the weight
        w = self.weight.reshape(self.weight.shape[0], -1)  # (width, p*p*C)
        return x @ w.T  # (B, N, width)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.vision_width
        scale = width**-0.5
        self.patch_embed = PatchEmbed(cfg.patch_size, width)
        self.class_embedding = scale * mx.random.normal((width,))
        self.positional_embedding = scale * mx.random.normal((cfg.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(
            width, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio, cfg.activation, cfg.layer_norm_eps
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)

    def __call__(self, images: mx.array) -> mx.array:
        x = self.patch_embed(images)  # (B, N, W)
        cls = mx.broadcast_to(self.class_embedding, (x.shape[0], 1, x.shape[-1]))
        x = mx.concatenate([cls.astype(x.dtype), x], axis=1)  # (B, N+1, W)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x)
        return self.proj(self.ln_post(x[:, 0]))  # class token -> (B, E)


class TextTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = mx.zeros((cfg.context_length, width))
        self.transformer = Transformer(
            width, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, cfg.activation, cfg.layer_norm_eps
        )
        self.ln_final = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(width, cfg.embed_dim, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        x = self.ln_final(self.transformer(x, causal=True))
        # Pool at the end-of-text token: it has the largest id in CLIP vocabularies.
        eot = mx.argmax(tokens, axis=-1)  # (B,)
        x = mx.take_along_axis(x, eot[:, None, None], axis=1).squeeze(1)  # (B, W)
        return self.text_projection(x)
