"""PyTorch mirror of mlx_clip/models/transformer.py: same classes, same attribute names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlx_clip.models.config import Activation, ModelConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact erf form, as mlx_clip.models.transformer.gelu


ACTIVATIONS: dict[Activation, Callable] = {"quick_gelu": quick_gelu, "gelu": gelu}


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


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: Activation):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, activation, eps) for _ in range(layers)]
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
    """Stride-p conv without bias; weight in torch layout (out, in, kh, kw)."""

    def __init__(self, patch_size: int, width: int, in_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        scale = (in_channels * patch_size * patch_size) ** -0.5
        self.weight = nn.Parameter(
            torch.empty(width, in_channels, patch_size, patch_size).uniform_(-scale, scale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=self.patch_size)  # (B, W, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, W)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.vision_width
        scale = width**-0.5
        self.patch_embed = PatchEmbed(cfg.patch_size, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(
            width, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio, cfg.activation, cfg.layer_norm_eps
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, N+1, W)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x)
        return self.proj(self.ln_post(x[:, 0]))


class TextTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, width))
        self.transformer = Transformer(
            width, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, cfg.activation, cfg.layer_norm_eps
        )
        self.ln_final = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=True))
        eot = tokens.argmax(dim=-1)  # (B,)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
        return self.text_projection(x)
