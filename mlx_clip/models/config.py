"""ModelConfig: an architecture, what a checkpoint needs to be rebuilt (configs/models/*.yaml).

Framework-free: mlx_clip's and torch_ref's models are both built from it. Run settings (data,
loss, optimizer, ...) live in mlx_clip/config.py.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..schema import ConfigError, from_dict, load_yaml

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "models"
# The MLP activations: kernels.ACTIVATIONS (and torch_ref.transformer's) implement exactly these.
Activation = Literal["quick_gelu", "gelu"]


@dataclass
class ModelConfig:
    """Architecture only: what a checkpoint needs to be rebuilt."""

    embed_dim: int = 512
    # vision tower
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    # text tower
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # shared
    mlp_ratio: float = 4.0
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Temperature and bias at init: logit_scale = init_logit_scale (None: log(1/0.07), CLIP's);
    # a learnable logit_bias exists only when init_logit_bias is set (SigLIP: log 10 and -10).
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None

    def validate(self, where: str = "model") -> None:
        for name in (
            "embed_dim",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "context_length",
            "vocab_size",
            "text_width",
            "text_layers",
            "text_heads",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{where}.image_size={self.image_size} is not divisible by "
                f"{where}.patch_size={self.patch_size}: the ViT needs a whole grid of patches"
            )
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ConfigError(
                    f"{where}.{tower}_width={width} is not divisible by "
                    f"{where}.{tower}_heads={heads}: each head needs an equal slice"
                )
        if self.mlp_ratio <= 0 or int(self.vision_width * self.mlp_ratio) <= 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"{where}.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        """A mapping of fields (a YAML file's, a safetensors header's) -> a checked ModelConfig."""
        cfg = from_dict(cls, data, prefix=where)
        cfg.validate(where)
        return cfg

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_config(name_or_path: str | Path) -> ModelConfig:
    """An architecture name (configs/models/NAME.yaml) or a YAML file's path -> a validated ModelConfig.

    A dict of fields is ModelConfig.from_dict's; a ModelConfig needs no resolving."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data = load_yaml(path)
    elif (MODEL_CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        data = load_yaml(MODEL_CONFIG_DIR / f"{name_or_path}.yaml")
    else:
        names = available_models()
        close = difflib.get_close_matches(str(name_or_path), names, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown architecture '{name_or_path}'{hint} (available: {', '.join(names)})")
    try:
        cfg = from_dict(ModelConfig, data, prefix="model")
    except ConfigError as e:
        raise ConfigError(f"{name_or_path}: {e}") from None
    cfg.validate()
    return cfg


__all__ = ["MODEL_CONFIG_DIR", "ModelConfig", "available_models", "model_config"]
