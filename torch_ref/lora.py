"""PyTorch mirror of mlx_clip/models/lora.py: the same adapters on the same linears, same keys
(<linear>.weight / .bias, .lora_a (rank, in), .lora_b (out, rank)); see models/lora_config.py."""

from __future__ import annotations

import torch
from torch import nn

from mlx_clip.models.lora_config import LoraConfig, frozen_by_lora, lora_a_init, lora_targets


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ lora_a.T @ lora_b.T (a float base)."""

    def __init__(self, linear: nn.Linear, lora_a: torch.Tensor, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        rank = lora_a.shape[0]
        self.lora_a = nn.Parameter(lora_a.to(linear.weight.device))  # (rank, in)
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T
        return nn.functional.linear(x, self.weight, self.bias) + self.scale * z


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int = 0) -> list[str]:
    """Wrap the targeted linears with LoRALinear (A from lora_a_init, as mlx_clip) and freeze what
    LoRA freezes, in place; returns the wrapped paths."""
    paths = lora_targets(model.config, lora)
    for i, path in enumerate(paths):
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, name)
        lora_a = torch.from_numpy(lora_a_init(seed, i, lora.rank, linear.in_features))
        setattr(parent, name, LoRALinear(linear, lora_a, lora.alpha, lora.dropout))
    for path, p in model.named_parameters():
        if frozen_by_lora(path, lora):
            p.requires_grad_(False)
    return paths
