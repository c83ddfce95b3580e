"""Batch shards on their own MLX streams (mlx_clip/models/streams.py): the same step as one stream, up to
float rounding; deterministic; and the config switch.

Gradients are compared per tensor as in test_accum.py: |sharded - one| <= 1e-5 * |one| +
1e-5 * max|one|. Only the order of float32 sums differs (the weight gradients of the shards are
added at the end instead of summed over the whole batch at once).
"""

# ruff: noqa: I001  (mlx_clip must be imported before mlx.core: it picks the BLAS on Linux)
import json
import os
import threading

import mlx_clip  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from dist_grad_worker import ARCH, BATCH, batch
from mlx.utils import tree_flatten
from test_accum import assert_trees_close
from conftest import train_run

from mlx_clip.models import kernels
from mlx_clip.models import streams
from mlx_clip.config import load_config
from mlx_clip.schema import ConfigError
from mlx_clip.models.model import create_model
from mlx_clip import _blas
from mlx_clip.models.quantize import quantize_model
from mlx_clip.models.streams import Encoders, Lanes
from mlx_clip.training.build import make_grad_fn


def test_bounds_cover_the_batch_evenly():
    for n in (1, 2, 3, 4):
        shards = Lanes(n)
        for size in (1, 2, 5, 7, 64):
            bounds = shards.bounds(size)
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a == b0 for (_, a), (b0, _) in zip(bounds, bounds[1:], strict=False))  # contiguous
            sizes = [b - a for a, b in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert len(bounds) == min(n, size)


def test_auto_is_one_per_core_on_cpu_and_one_on_gpu():
    assert streams.resolve("auto", mx.cpu) == streams.cpu_cores()
    assert streams.resolve("auto", mx.gpu) == 1
    assert streams.resolve(3, mx.cpu) == 3


@pytest.mark.parametrize("loss", [[], [("loss.type", "siglip")]], ids=["clip", "siglip"])
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_gradients_equal_one_stream(n, loss):
    """2 and 3 shards (3 does not divide the batch) give one stream's loss and gradients."""
    results = []
    for count in (1, n):
        cfg = load_config(None, [*ARCH, ("data.batch_size", str(BATCH)), *loss])
        model = create_model(cfg.model_config(), seed=0)
        images, tokens = batch(cfg)
        grad_fn = make_grad_fn(model, cfg, lanes=Lanes(count))
        value, grads = mx.compile(grad_fn)(mx.array(images), mx.array(tokens))
        mx.eval(value, grads)
        results.append((value.item(), dict(tree_flatten(grads))))
    (one_loss, one), (sharded_loss, sharded) = results
    assert sharded_loss == pytest.approx(one_loss, rel=1e-6)
    assert_trees_close(one, sharded)


def test_fast_activation_backward_runs_on_the_forward_stream():
    """The hand-written VJPs of the CPU kernels (mlx_clip/models/kernels.py) give the same gradient
    inside a stream context as outside (they are pinned to the stream their forward was built on)."""
    x = mx.random.normal((64, 96), key=mx.random.key(0))
    reference = [mx.grad(lambda v, f=f: f(v).sum())(x) for f in (kernels.gelu, kernels.quick_gelu)]
    stream = Lanes(2).streams[1]

    def on_stream(v, f):
        with mx.stream(stream):
            return f(v).sum()

    for f, ref in zip((kernels.gelu, kernels.quick_gelu), reference, strict=True):
        g = mx.compile(mx.grad(lambda v, f=f: on_stream(v, f)))(x)
        assert mx.array_equal(g, ref).item()


def test_sharded_training_is_bit_reproducible(tmp_path):
    """Two identical runs on 2 streams log identical losses (OpenBLAS at one thread per stream)."""
    logs = []
    for name in ("a", "b"):
        out, _ = train_run(tmp_path, name, "--steps", "6", "--train.log_every", "1", "--train.streams", "2")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs.append([r["loss"] for r in records if r["event"] == "train"])
    assert len(logs[0]) == 6 and logs[0] == logs[1]


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_streams_setting_is_refused(value):
    with pytest.raises(ConfigError, match="train.streams"):
        load_config(None, [("train.streams", value)])


def test_evaluation_is_widened_only_for_several_streams_without_checkpointing(monkeypatch):
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH", raising=False)
    assert not streams.widen_evaluation(1, grad_checkpointing=False)
    assert not streams.widen_evaluation(2, grad_checkpointing=True)
    assert "MLX_BFS_MAX_WIDTH" not in os.environ
    assert streams.widen_evaluation(2, grad_checkpointing=False)
    assert os.environ["MLX_BFS_MAX_WIDTH"] == streams.WIDE_EVALUATION
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "64")  # the user's own value stays
    assert not streams.widen_evaluation(2, grad_checkpointing=False)


def _encoders_setup(n_rows=BATCH):
    cfg = load_config(None, [*ARCH, ("data.batch_size", str(BATCH))])
    model = create_model(cfg.model_config(), seed=0)
    model.eval()
    images, tokens = batch(cfg)
    return model, images[:n_rows], tokens[:n_rows]


def _close(got, want):
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_encoders_equal_the_model_for_any_batch(n):
    """Sharded, compiled encoder calls give model.encode_image / encode_text, for batches the
    streams do not divide, and a batch of one."""
    model, images, tokens = _encoders_setup()
    enc = Encoders(model, n)
    for rows in (BATCH, 5, 1):
        _close(enc.image(images[:rows]), model.encode_image(mx.array(images[:rows])))
        _close(enc.text(tokens[:rows]), model.encode_text(mx.array(tokens[:rows])))


def test_encoders_follow_new_weights_and_a_new_structure():
    """The compiled towers take the weights as inputs: after load_weights (a run's next evaluation)
    and after quantize_model (other arrays), they give the model's new features, not the traced ones."""
    model, images, tokens = _encoders_setup()
    enc = Encoders.of(model, 2)
    first = enc.image(images)
    other = create_model(model.config, seed=1)
    model.load_weights(list(tree_flatten(other.parameters())))
    assert Encoders.of(model, 2) is enc  # kept on the model, not traced again
    assert not np.allclose(enc.image(images), first)
    _close(enc.image(images), other.encode_image(mx.array(images)))
    quantize_model(model, 8, group_size=32)
    _close(enc.text(tokens), model.encode_text(mx.array(tokens)))


def test_encoders_restore_the_blas_threads():
    """A sharded call runs OpenBLAS at one thread and gives the process back its own count."""
    if _blas.get_threads() is None:
        pytest.skip("no OpenBLAS loaded (not Linux, or MLX_CLIP_BLAS=none)")
    model, images, _ = _encoders_setup()
    before = _blas.get_threads()
    try:
        _blas.set_threads(2)
        Encoders(model, 2).image(images)
        assert _blas.get_threads() == 2
    finally:
        _blas.set_threads(before)


def test_encoders_work_from_another_thread():
    """MLX streams belong to the thread that made them: a web app's inference thread gets its own."""
    model, images, _ = _encoders_setup()
    want = Encoders.of(model, 2).image(images)  # streams made on this thread first
    got = []
    worker = threading.Thread(target=lambda: got.append(Encoders.of(model, 2).image(images)))
    worker.start()
    worker.join()
    _close(got[0], want)
