"""ModelConfig: an architecture, what a checkpoint needs to be rebuilt (configs/models/*.yaml).

Framework-free: mlx_clip's and torch_ref's models are both built from it. Run settings (data,
loss, optimizer, ...) live in mlx_clip/config.py.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..schema import ConfigError, from_dict, load_yaml
from .init_table import LOGIT_SCALE_MAX

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "models"
# The MLP activations: kernels.ACTIVATIONS (and torch_ref.transformer's) implement exactly these.
# gelu_tanh is GELU's tanh approximation (torch GELU(approximate="tanh"), HF gelu_pytorch_tanh).
Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
# The towers' options (models/transformer.py): each Literal is the one list of its choices.
VisionPool = Literal["cls", "map"]  # class token (CLIP) or attention pooling (SigLIP's MAP head)
TextPool = Literal["argmax", "last", "first"]  # the EOT token (the largest id), position -1 or 0
TextProj = Literal["proj", "head", "none"]  # matrix without bias, Linear with bias, or none

# Bounds checked before anything is allocated, so that a typo or a hostile config file (a weights
# header, an HF config.json) is an error, not minutes of allocation. The size caps sit far above
# any published CLIP; the parameter bound (EVA-CLIP-18B is the largest) is the one that matters.
SIZE_LIMITS = dict(
    embed_dim=65536,
    image_size=4096,
    patch_size=4096,
    vision_width=65536,
    vision_layers=256,
    vision_heads=1024,
    context_length=65536,
    vocab_size=2**24,
    text_width=65536,
    text_layers=256,
    text_heads=1024,
)
SIZE_MINIMUMS = {  # (the least value, why) where it is more than 1
    "context_length": (2, " (room for the start and end tokens)"),
    "vocab_size": (3, " (the start and end tokens and one more)"),
}
MAX_PARAMETERS = 20 * 10**9
MAX_LOGIT_BIAS = 100.0  # SigLIP starts at -10
# Preprocessing (data/transforms.py ImagePreprocess acts on these): CLIP's mean/std are the defaults.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ResizeMode = Literal["shortest", "squash"]  # shorter side + centre crop (CLIP) | both sides (SigLIP)
Interpolation = Literal["bicubic", "bilinear", "nearest"]  # PIL's filters of those names


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
    vision_pool: VisionPool = "cls"
    patch_bias: bool = False  # the patch embedding's bias (SigLIP has one)
    vision_pre_norm: bool = True  # ln_pre before the transformer (SigLIP has none)
    vision_mlp_dim: int | None = None  # the MLP's hidden width; None: vision_width * mlp_ratio
    vision_proj: bool = True  # False: no projection, the tower's width is embed_dim
    vision_proj_bias: bool = False  # a bias on the image projection (timm's head, MobileCLIP2-L/14)
    # FLIP's patch dropout: training steps keep a random (1 - p) of each image's patches (the class
    # token always), evaluation all of them; no weight depends on it (training/patch_dropout.py)
    patch_dropout: float = 0.0
    # text tower
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int | None = None  # None: text_width * mlp_ratio
    text_causal: bool = True  # False: bidirectional attention (SigLIP, MobileCLIP2)
    text_pool: TextPool = "argmax"
    text_proj: TextProj = "proj"
    # shared
    mlp_ratio: float = 4.0
    activation: Activation = "quick_gelu"
    # Per-tower overrides of `activation` (None: the shared one): open_clip's SigLIP 2 configs pair
    # timm's exact-GELU image tower with a tanh-GELU text tower.
    vision_activation: Activation | None = None
    text_activation: Activation | None = None
    layer_norm_eps: float = 1e-5
    # Temperature and bias at init: logit_scale = init_logit_scale (None: log(1/0.07), CLIP's);
    # a learnable logit_bias exists only when init_logit_bias is set (SigLIP: log 10 and -10).
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    # Preprocessing: the pixels the model expects (data/transforms.py ImagePreprocess); CLIP's by default.
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_MEAN))  # RGB, of [0, 1] values
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_STD))
    resize_mode: ResizeMode = "shortest"
    interpolation: Interpolation = "bicubic"

    def __post_init__(self):
        for name in ("image_mean", "image_std"):  # a tuple (ImagePreprocess's) is the same list
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))

    def validate(self, where: str = "model") -> None:
        """Refuse a config that cannot be built, or that would allocate absurd sizes, before any
        array exists; each message names `where`.field."""
        checked = from_dict(ModelConfig, asdict(self), prefix=where)  # the YAML loader's type checks
        for f in fields(self):
            if getattr(checked, f.name) != getattr(self, f.name):  # numeric text: YAML's leniency only
                raise ConfigError(f"{where}.{f.name}: expected a number, got {getattr(self, f.name)!r}")
        for name, limit in SIZE_LIMITS.items():
            value, low = getattr(self, name), SIZE_MINIMUMS.get(name, (1, ""))
            if value < low[0]:
                need = "positive" if low[0] == 1 else f"at least {low[0]}{low[1]}"
                raise ConfigError(f"{where}.{name} must be {need}, got {value}")
            if value > limit:
                raise ConfigError(f"{where}.{name}={value} is above the limit {limit}: a typo?")
        self._check_shapes(where)
        self._check_preprocess(where)
        n = self.num_parameters
        if n > MAX_PARAMETERS:
            raise ConfigError(
                f"{where}: this architecture has about {n / 1e9:.3g} billion parameters, above the "
                f"limit of {MAX_PARAMETERS / 1e9:g} billion; check the sizes (widths, layers, "
                "image_size / patch_size, vocab_size)"
            )

    def _check_shapes(self, where: str) -> None:
        # A remainder is SigLIP's (384 px, 14 px patches: the stride-p conv leaves out the last 6
        # pixel rows and columns); in a class-token model it is refused as the likely typo.
        if self.image_size % self.patch_size and (
            self.vision_pool == "cls" or self.image_size < self.patch_size
        ):
            raise ConfigError(
                f"{where}.image_size={self.image_size} is not divisible by "
                f"{where}.patch_size={self.patch_size}: the ViT needs a whole grid of patches "
                f"(only a vision_pool 'map' model may leave out a remainder, as SigLIP's 384 px / 14 px)"
            )
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ConfigError(
                    f"{where}.{tower}_width={width} is not divisible by "
                    f"{where}.{tower}_heads={heads}: each head needs an equal slice"
                )
        for tower in ("vision", "text"):
            dim, width = getattr(self, f"{tower}_mlp_dim"), getattr(self, f"{tower}_width")
            if dim is not None and not 1 <= dim <= 64 * width:
                raise ConfigError(
                    f"{where}.{tower}_mlp_dim must be in [1, 64 * {tower}_width = {64 * width}], got {dim}"
                )
        if not 0 < self.mlp_ratio <= 64 or self.mlp_hidden("vision") < 1 or self.mlp_hidden("text") < 1:
            raise ConfigError(
                f"{where}.mlp_ratio must be in (0, 64] and give an MLP of >= 1 unit, got {self.mlp_ratio}"
            )
        self._check_projections(where)
        if self.vision_proj_bias and not self.vision_proj:
            raise ConfigError(
                f"{where}.vision_proj_bias needs {where}.vision_proj (a projection to put it on)"
            )
        if not 0 <= self.patch_dropout < 1:
            raise ConfigError(
                f"{where}.patch_dropout must be in [0, 1) (the share of image patches a training "
                f"step drops; 0: none), got {self.patch_dropout}"
            )
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"{where}.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")
        # The model clamps the logit scale at log(100); the loss' temperature range is [0.01, 100].
        if self.init_logit_scale is not None and not abs(self.init_logit_scale) <= LOGIT_SCALE_MAX:
            raise ConfigError(
                f"{where}.init_logit_scale must be in [-{LOGIT_SCALE_MAX:.4f}, {LOGIT_SCALE_MAX:.4f}] "
                f"(the log of a logit scale in [0.01, 100]), got {self.init_logit_scale}"
            )
        if self.init_logit_bias is not None and not abs(self.init_logit_bias) <= MAX_LOGIT_BIAS:
            raise ConfigError(
                f"{where}.init_logit_bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {self.init_logit_bias}"
            )

    def _check_projections(self, where: str) -> None:
        """Without a projection a tower's output is the feature, so its width must be embed_dim."""
        for off, tower, setting in (
            (not self.vision_proj, "vision", "vision_proj is false"),
            (self.text_proj == "none", "text", "text_proj is 'none'"),
        ):
            width = getattr(self, f"{tower}_width")
            if off and width != self.embed_dim:
                raise ConfigError(
                    f"{where}.{setting}, so the {tower} tower's output is the feature: "
                    f"{where}.{tower}_width={width} must equal {where}.embed_dim={self.embed_dim} "
                    "(or turn the projection on)"
                )

    def mlp_hidden(self, tower: str) -> int:
        """The MLP's hidden width in a tower ("vision" or "text"): its mlp_dim, else width * mlp_ratio."""
        dim = getattr(self, f"{tower}_mlp_dim")
        return dim if dim is not None else int(getattr(self, f"{tower}_width") * self.mlp_ratio)

    def tower_activation(self, tower: str) -> Activation:
        """The MLP activation of a tower ("vision" or "text"): its override, else `activation`."""
        return getattr(self, f"{tower}_activation") or self.activation

    @property
    def num_parameters(self) -> int:
        """The parameter count of the model this config builds (models/transformer.py), from the
        sizes alone: validate bounds it before anything is allocated."""

        def linear(n_in: int, n_out: int, bias: bool = True) -> int:
            return n_in * n_out + bias * n_out

        def attn_mlp(width: int, hidden: int) -> int:  # qkv and out projections, MLP in and out
            attn = linear(width, 3 * width) + linear(width, width)
            return attn + linear(width, hidden) + linear(hidden, width)

        def block(width: int, hidden: int) -> int:  # + 2 LayerNorms
            return 2 * 2 * width + attn_mlp(width, hidden)

        v, t, e = self.vision_width, self.text_width, self.embed_dim
        hv, ht = self.mlp_hidden("vision"), self.mlp_hidden("text")
        vision = self.vision_layers * block(v, hv) + 2 * v  # + ln_post
        vision += linear(3 * self.patch_size**2, v, self.patch_bias)
        vision += 2 * v * self.vision_pre_norm  # ln_pre
        if self.vision_pool == "cls":  # class token and its position
            vision += v + (self.num_patches + 1) * v
        else:  # positions; the pooling head's probe, attention, LayerNorm and MLP
            vision += self.num_patches * v + v + attn_mlp(v, hv) + 2 * v
        vision += linear(v, e, bias=self.vision_proj_bias) * self.vision_proj
        text = self.text_layers * block(t, ht) + 2 * t  # + ln_final
        text += (self.vocab_size + self.context_length) * t  # token and position embeddings
        text += {"proj": linear(t, e, bias=False), "head": linear(t, e), "none": 0}[self.text_proj]
        return vision + text + 1 + (self.init_logit_bias is not None)  # logit scale (and bias)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        """A mapping of fields (a YAML file's, a safetensors header's) -> a checked ModelConfig."""
        cfg = from_dict(cls, data, prefix=where)
        cfg.validate(where)
        return cfg

    @property
    def num_patches(self) -> int:
        """The patch grid's size; pixels past the last whole patch are not seen (as a stride-p conv)."""
        return (self.image_size // self.patch_size) ** 2

    def _check_preprocess(self, where: str) -> None:
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"{where}.{name} must be 3 numbers (R, G, B), got {list(value)}")
        if not all(0 <= m <= 1 for m in self.image_mean):
            raise ConfigError(
                f"{where}.image_mean must be in [0, 1] (pixels scaled to [0, 1]; divide 0-255 values by "
                f"255), got {list(self.image_mean)}"
            )
        if not all(s > 0 for s in self.image_std):
            raise ConfigError(
                f"{where}.image_std must be positive (it divides the pixels), got {list(self.image_std)}"
            )


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
