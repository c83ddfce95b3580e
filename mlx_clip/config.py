"""Configuration: dataclasses, strict YAML loading and dotted CLI overrides.

Framework-free on purpose: torch_ref, the benchmarks and the CLIs all read the
same files through this module, so there is exactly one config path:
YAML -> dataclass -> constructor.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message says which and why."""


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
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

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
        if self.activation not in ("quick_gelu", "gelu"):
            raise ConfigError(f"{where}.activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.mlp_ratio <= 0 or int(self.vision_width * self.mlp_ratio) <= 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"{where}.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------
# Strict dict -> dataclass conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-5" (no dot) as a string; accept numeric text for floats.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    return value


def unknown_key_error(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(sorted(valid))})")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise unknown_key_error(key, valid, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_config(arch: str | dict | ModelConfig) -> ModelConfig:
    """Resolve an architecture name, YAML path or dict of fields to a validated ModelConfig."""
    if isinstance(arch, ModelConfig):
        cfg = arch
    elif isinstance(arch, dict):
        cfg = from_dict(ModelConfig, arch, prefix="model")
    elif isinstance(arch, (str, Path)):
        path = Path(arch)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            data = load_yaml(path)
        elif (MODEL_CONFIG_DIR / f"{arch}.yaml").is_file():
            data = load_yaml(MODEL_CONFIG_DIR / f"{arch}.yaml")
        else:
            names = available_models()
            close = difflib.get_close_matches(str(arch), names, n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown architecture '{arch}'{hint} (available: {', '.join(names)})")
        try:
            cfg = from_dict(ModelConfig, data, prefix="model")
        except ConfigError as e:
            raise ConfigError(f"{arch}: {e}") from None
    else:
        raise ConfigError(f"arch must be a name, a path or a dict, got {type(arch).__name__}")
    cfg.validate()
    return cfg


__all__ = [
    "ConfigError",
    "ModelConfig",
    "available_models",
    "from_dict",
    "load_yaml",
    "model_config",
    "to_dict",
]
