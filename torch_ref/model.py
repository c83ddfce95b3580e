"""PyTorch mirror of mlx_clip/models/model.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlx_clip.models.config import ModelConfig, model_config
from mlx_clip.models.init_table import LOGIT_SCALE_MAX, init_rule, logit_scale_init

from .device import pick_device
from .transformer import TextTransformer, VisionTransformer


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale_init(cfg)))
        if cfg.init_logit_bias is not None:  # SigLIP's learnable bias
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def encode_image(
        self, images: torch.Tensor, normalize: bool = True, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images: (B, 3, H, W) float, already normalized with the CLIP mean/std; keep: patch
        dropout's (B, K) indices of the kept patches."""
        x = self.visual(images, keep)
        return F.normalize(x, dim=-1, eps=0) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1, eps=0) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None):
        image_features = self.encode_image(images, keep=keep)
        text_features = self.encode_text(tokens)
        return image_features, text_features, self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


@torch.no_grad()
def init_weights(model: CLIP) -> CLIP:
    """The table of mlx_clip/models/init_table.py (the RNG streams differ from MLX's)."""
    for name, p in model.named_parameters():
        rule = init_rule(name, model.config)
        if rule is None:
            continue
        kind, value = rule
        if kind == "fill":
            p.fill_(value)
        else:
            nn.init.normal_(p, std=value)
    return model


def create_model(
    arch: str | ModelConfig = "tiny", seed: int | None = 0, device: str | torch.device | None = None
) -> CLIP:
    """Build a CLIP on `device` (default: cuda, then mps, then cpu) from an architecture name, a YAML
    path or a ModelConfig, as mlx_clip.create_model."""
    cfg = arch if isinstance(arch, ModelConfig) else model_config(arch)
    cfg.validate()
    if seed is not None:
        torch.manual_seed(seed)
    return init_weights(CLIP(cfg)).to(pick_device(device))
