"""PyTorch mirror of mlx_clip/models/transformer.py: same classes, same attribute names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlx_clip.models.config import Activation, ModelConfig, TextPool


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact erf form, as mlx_clip.models.transformer.gelu


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # HF gelu_pytorch_tanh, as mlx_clip's gelu_tanh


ACTIVATIONS: dict[Activation, Callable] = {"quick_gelu": quick_gelu, "gelu": gelu, "gelu_tanh": gelu_tanh}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        h = self.heads
        qkv = self.in_proj(x).reshape(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)  # (3, B, h, L, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=(D // h) ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))

    def cross(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Queries from x (B, L, D), keys and values from context (B, S, D)."""
        B, L, D = x.shape
        S, h = context.shape[1], self.heads
        w, b = self.in_proj.weight, self.in_proj.bias
        q = F.linear(x, w[:D], b[:D]).reshape(B, L, h, D // h).transpose(1, 2)  # (B, h, L, hd)
        kv = F.linear(context, w[D:], b[D:]).reshape(B, S, 2, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], scale=(D // h) ** -0.5)  # (B, h, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: Activation):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, hidden, activation, eps) for _ in range(layers)]
        )
        self.grad_checkpointing = False  # set by CLIP.set_grad_checkpointing

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x


class PatchEmbed(nn.Module):
    """Stride-p conv (with a bias if asked); weight in torch layout (out, in, kh, kw)."""

    def __init__(self, patch_size: int, width: int, in_channels: int = 3, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        scale = (in_channels * patch_size * patch_size) ** -0.5
        self.weight = nn.Parameter(
            torch.empty(width, in_channels, patch_size, patch_size).uniform_(-scale, scale)
        )
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, stride=self.patch_size)  # (B, W, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, W)


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling (MAP), as mlx_clip's."""

    def __init__(self, width: int, heads: int, hidden: int, activation: Activation, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = Attention(width, heads)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn.cross(self.probe.to(x.dtype).expand(x.shape[0], -1, -1), x)  # (B, 1, W)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


def _pool_text(x: torch.Tensor, tokens: torch.Tensor, pool: TextPool) -> torch.Tensor:
    if pool == "last":
        return x[:, -1]
    if pool == "first":
        return x[:, 0]
    eot = tokens.argmax(dim=-1)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)


def _keep_patches(x: torch.Tensor, keep: torch.Tensor, has_cls: bool) -> torch.Tensor:
    if has_cls:
        return torch.cat([x[:, :1], _keep_patches(x[:, 1:], keep, False)], dim=1)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], keep.long()]  # (B, K, W)


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
            self.class_embedding = nn.Parameter(scale * torch.randn(width))
        positions = cfg.num_patches + (self.pool == "cls")
        self.positional_embedding = nn.Parameter(scale * torch.randn(positions, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps) if cfg.vision_pre_norm else None
        self.transformer = _tower(cfg, "vision")
        self.ln_post = nn.LayerNorm(width, eps=eps)
        if self.pool == "map":
            self.attn_pool = AttentionPool(
                width, cfg.vision_heads, cfg.mlp_hidden("vision"), cfg.tower_activation("vision"), eps
            )
        self.proj = nn.Linear(width, cfg.embed_dim, bias=cfg.vision_proj_bias) if cfg.vision_proj else None

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, W)
        if self.pool == "cls":
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, N+1, W)
        x = x + self.positional_embedding
        if keep is not None:  # patch dropout: after the positions, before ln_pre
            x = _keep_patches(x, keep, self.pool == "cls")  # (B, K (+1), W)
        x = self.transformer(self.ln_pre(x) if self.ln_pre is not None else x)
        x = self.ln_post(x[:, 0]) if self.pool == "cls" else self.attn_pool(self.ln_post(x))  # (B, W)
        return self.proj(x) if self.proj is not None else x


class TextTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.text_width
        self.causal, self.pool = cfg.text_causal, cfg.text_pool
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, width))
        self.transformer = _tower(cfg, "text")
        self.ln_final = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        if cfg.text_proj == "proj":
            self.text_projection = nn.Linear(width, cfg.embed_dim, bias=False)
        elif cfg.text_proj == "head":
            self.head = nn.Linear(width, cfg.embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=self.causal))
        x = _pool_text(x, tokens, self.pool)  # (B, W)
        for name in ("text_projection", "head"):
            if hasattr(self, name):
                return getattr(self, name)(x)
        return x
