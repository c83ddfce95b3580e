"""Fine-tuning controls: the EMA of the weights, layer-wise learning-rate decay, Lion, and the
const / const-cooldown schedules (issue 16)."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import SMALL, train_run
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import load_file

import mlx_clip
from mlx_clip.config import OptimConfig, TrainConfig, load_config
from mlx_clip.data.run_data import build_run_data
from mlx_clip.eval import main as eval_main
from mlx_clip.export import main as export_main
from mlx_clip.models.config import model_config
from mlx_clip.models.model import encode_pair
from mlx_clip.run_args import parse_args
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main
from mlx_clip.training.build import make_loss_parts
from mlx_clip.training.ema import ModelEMA, ema_decay_at
from mlx_clip.training.evaluate import evaluate
from mlx_clip.training.optim import build_optimizer, lock_parameters, mx_schedule
from mlx_clip.training.optim_rules import lr_at

FAST = ["--eval.every", "0", "--train.save_every", "0", "--train.log_every", "1"]

# ---------------------------------------------------------------------------
# EMA


def test_ema_one_step_is_decay_times_ema_plus_rest_times_weights():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, TrainConfig(ema_decay=0.9))
    old = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten([(k, v + 1.5) for k, v in old.items()]))
    new = dict(tree_flatten(model.trainable_parameters()))
    ema.update(model, 0, mx.array(1.0), mx.array(1.0))
    mx.eval(ema.state)
    for k in old:
        assert mx.allclose(ema.state[k], 0.9 * old[k] + 0.1 * new[k], atol=1e-6).item(), k
    before = dict(ema.state)
    model.update(tree_unflatten([(k, v * 3) for k, v in new.items()]))
    ema.update(model, 1, mx.array(1.0), mx.array(math.nan))  # a rejected step: no change
    mx.eval(ema.state)
    assert all(mx.array_equal(ema.state[k], before[k]).item() for k in before)
    with ema.swapped_in(model):
        assert mx.array_equal(model.weight, ema.state["weight"]).item()
    assert mx.array_equal(model.weight, new["weight"] * 3).item()


def test_ema_warmup_grows_the_window_linearly():
    assert ema_decay_at(0, 0.99, 10) == 0.0  # the first step's EMA is the trained weights
    assert 1 / (1 - ema_decay_at(5, 0.99, 10)) == pytest.approx(1 + 99 * 0.5)
    assert ema_decay_at(10, 0.99, 10) == ema_decay_at(500, 0.99, 10) == 0.99
    assert ema_decay_at(0, 0.99, 0) == 0.99


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """6 steps with an EMA evaluated at the end, and 3 + resume + 3 evaluating the raw weights."""
    tmp = tmp_path_factory.mktemp("ema")
    common = [*FAST, "--steps", "6", "--train.ema_decay", "0.8", "--train.ema_warmup", "2"]
    full, summary_ema = train_run(tmp, "full", *common, "--eval.use_ema", "true")
    half, _ = train_run(tmp, "half", *common, "--stop-after", "3")
    summary_raw = train_main(["--out", str(half), "--resume", *SMALL, *common])
    return full, half, summary_ema, summary_raw


def test_ema_resume_is_bit_exact(ema_runs):
    full, half, _, _ = ema_runs
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(full / "checkpoints" / "step_6" / name))
        b = load_file(str(half / "checkpoints" / "step_6" / name))
        assert a.keys() == b.keys(), name
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    raw = load_file(str(full / "checkpoints" / "step_6" / "model.safetensors"))
    ema = load_file(str(full / "checkpoints" / "step_6" / "ema.safetensors"))
    assert ema.keys() == raw.keys() and not np.array_equal(
        ema["visual.proj.weight"], raw["visual.proj.weight"]
    )
    state = json.loads((full / "checkpoints" / "step_6" / "state.json").read_text())
    assert "ema.safetensors" in state["files"]  # checksummed like every checkpoint file


def test_eval_uses_the_ema_when_asked(ema_runs):
    """Same weights and EMA (bit-exact above): the EMA run's metrics are the EMA model's."""
    full, _, summary_ema, summary_raw = ema_runs
    assert summary_ema["val_loss"] != summary_raw["val_loss"]
    model, _, _ = mlx_clip.load(full, ema=True)  # ema.safetensors
    cfg = load_config(full / "config.yaml")
    data = build_run_data(cfg, cfg.model_config(), full / "checkpoints" / "step_6")
    assert evaluate(model, data, cfg)["val_loss"] == pytest.approx(summary_ema["val_loss"], rel=1e-6)
    raw, _, _ = mlx_clip.load(full)  # model.safetensors: the raw weights
    assert evaluate(raw, data, cfg)["val_loss"] == pytest.approx(summary_raw["val_loss"], rel=1e-6)
    # The val loss reuses the evaluation's features; encoding the val pairs again gives it too.
    _, features_loss = make_loss_parts(cfg)
    losses = [
        (features_loss(raw, *encode_pair(raw, mx.array(images), mx.array(tokens))).item(), len(tokens))
        for images, tokens in data.val_pairs()
    ]
    again = np.average([x for x, _ in losses], weights=[n for _, n in losses])
    assert again == pytest.approx(summary_raw["val_loss"], rel=1e-6)
    again = eval_main(["--checkpoint", str(full), "--ema"])  # the eval CLI on ema.safetensors
    assert again["zeroshot_top1"] == summary_ema["zeroshot_top1"]
    assert again["i2t_mean_rank"] == pytest.approx(summary_ema["i2t_mean_rank"])
    assert (full / "checkpoints" / "step_6" / "eval_ema.json").is_file()


def test_export_takes_the_ema(ema_runs, tmp_path):
    full = ema_runs[0]
    export_main(["--checkpoint", str(full), "--to", "torch_ref", "--out", str(tmp_path / "tr"), "--ema"])
    exported = load_file(str(tmp_path / "tr" / "model.safetensors"))
    ema = load_file(str(full / "checkpoints" / "step_6" / "ema.safetensors"))
    assert all(np.array_equal(exported[k], ema[k]) for k in ema)
    with pytest.raises(SystemExit, match="only runs trained with train.ema_decay"):
        export_main(
            ["--checkpoint", str(tmp_path / "tr"), "--to", "hf", "--out", str(tmp_path / "hf"), "--ema"]
        )


# ---------------------------------------------------------------------------
# Layer-wise learning-rate decay


def test_layer_decay_gives_each_block_its_rate():
    """One Lion step with unit gradients moves every weight by exactly its learning rate (sign
    update, no weight decay), so the step itself shows each tensor's rate."""
    mcfg = model_config("tiny")  # 4 image and 4 text blocks
    model = mlx_clip.create_model(mcfg)
    o = OptimConfig(
        optimizer="lion", schedule="const", warmup_steps=0, weight_decay=0.0, lr=1e-2, text_lr=4e-3,
        image_layer_decay=0.5, text_layer_decay=0.8, lock_text=True, lock_text_unlocked_layers=2,
    )  # fmt: skip
    locked = set(lock_parameters(model, o))
    before = dict(tree_flatten(model.parameters()))
    opt = build_optimizer(o, 10, mcfg=mcfg)
    grads = tree_unflatten([(k, mx.ones_like(v)) for k, v in tree_flatten(model.trainable_parameters())])
    opt.update(model, grads)
    after = dict(tree_flatten(model.parameters()))

    def expected(path):
        if path in locked:
            return 0.0
        if path.startswith("visual."):
            if ".resblocks." in path:
                return 1e-2 * 0.5 ** (4 - int(path.split(".")[3]))
            if path.startswith(
                (
                    "visual.patch_embed",
                    "visual.class_embedding",
                    "visual.positional_embedding",
                    "visual.ln_pre",
                )
            ):
                return 1e-2 * 0.5**5
            return 1e-2  # ln_post, proj
        if path.startswith("text."):
            if ".resblocks." in path:
                return 4e-3 * 0.8 ** (4 - int(path.split(".")[3]))
            return 4e-3  # ln_final, text_projection (the embeddings are locked)
        return 1e-2  # logit_scale

    assert "text.transformer.resblocks.1.ln_1.weight" in locked
    for k, v in before.items():
        moved = np.abs(np.array(v - after[k]))
        assert np.allclose(moved, expected(k), rtol=1e-3, atol=1e-7), (k, moved.max(), expected(k))


def test_torch_ref_groups_get_the_same_rates():
    torch = pytest.importorskip("torch")  # noqa: F841
    import torch_ref
    from torch_ref.train import param_groups

    mcfg = model_config("tiny")
    o = OptimConfig(image_layer_decay=0.7, text_layer_decay=0.9, image_lr=2e-3)
    model = torch_ref.create_model(mcfg)
    rate = {id(p): g["lr"] for g in param_groups(model, o) for p in g["params"]}
    names = dict(model.named_parameters())
    assert rate[id(names["visual.transformer.resblocks.0.mlp.c_fc.weight"])] == pytest.approx(2e-3 * 0.7**4)
    assert rate[id(names["visual.positional_embedding"])] == pytest.approx(2e-3 * 0.7**5)
    assert rate[id(names["text.transformer.resblocks.3.attn.in_proj.weight"])] == pytest.approx(1e-3 * 0.9)
    assert rate[id(names["text.ln_final.weight"])] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------
# Lion and the schedules


def test_lion_trains(tmp_path):
    out, summary = train_run(
        tmp_path, "lion", *FAST, "--steps", "6", "--optim.optimizer", "lion", "--optim.lr", "3e-4",
        "--optim.weight_decay", "0.5",
    )  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    state = load_file(str(out / "checkpoints" / "step_6" / "optimizer.safetensors"))
    assert {k.split(".")[-1] for k in state} <= {"m", "step", "learning_rate"}  # Lion keeps one moment


def test_const_and_cooldown_schedules():
    const = OptimConfig(lr=1e-3, warmup_steps=4, schedule="const")
    assert [lr_at(s, const, 100) for s in (0, 3, 4, 99)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3])
    cool = OptimConfig(
        lr=1e-3, warmup_steps=4, schedule="const-cooldown", cooldown_steps=20, cooldown_end_lr=1e-4
    )
    assert lr_at(79, cool, 100) == pytest.approx(1e-3)  # cooldown starts at steps - cooldown_steps
    assert lr_at(80, cool, 100) == pytest.approx(1e-3)
    assert lr_at(90, cool, 100) == pytest.approx(1e-4 + 0.5 * 9e-4)  # linear (power 1)
    assert lr_at(100, cool, 100) == pytest.approx(1e-4)
    squared = OptimConfig(
        lr=1e-3, warmup_steps=0, schedule="const-cooldown", cooldown_steps=20, cooldown_power=2
    )
    assert lr_at(90, squared, 100) == pytest.approx(0.25e-3)
    for cfg in (const, cool, squared, OptimConfig(min_lr=1e-5, warmup_steps=3)):  # MLX == Python
        sched = mx_schedule(cfg, 100, base_lr=cfg.lr / 2)
        for s in (0, 2, 50, 80, 95, 99):
            assert float(sched(mx.array(s))) == pytest.approx(lr_at(s, cfg, 100, cfg.lr / 2), rel=1e-5)


def test_cooldown_matches_open_clip():
    scheduler = pytest.importorskip("open_clip_train.scheduler")

    class Groups:
        param_groups = [{}]

    cfg = OptimConfig(lr=2e-3, warmup_steps=5, schedule="const-cooldown", cooldown_steps=30,
                      cooldown_power=1.5, cooldown_end_lr=1e-4)  # fmt: skip
    theirs = scheduler.const_lr_cooldown(Groups, 2e-3, 5, 100, 30, 1.5, 1e-4)
    assert [lr_at(s, cfg, 100) for s in range(100)] == pytest.approx([theirs(s) for s in range(100)])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.image_layer_decay", "0", "optim.image_layer_decay must be in \\(0, 1\\]"),
        ("optim.text_layer_decay", "1.5", "optim.text_layer_decay must be in"),
        ("train.ema_decay", "1", "train.ema_decay must be in \\[0, 1\\)"),
        ("train.ema_warmup", "-1", "train.ema_warmup must be >= 0"),
        ("eval.use_ema", "true", "set train.ema_decay"),
        ("optim.optimizer", "sgd", "optim.optimizer"),
        ("optim.schedule", "linear", "optim.schedule"),
        ("optim.cooldown_steps", "5", "used only by optim.schedule const-cooldown"),
    ],
)
def test_validation(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


def test_cooldown_validation():
    base = [("optim.schedule", "const-cooldown"), ("train.steps", "100"), ("optim.warmup_steps", "10")]
    load_config(None, [*base, ("optim.cooldown_steps", "90")])
    with pytest.raises(ConfigError, match="optim.cooldown_steps must be in \\[1, .* = 90\\]"):
        load_config(None, [*base, ("optim.cooldown_steps", "91")])
    with pytest.raises(ConfigError, match="cooldown_end_lr"):
        load_config(None, [*base, ("optim.cooldown_steps", "9"), ("optim.cooldown_end_lr", "1")])


def test_torch_ref_trains_the_same_with_layer_decay_and_cooldown(tmp_path):
    """8 steps in MLX and in torch_ref from the same init, with layer decay on both towers, a
    locked text block and const-cooldown: the same weights (a block at the wrong rate would be
    off by ~1e-3)."""
    pytest.importorskip("torch")
    from torch_ref.train import main as torch_main

    _, overrides = parse_args(SMALL)
    mlx_clip.save_weights(
        mlx_clip.create_model(load_config(None, overrides).model_config(), seed=3),
        tmp_path / "init.safetensors",
    )
    common = [
        *SMALL, *FAST, "--steps", "8", "--model.init_from", str(tmp_path / "init.safetensors"),
        "--optim.lr", "2e-3", "--optim.image_layer_decay", "0.5", "--optim.text_layer_decay", "0.7",
        "--optim.schedule", "const-cooldown", "--optim.cooldown_steps", "4",
        "--optim.cooldown_end_lr", "1e-4",
        "--optim.lock_text", "true", "--optim.lock_text_unlocked_layers", "1",
    ]  # fmt: skip
    train_main(["--out", str(tmp_path / "mlx"), *common])
    torch_main(["--out", str(tmp_path / "torch"), "--device", "cpu", *common])
    a = load_file(str(tmp_path / "mlx" / "checkpoints" / "step_8" / "model.safetensors"))
    b = load_file(str(tmp_path / "torch" / "model.safetensors"))
    init = load_file(str(tmp_path / "init.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.abs(a[k] - b[k]).max() < 2e-5, k
    moved = {k: np.abs(a[k] - init[k]).max() for k in a}
    assert moved["visual.transformer.resblocks.0.mlp.c_fc.weight"] < moved["visual.proj.weight"]
    assert moved["text.transformer.resblocks.0.ln_1.weight"] == 0  # locked
