"""How CLIP's parameters start: one table, framework-free, for mlx_clip and torch_ref alike.

CLIP / open_clip initialisation: a normal with a per-layer-type std, LayerNorm gains at 1, biases
at 0, the temperature at log(1/0.07) (or the configured scale, and SigLIP's bias); SigLIP's
attention-pooling head follows timm / HF (lecun normal). Each framework
draws its own random numbers from the rule; only the RNG streams differ.
"""

from __future__ import annotations

import math

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)  # the logit scale is clamped at 100 (temperature >= 0.01)


def logit_scale_init(cfg) -> float:
    return LOGIT_SCALE_INIT if cfg.init_logit_scale is None else float(cfg.init_logit_scale)


def init_rule(path: str, cfg) -> tuple[str, float] | None:
    """("fill", value) or ("normal", std) for the parameter at `path` (a checkpoint key) of a model
    with ModelConfig `cfg`; None keeps the layer's own default (the patch embedding's fan-in
    uniform init)."""
    tower, _, rest = path.partition(".")
    parts = rest.split(".")
    if path == "logit_scale":
        return "fill", logit_scale_init(cfg)
    if path == "logit_bias":
        return "fill", float(cfg.init_logit_bias)
    if parts[-1] == "bias" or "ln_" in rest or parts[-2:-1] == ["norm"]:
        return "fill", 1.0 if parts[-1] == "weight" else 0.0  # LayerNorm gains 1, biases 0
    if parts[0] == "attn_pool":
        # SigLIP's pooling head (timm / HF): the probe at std width^-1/2, its linears lecun
        # normal (std fan_in^-1/2)
        fan_in = cfg.mlp_hidden("vision") if parts[-2] == "c_proj" else cfg.vision_width
        return "normal", fan_in**-0.5
    if "resblocks" in parts:
        width, layers = (
            (cfg.vision_width, cfg.vision_layers) if tower == "visual" else (cfg.text_width, cfg.text_layers)
        )
        proj = width**-0.5 * (2 * layers) ** -0.5
        std = {"in_proj": width**-0.5, "out_proj": proj, "c_fc": (2 * width) ** -0.5, "c_proj": proj}
        return "normal", std[parts[-2]]
    if path == "text.token_embedding.weight":
        return "normal", 0.02
    if path == "text.positional_embedding":
        return "normal", 0.01
    if path in ("text.text_projection.weight", "text.head.weight"):
        return "normal", cfg.text_width**-0.5
    if tower == "visual" and parts[0] in ("class_embedding", "positional_embedding", "proj"):
        return "normal", cfg.vision_width**-0.5
    return None
