"""Transformer building blocks and the two towers (CLIP, SigLIP and their mixes), in MLX.

Attribute names here are the checkpoint keys. torch_ref/transformer.py mirrors
this file name for name, so both frameworks share one key scheme. The keys that
ModelConfig's options add or remove (CLIP's defaults have all of the first column):

    visual.class_embedding, positional_embedding (N+1, W)   vision_pool "cls"
    visual.positional_embedding (N, W), visual.attn_pool.*  vision_pool "map": probe (1, 1, W),
        attn.in_proj (3W, W: q, k, v rows) / attn.out_proj, norm, mlp.c_fc / mlp.c_proj
    visual.patch_embed.bias                                 patch_bias
    visual.ln_pre                                           vision_pre_norm
    visual.proj (no bias) / visual.proj.bias                vision_proj / vision_proj_bias
    text.text_projection (no bias) / text.head (bias)       text_proj "proj" / "head"
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from ..interop.layouts import resample_matrix
from .config import Activation, ModelConfig, TextPool
from .kernels import activation, attention, checkpoint_block, layer_norm, quantized_matmul


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
        # mx.split, not qkv[0], qkv[1], qkv[2]: the gradient of a split is one concatenation, that
        # of each index a scatter into zeros (on MLX's CPU backend ~30% of this layer's fwd + bwd)
        q, k, v = (t.squeeze(0) for t in mx.split(qkv, 3))  # (B, h, L, hd) each
        out = attention(q, k, v, (D // h) ** -0.5, causal)  # (B, h, L, hd)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))

    def cross(self, x: mx.array, context: mx.array) -> mx.array:
        """Queries from x (B, L, D), keys and values from context (B, S, D): in_proj's first D
        rows project the queries, the other 2D the keys and values (torch's MultiheadAttention)."""
        B, L, D = x.shape
        S, h = context.shape[1], self.heads
        q = _rows(self.in_proj, x, 0, D).reshape(B, L, h, D // h).transpose(0, 2, 1, 3)  # (B, h, L, hd)
        kv = _rows(self.in_proj, context, D, 3 * D).reshape(B, S, 2, h, D // h)
        k, v = (t.squeeze(0) for t in mx.split(kv.transpose(2, 0, 3, 1, 4), 2))  # (B, h, S, hd) each
        out = attention(q, k, v, (D // h) ** -0.5)  # (B, h, L, hd)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


def _rows(linear: nn.Module, x: mx.array, start: int, stop: int) -> mx.array:
    """x @ W[start:stop].T + b[start:stop]: output rows start..stop of a Linear, or of a
    QuantizedLinear (models/quantize.py), whose packed weight, scales and offsets slice by row alike."""
    if isinstance(linear, nn.QuantizedLinear):
        y = quantized_matmul(x, linear, start, stop)
    else:
        y = x @ linear.weight[start:stop].T
    return y + linear.bias[start:stop]


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: Activation):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = activation(act)  # a name of kernels.ACTIVATIONS

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same keys) computed by kernels.layer_norm."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" not in self or "bias" not in self:
            return super().__call__(x)
        return layer_norm(x, self.weight, self.bias, self.eps)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)

    def __call__(self, x: mx.array, causal: bool = False) -> mx.array:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.resblocks = [
            ResidualAttentionBlock(width, heads, hidden, activation, eps) for _ in range(layers)
        ]
        self.grad_checkpointing = False  # set by CLIP.set_grad_checkpointing

    def __call__(self, x: mx.array, causal: bool = False) -> mx.array:
        for block in self.resblocks:
            x = checkpoint_block(block, x, causal) if self.grad_checkpointing else block(x, causal=causal)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a stride-p conv, with a bias if asked).

    The weight keeps MLX's conv layout (out, kh, kw, in). Because stride equals
    kernel size, the conv is exactly a reshape plus one matmul, which is much
    faster than a strided conv (and its backward) on MLX's CPU backend.
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        scale = (in_channels * patch_size * patch_size) ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (width, patch_size, patch_size, in_channels))
        if bias:
            self.bias = mx.zeros((width,))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        if H % p or W % p:  # as a stride-p conv: the pixels past the last whole patch are left out
            x = x[:, : gh * p, : gw * p]
        x = x.reshape(B, gh, p, gw, p, C).transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
        x = x.reshape(B, gh * gw, p * p * C)  # (B, N, p*p*C), same order as the weight
        w = self.weight.reshape(self.weight.shape[0], -1)  # (width, p*p*C)
        x = x @ w.T  # (B, N, width)
        return x + self.bias if "bias" in self else x


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling (MAP): a learned probe attends to all tokens, then a
    residual MLP on its LayerNorm; the probe's output is the pooled feature."""

    def __init__(self, width: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.probe = mx.zeros((1, 1, width))
        self.attn = Attention(width, heads)
        self.norm = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)

    def __call__(self, x: mx.array) -> mx.array:
        probe = mx.broadcast_to(self.probe, (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        y = self.attn.cross(probe, x)  # (B, 1, W)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, W)


@lru_cache(maxsize=16)
def _resample_matrix(grid: int, new_grid: tuple[int, int]) -> mx.array:
    """interop.layouts.resample_matrix in float32, built once per grid on the host (a constant of
    the compiled step)."""
    return mx.array(resample_matrix(grid, new_grid), dtype=mx.float32)


def _pool_text(x: mx.array, tokens: mx.array, pool: TextPool) -> mx.array:
    """(B, L, W) -> (B, W) at the end-of-text token (argmax: it has the largest id in CLIP
    vocabularies), the last position or the first."""
    if pool == "last":
        return x[:, -1]
    if pool == "first":
        return x[:, 0]
    eot = mx.argmax(tokens, axis=-1)  # (B,)
    return mx.take_along_axis(x, eot[:, None, None], axis=1).squeeze(1)


def _keep_patches(x: mx.array, keep: mx.array, has_cls: bool) -> mx.array:
    """(B, T, W) tokens -> the patches at `keep` (B, K), after the class token (position 0) when
    there is one: (B, K (+1), W)."""
    if has_cls:
        return mx.concatenate([x[:, :1], _keep_patches(x[:, 1:], keep, False)], axis=1)
    return mx.take_along_axis(x, keep[:, :, None], axis=1)  # (B, K, W)


def _tower(cfg: ModelConfig, tower: str) -> Transformer:
    width, layers, heads = (getattr(cfg, f"{tower}_{k}") for k in ("width", "layers", "heads"))
    act = cfg.tower_activation(tower)
    return Transformer(width, layers, heads, cfg.mlp_hidden(tower), act, cfg.layer_norm_eps)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width, eps = cfg.vision_width, cfg.layer_norm_eps
        scale = width**-0.5
        self.pool = cfg.vision_pool
        self.patch_embed = PatchEmbed(cfg.patch_size, width, bias=cfg.patch_bias)
        if self.pool == "cls":
            self.class_embedding = scale * mx.random.normal((width,))
        positions = cfg.num_patches + (self.pool == "cls")
        self.grid = cfg.image_size // cfg.patch_size  # the native grid: the embedding's, always saved
        self.positional_embedding = scale * mx.random.normal((positions, width))
        if cfg.vision_pre_norm:
            self.ln_pre = LayerNorm(width, eps=eps)
        self.transformer = _tower(cfg, "vision")
        self.ln_post = LayerNorm(width, eps=eps)
        if self.pool == "map":
            self.attn_pool = AttentionPool(
                width, cfg.vision_heads, cfg.mlp_hidden("vision"), cfg.tower_activation("vision"), eps
            )
        if cfg.vision_proj:
            self.proj = nn.Linear(width, cfg.embed_dim, bias=cfg.vision_proj_bias)

    def positions(self, grid: tuple[int, int]) -> mx.array:
        """The position embedding for a (gh, gw) patch grid: the parameter itself at the native
        grid; at another one (data.resolution_schedule, or inference at another image size) its
        grid rows resampled bicubically, as fine-tuning at a new size does (interop/layouts.py),
        by a constant matrix, so the gradient flows into the native-grid parameter."""
        pe = self.positional_embedding  # (lead + g*g, W); lead 1: the class token's row
        if grid == (self.grid, self.grid):
            return pe
        lead = int(self.pool == "cls")
        m = _resample_matrix(self.grid, grid).astype(pe.dtype)  # (gh*gw, g*g)
        return mx.concatenate([pe[:lead], m @ pe[lead:]])  # (lead + gh*gw, W)

    def __call__(self, images: mx.array, keep: mx.array | None = None) -> mx.array:
        """images (B, H, W, 3); keep: patch dropout's (B, K) indices of the patches to keep
        (training only, training/patch_dropout.py), None: all of them."""
        x = self.patch_embed(images)  # (B, N, W)
        if self.pool == "cls":
            cls = mx.broadcast_to(self.class_embedding, (x.shape[0], 1, x.shape[-1]))
            x = mx.concatenate([cls.astype(x.dtype), x], axis=1)  # (B, N+1, W)
        p = self.patch_embed.patch_size
        x = x + self.positions((images.shape[1] // p, images.shape[2] // p))
        if keep is not None:  # after the positions, before ln_pre, as open_clip's PatchDropout
            x = _keep_patches(x, keep, self.pool == "cls")  # (B, K (+1), W)
        x = self.transformer(self.ln_pre(x) if "ln_pre" in self else x)
        # class token: LayerNorm of token 0; map: LayerNorm of every token, then the pooling head
        x = self.ln_post(x[:, 0]) if self.pool == "cls" else self.attn_pool(self.ln_post(x))  # (B, W)
        return self.proj(x) if "proj" in self else x


class TextTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.text_width
        self.causal, self.pool = cfg.text_causal, cfg.text_pool
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = mx.zeros((cfg.context_length, width))
        self.transformer = _tower(cfg, "text")
        self.ln_final = LayerNorm(width, eps=cfg.layer_norm_eps)
        if cfg.text_proj == "proj":
            self.text_projection = nn.Linear(width, cfg.embed_dim, bias=False)
        elif cfg.text_proj == "head":
            self.head = nn.Linear(width, cfg.embed_dim)

    def __call__(self, tokens: mx.array) -> mx.array:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        x = self.ln_final(self.transformer(x, causal=self.causal))
        x = _pool_text(x, tokens, self.pool)  # (B, W)
        for name in ("text_projection", "head"):
            if name in self:
                return self[name](x)
        return x
