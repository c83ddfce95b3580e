"""The training program's pieces below the CLI: RunState <-> state.json, build_training, and the
optimizer's per-tensor placement (mlx_clip/training/{state,build,optim}.py)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from dist_grad_worker import ARCH, batch
from mlx.utils import tree_flatten

from mlx_clip.config import load_config
from mlx_clip.training.build import build_training
from mlx_clip.training.optim import build_optimizer
from mlx_clip.training.state import RunState


def test_run_state_round_trips_through_json():
    state = RunState(step=7, epoch=1, batch_in_epoch=2, seed=3, world_size=2, config_hash="abc")
    state.observe("zeroshot_top1", {"zeroshot_top1": 0.5}, "step_7")
    state.temperature = {"tau": 0.05}
    back = RunState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state
    assert RunState.from_json({"step": 4, "unknown_future_key": 1}) == RunState(step=4)  # older / newer files


def test_run_state_position_and_best():
    state = RunState(batch_size=4)
    for _ in range(5):
        state.advance(batches_per_epoch=3)
    assert (state.step, state.epoch, state.batch_in_epoch, state.samples_in_epoch) == (5, 1, 2, 8)
    assert state.best["value"] == -math.inf
    assert state.observe("acc", {"acc": 0.2}, "step_1")
    assert not state.observe("acc", {"acc": 0.1}, "step_2")  # worse: the best stays
    assert not state.observe("acc", {}, "step_3")  # not evaluated
    assert state.best == {"name": "acc", "value": 0.2, "checkpoint": "step_1"}
    resumed = RunState(seed=9, config_hash="new", batch_size=4)
    resumed.resume_from(state)
    resumed.seek(batches_per_epoch=3)  # the saved position in samples -> a batch of this run's size
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch, resumed.best) == (5, 1, 2, state.best)
    assert (resumed.seed, resumed.config_hash) == (9, "new")  # this run's own settings stand


def test_build_training_freezes_a_scheduled_temperature_and_steps():
    cfg = load_config(None, [*ARCH, ("loss.temperature.schedule", "constant")])
    training = build_training(cfg)
    assert "logit_scale" not in dict(tree_flatten(training.model.trainable_parameters()))
    before = training.model.logit_scale.item()
    images, tokens = batch(cfg)
    loss, grad_norm = training.step(mx.array(images), mx.array(tokens))
    mx.eval(training.state, loss, grad_norm)
    assert math.isfinite(loss.item()) and training.model.logit_scale.item() == before


def test_placed_adamw_runs_every_update_through_place_with_the_same_result():
    cfg = load_config(None, ARCH)
    params = {"w": mx.ones((4, 3)), "b": mx.zeros((3,))}
    grads = {"w": mx.full((4, 3), 0.5), "b": mx.full((3,), -1.0)}
    calls = []

    def place(update, *arrays):
        calls.append(arrays[1].shape)
        return update(*arrays)

    results = []
    for p in (None, place):
        opt = build_optimizer(cfg.optim, 10, place=p)
        opt.init(params)
        results.append(opt.apply_gradients(grads, params))
        mx.eval(results[-1])
    assert sorted(calls) == [(3,), (4, 3)]
    for k in params:
        np.testing.assert_array_equal(np.array(results[0][k]), np.array(results[1][k]))


def test_build_training_is_the_same_step_on_two_streams():
    cfg = load_config(None, ARCH)
    images, tokens = batch(cfg)
    training = build_training(cfg, n_streams=2)
    loss, _ = training.step(mx.array(images), mx.array(tokens))
    mx.eval(training.state, loss)
    reference = build_training(cfg, n_streams=1)
    ref_loss, _ = reference.step(mx.array(images), mx.array(tokens))
    mx.eval(reference.state, ref_loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
