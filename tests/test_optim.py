"""Schedule values, weight-decay groups and the MLX schedule agreeing with the Python one."""

import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip.config import OptimConfig
from mlx_clip.training.optim import build_optimizer, mx_schedule
from mlx_clip.training.optim_rules import decays, lr_at


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-5)  # stays at the floor
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_no_warmup():
    cfg = OptimConfig(lr=2e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 100) == pytest.approx(2e-3)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)


def test_mlx_schedule_equals_python_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=7)
    sched = mx_schedule(cfg, 50)
    for step in range(0, 60, 3):
        assert float(sched(mx.array(step))) == pytest.approx(lr_at(step, cfg, 50), rel=1e-5)


def test_weight_decay_groups():
    params = dict(tree_flatten(mlx_clip.create_model("tiny").parameters()))
    decayed = {k for k, v in params.items() if decays(k, v.ndim)}
    assert "visual.transformer.resblocks.0.attn.in_proj.weight" in decayed
    assert "text.token_embedding.weight" in decayed
    assert "visual.patch_embed.weight" in decayed
    for k in (
        "logit_scale",
        "visual.positional_embedding",
        "text.positional_embedding",
        "visual.class_embedding",
        "visual.ln_pre.weight",
        "text.transformer.resblocks.0.mlp.c_fc.bias",
    ):
        assert k not in decayed, k


def test_decay_applies_only_to_its_group():
    """With zero gradients, AdamW only shrinks decayed weights: by exactly (1 - lr * wd)."""
    model = mlx_clip.create_model("tiny")
    before = dict(tree_flatten(model.parameters()))
    cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5)
    opt = build_optimizer(cfg, 10)
    zeros = {k: mx.zeros_like(v) for k, v in before.items()}
    from mlx.utils import tree_unflatten

    opt.update(model, tree_unflatten(list(zeros.items())))
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():
        factor = 1 - 0.1 * 0.5 if decays(k, v.ndim) else 1.0
        assert mx.allclose(after[k], v * factor, atol=1e-7).item(), k
    assert math.isclose(float(after["logit_scale"]), float(before["logit_scale"]))
