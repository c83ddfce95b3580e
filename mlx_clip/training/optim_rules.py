"""The optimiser's rules, framework-free: which tensors decay or are locked, each one's base
learning rate (tower rate x layer-wise decay), and the learning-rate curve. mlx_clip.training.optim
builds MLX's optimizer from them and torch_ref.train PyTorch's AdamW, so both train the same groups
on the same schedule.
"""

from __future__ import annotations

import math

from ..config import OptimConfig
from ..models.config import ModelConfig

# 2-D tensors that are embeddings-as-positions, not projections: no weight decay.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def decays(path: str, ndim: int) -> bool:
    """Weight decay applies to matrices only: not gains, biases, positions or logit_scale."""
    return ndim >= 2 and not path.endswith(NO_DECAY_NAMES)


def tower_lr(path: str, cfg: OptimConfig) -> float:
    """Base learning rate of a parameter: optim.image_lr / text_lr for the towers, else optim.lr."""
    if path.startswith("visual.") and cfg.image_lr is not None:
        return cfg.image_lr
    if path.startswith("text.") and cfg.text_lr is not None:
        return cfg.text_lr
    return cfg.lr


# The parts of a tower before its first residual block (timm's "stem" group): layer 0 of the decay.
EMBEDDINGS = {
    "visual.": ("patch_embed", "class_embedding", "positional_embedding", "ln_pre"),
    "text.": ("token_embedding", "positional_embedding"),
}


def layer_decay_on(cfg: OptimConfig) -> bool:
    return any(d not in (None, 1.0) for d in (cfg.image_layer_decay, cfg.text_layer_decay))


def _layer_decays(cfg: OptimConfig, mcfg: ModelConfig) -> list[tuple[str, float, int]]:
    """(tower prefix, decay, residual blocks) of each tower with layer-wise decay on."""
    towers = (
        ("visual.", cfg.image_layer_decay, mcfg.vision_layers),
        ("text.", cfg.text_layer_decay, mcfg.text_layers),
    )
    return [(prefix, decay, layers) for prefix, decay, layers in towers if decay not in (None, 1.0)]


def layer_scale(path: str, cfg: OptimConfig, mcfg: ModelConfig) -> float:
    """The layer-wise decay factor of a parameter (timm's param_groups_layer_decay on a ViT: the
    stem is layer 0, block i layer i + 1, the rest layer L + 1, and layer n gets decay ** (L + 1 - n)):
    residual block i of L -> decay ** (L - i); embeddings -> decay ** (L + 1); the final norm,
    pooling head and projection, and parameters outside the towers -> 1."""
    for prefix, decay, layers in _layer_decays(cfg, mcfg):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split(".")
        if parts[:2] == ["transformer", "resblocks"]:
            return decay ** (layers - int(parts[2]))
        return decay ** (layers + 1) if parts[0] in EMBEDDINGS[prefix] else 1.0
    return 1.0


def param_lr(path: str, cfg: OptimConfig, mcfg: ModelConfig | None = None) -> float:
    """Base learning rate of a parameter: its tower's rate times its layer-wise decay factor
    (`mcfg`, the architecture, is needed only with optim.*_layer_decay on)."""
    lr = tower_lr(path, cfg)
    if not layer_decay_on(cfg):
        return lr
    if mcfg is None:
        raise ValueError("optim.image_layer_decay / text_layer_decay need the model's config (mcfg)")
    return lr * layer_scale(path, cfg, mcfg)


def base_rates(cfg: OptimConfig, mcfg: ModelConfig | None = None) -> list[float]:
    """Every base learning rate param_lr can give, sorted: one optimizer group each."""
    rates = {cfg.lr, cfg.image_lr or cfg.lr, cfg.text_lr or cfg.lr}
    for prefix, decay, layers in _layer_decays(cfg, mcfg) if layer_decay_on(cfg) else []:
        lr = cfg.image_lr if prefix == "visual." else cfg.text_lr
        rates |= {(lr or cfg.lr) * decay**n for n in range(1, layers + 2)}
    return sorted(rates)


def is_locked(path: str, cfg: OptimConfig, mcfg: ModelConfig) -> bool:
    """Locked (frozen) parameters of LiT-style fine-tuning: a tower but its last N blocks + head."""
    for prefix, locked, unlocked, layers, head in (
        (
            "visual.",
            cfg.lock_image,
            cfg.lock_image_unlocked_layers,
            mcfg.vision_layers,
            ("ln_post", "attn_pool", "proj"),
        ),
        (
            "text.",
            cfg.lock_text,
            cfg.lock_text_unlocked_layers,
            mcfg.text_layers,
            ("ln_final", "text_projection", "head"),
        ),
    ):
        if not (locked and path.startswith(prefix)):
            continue
        parts = path[len(prefix) :].split(".")
        if unlocked and parts[0] in head:
            return False
        if unlocked and parts[:2] == ["transformer", "resblocks"] and int(parts[2]) >= layers - unlocked:
            return False
        return True
    return False


PYTHON_OPS = (min, math.cos, lambda cond, a, b: a if cond else b)


def learning_rate(step, cfg: OptimConfig, total_steps: int, base_lr: float | None = None, ops=PYTHON_OPS):
    """Linear warmup from 0 to lr over warmup_steps, then optim.schedule: cosine decay to min_lr
    at total_steps; const; or const-cooldown (open_clip's): const, then over the last
    cooldown_steps lr -> cooldown_end_lr as (1 - progress) ** cooldown_power.

    With base_lr (a tower's or layer's own rate) the whole curve, floor included, scales by
    base_lr / lr. The one formula for every framework: `ops` = (minimum, cos, where) of plain
    Python (floats, the default) or of an array library (optim.mx_schedule runs it inside the
    compiled step).
    """
    minimum, cos, where = ops
    warmup = cfg.warmup_steps
    scale = 1.0 if base_lr is None else base_lr / cfg.lr
    warm = cfg.lr * (step + 1) / max(1, warmup)
    if cfg.schedule == "const":
        after = cfg.lr
    elif cfg.schedule == "const-cooldown":
        start = total_steps - cfg.cooldown_steps
        progress = minimum(1.0, (step - start) / max(1, cfg.cooldown_steps))
        remaining = minimum(1.0, 1 - progress)  # in [0, 1]: before the cooldown too (no overflow)
        end = cfg.cooldown_end_lr
        after = where(step < start, cfg.lr, end + (cfg.lr - end) * remaining**cfg.cooldown_power)
    else:
        progress = minimum(1.0, (step - warmup) / max(1, total_steps - warmup))
        after = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + cos(math.pi * progress))
    return scale * (where(step < warmup, warm, after) if warmup else after)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, base_lr: float | None = None) -> float:
    """The learning rate of step `step` (0-based), as a Python float."""
    return learning_rate(step, cfg, total_steps, base_lr)
