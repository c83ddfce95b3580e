"""PyTorch mirror of mlx_clip/models/model.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlx_clip.models.config import ModelConfig, model_config

from .device import pick_device
from .transformer import TextTransformer, VisionTransformer

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def logit_scale_init(cfg: ModelConfig) -> float:
    return LOGIT_SCALE_INIT if cfg.init_logit_scale is None else float(cfg.init_logit_scale)


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

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images: (B, 3, H, W) float, already normalized with the CLIP mean/std."""
        x = self.visual(images)
        return F.normalize(x, dim=-1, eps=0) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1, eps=0) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        return image_features, text_features, self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


@torch.no_grad()
def init_weights(model: CLIP) -> CLIP:
    """Same scheme as mlx_clip.models.model.init_weights (the RNG streams differ)."""
    cfg = model.config
    for name, p in model.named_parameters():
        tower, _, rest = name.partition(".")
        parts = rest.split(".")
        if name == "logit_scale":
            p.fill_(logit_scale_init(cfg))
        elif name == "logit_bias":
            p.fill_(float(cfg.init_logit_bias))
        elif parts[-1] == "bias" or "ln_" in rest:
            p.fill_(1.0 if parts[-1] == "weight" else 0.0)
        elif "resblocks" in parts:
            width, layers = (
                (cfg.vision_width, cfg.vision_layers)
                if tower == "visual"
                else (cfg.text_width, cfg.text_layers)
            )
            proj = width**-0.5 * (2 * layers) ** -0.5
            std = {"in_proj": width**-0.5, "out_proj": proj, "c_fc": (2 * width) ** -0.5, "c_proj": proj}
            nn.init.normal_(p, std=std[parts[-2]])
        elif name == "text.token_embedding.weight":
            nn.init.normal_(p, std=0.02)
        elif name == "text.positional_embedding":
            nn.init.normal_(p, std=0.01)
        elif name == "text.text_projection.weight":
            nn.init.normal_(p, std=cfg.text_width**-0.5)
        elif tower == "visual" and parts[0] in ("class_embedding", "positional_embedding", "proj"):
            nn.init.normal_(p, std=cfg.vision_width**-0.5)
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
