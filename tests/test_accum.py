"""Gradient caching (mlx_clip/training/accum.py, torch_ref/accum.py): K micro-batches of B/K give the
gradients, update and loss of one batch of B.

Gradients are compared per tensor with a relative tolerance plus an absolute one scaled to the
tensor's largest entry: |accum - plain| <= 1e-5 * |plain| + 1e-5 * max|plain|, elementwise. Only
the order of float32 sums differs (over micro-batches instead of over the batch), which costs a
few ulps of the largest entries: the worst seen is 2.1e-6 * max|plain|.
"""

# ruff: noqa: I001  (mlx_clip must be imported before mlx.core: it picks the BLAS on Linux)
import math

import mlx_clip  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from dist_grad_worker import ARCH, BATCH, batch
from mlx.utils import tree_flatten
from conftest import train_run

from mlx_clip.training.accum import make_accum_grad_fn
from mlx_clip.config import load_config
from mlx_clip.models.model import create_model
from mlx_clip.training.optim import build_optimizer, lock_parameters
from mlx_clip.training.build import make_grad_fn, make_loss_parts, make_step

RTOL = 1e-5  # relative, elementwise, plus RTOL * max|plain| absolute per tensor

LOSSES = {"clip": [], "siglip": [("loss.type", "siglip")]}  # siglip: a model with a logit_bias


def setup(*overrides):
    cfg = load_config(None, [*ARCH, ("data.batch_size", str(BATCH)), *overrides])
    model = create_model(cfg.model_config(), seed=0)
    locked = lock_parameters(model, cfg.optim)
    images, tokens = batch(cfg)
    return cfg, model, locked, mx.array(images), mx.array(tokens)


def assert_trees_close(plain: dict, accum: dict, rtol: float = RTOL) -> float:
    """Same leaves, each within rtol (relative + scaled absolute); returns the worst max|d| / max|plain|."""
    assert plain.keys() == accum.keys()
    worst = 0.0
    for key, a in plain.items():
        a, b = np.array(a), np.array(accum[key])
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale, err_msg=key)
        worst = max(worst, float(np.abs(a - b).max()) / (scale or 1.0))
    return worst


@pytest.mark.parametrize("locked", [False, True], ids=["all", "lock_image"])
@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_equal_whole_batch(loss, locked):
    """K x (B/K) through accum's three phases == one batch of B, for K = 2 and 4; before any update."""
    cfg, model, locked_keys, images, tokens = setup(*LOSSES[loss], ("optim.lock_image", str(locked).lower()))
    plain_loss, plain = make_grad_fn(model, cfg)(images, tokens)
    plain = dict(tree_flatten(plain))
    mx.eval(plain_loss, plain)
    if loss == "siglip":
        assert "logit_bias" in plain and abs(plain["logit_bias"].item()) > 0
    assert "logit_scale" in plain
    assert bool(locked_keys) == locked == (not any(k.startswith("visual.") for k in plain))
    for k in (2, 4):
        accum_loss, grads = make_accum_grad_fn(model, k, *make_loss_parts(cfg))(images, tokens)
        assert accum_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
        assert_trees_close(plain, dict(tree_flatten(grads)))


@pytest.mark.parametrize("locked", [False, True], ids=["all", "lock_image"])
@pytest.mark.parametrize("loss", LOSSES)
def test_step_updates_like_the_plain_step(loss, locked):
    """The trainer's step with optim.accum_steps 2 (and 4) leaves the same weights and optimizer
    state after two steps as the plain step, and reports the same loss and gradient norm."""

    def two_steps(*overrides):
        lock = ("optim.lock_image", str(locked).lower())
        cfg, model, _, images, tokens = setup(*LOSSES[loss], lock, *overrides)
        optimizer = build_optimizer(cfg.optim, 10)
        optimizer.init(model.trainable_parameters())
        step, state = make_step(model, optimizer, cfg)
        for _ in range(2):
            loss_v, grad_norm = step(images, tokens)
            mx.eval(state, loss_v, grad_norm)
        return dict(tree_flatten(model.parameters())), dict(tree_flatten(optimizer.state)), loss_v, grad_norm

    weights, opt_state, plain_loss, plain_norm = two_steps()
    for k in ("2", "4"):
        w, o, loss_v, grad_norm = two_steps(("optim.accum_steps", k))
        assert loss_v.item() == pytest.approx(plain_loss.item(), rel=1e-6)
        assert grad_norm.item() == pytest.approx(plain_norm.item(), rel=1e-5)
        assert weights.keys() == w.keys() and opt_state.keys() == o.keys()
        # AdamW moves a weight by <= lr (1e-3) per step; the differences are ~1e-8.
        for key in weights:
            np.testing.assert_allclose(
                np.array(w[key]), np.array(weights[key]), rtol=0, atol=1e-6, err_msg=key
            )
        assert_trees_close(opt_state, o, rtol=1e-4)  # Adam's moments (the step count is exact)


def test_bfloat16_accum_is_finite_and_close():
    cfg, model, _, images, tokens = setup(("train.precision", "bfloat16"))
    plain_loss, _ = make_grad_fn(model, cfg)(images, tokens)
    loss, grads = make_accum_grad_fn(model, 2, *make_loss_parts(cfg))(images, tokens)
    assert math.isfinite(loss.item())
    assert all(bool(mx.all(mx.isfinite(g))) and g.dtype == mx.float32 for _, g in tree_flatten(grads))
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-2)  # bf16 rounding, not exactness


def test_indivisible_batch_is_refused():
    cfg, model, _, images, tokens = setup()
    with pytest.raises(ValueError, match="not divisible"):
        make_accum_grad_fn(model, 3, *make_loss_parts(cfg))(images, tokens)


def test_training_run_with_accum_steps(tmp_path):
    out, summary = train_run(
        tmp_path, "accum", "--steps", "2", "--optim.accum_steps", "2", "--eval.every", "0"
    )
    assert summary["step"] == 2
    assert (out / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert "accum_steps: 2" in (out / "config.yaml").read_text()


# ---------------------------------------------------------------------------
# torch_ref mirror


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_accum_backward_fills_grad_like_backward(loss):
    torch = pytest.importorskip("torch")
    import torch_ref
    from torch_ref.accum import accum_backward
    from torch_ref.loss import clip_loss, siglip_loss

    cfg = load_config(None, [*ARCH, *LOSSES[loss]])
    images_np, tokens_np = batch(cfg)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    tokens = torch.from_numpy(tokens_np).long()

    def grads(k):
        model = torch_ref.create_model(cfg.model_config(), seed=0, device="cpu")
        model.visual.proj.requires_grad_(False)  # a frozen parameter gets no .grad either way
        if loss == "siglip":
            loss_fn = lambda fi, ft, scale: siglip_loss(fi, ft, scale, model.logit_bias)  # noqa: E731
        else:
            loss_fn = clip_loss
        if k == 1:
            value = loss_fn(*model(images, tokens))
            value.backward()
        else:
            value = accum_backward(model, images, tokens, k, loss_fn)
        g = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
        return value.item(), g

    plain_loss, plain = grads(1)
    assert "visual.proj.weight" not in plain and ("logit_bias" in plain) == (loss == "siglip")
    for k in (2, 4):
        value, accum = grads(k)
        assert value == pytest.approx(plain_loss, rel=1e-6)
        assert_trees_close(plain, accum)


# ---------------------------------------------------------------------------
# Data parallel: 2 ranks x 2 micro-batches


DP_WORKER = """
import sys
import mlx_clip
import mlx.core as mx
from mlx.utils import tree_flatten
sys.path.insert(0, "tests")
from dist_grad_worker import ARCH, BATCH, batch
from mlx_clip.training.accum import make_accum_grad_fn
from mlx_clip.config import load_config
from mlx_clip.training.distributed import init_world
from mlx_clip.models.model import create_model
from mlx_clip.training.build import make_loss_parts, make_rank_mean

world = init_world(timeout=60)
cfg = load_config(None, [*ARCH, ("loss.type", sys.argv[2])])
model = create_model(cfg.model_config(), seed=0)
images, tokens = batch(cfg)
b = BATCH // world.size
rows = slice(world.rank * b, (world.rank + 1) * b)
grad_fn = make_accum_grad_fn(model, 2, *make_loss_parts(cfg, world))
with world.guard("accum gradients"):
    loss, grads = make_rank_mean(world)(*grad_fn(mx.array(images[rows]), mx.array(tokens[rows])))
    mx.eval(loss, grads)
arrays = {f"grad.{k}": v for k, v in tree_flatten(grads)} | {"loss": loss}
mx.save_safetensors(f"{sys.argv[1]}/rank{world.rank}.safetensors", arrays)
"""


@pytest.mark.parametrize("loss", LOSSES)
def test_data_parallel_accum_equals_one_process(tmp_path, loss):
    """mlx.launch -n 2: each rank's 4 pairs as 2 micro-batches, the features gathered over the
    ranks inside the loss, gradients averaged == one process's plain gradients of all 8 pairs."""
    from safetensors.numpy import load_file
    from test_distributed import check, launch

    script = tmp_path / "worker.py"
    script.write_text(DP_WORKER)
    check(launch(str(script), str(tmp_path), loss))  # the parameter is the loss.type
    cfg, model, _, images, tokens = setup(*LOSSES[loss])
    plain_loss, plain = make_grad_fn(model, cfg)(images, tokens)
    plain = {f"grad.{k}": v for k, v in tree_flatten(plain)}
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert float(r0["loss"]) == pytest.approx(plain_loss.item(), rel=1e-6)
    assert_trees_close(plain, {k: v for k, v in r0.items() if k != "loss"})
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
