"""Batch shards on their own MLX streams (mlx_clip/training/streams.py): the same step as one stream, up to
float rounding; deterministic; and the config switch.

Gradients are compared per tensor as in test_accum.py: |sharded - one| <= 1e-5 * |one| +
1e-5 * max|one|. Only the order of float32 sums differs (the weight gradients of the shards are
added at the end instead of summed over the whole batch at once).
"""

# ruff: noqa: I001  (mlx_clip must be imported before mlx.core: it picks the BLAS on Linux)
import json
import os

import mlx_clip  # noqa: F401
import mlx.core as mx
import pytest
from dist_grad_worker import ARCH, BATCH, batch
from mlx.utils import tree_flatten
from test_accum import assert_trees_close
from conftest import train_run

from mlx_clip.models import kernels
from mlx_clip.training import streams
from mlx_clip.config import load_config
from mlx_clip.schema import ConfigError
from mlx_clip.models.model import create_model
from mlx_clip.training.streams import Lanes
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
