"""data.resolution_schedule (progressive resizing): the on-the-fly position resampling, the loader's
size per step, one compiled trace per size, exact resume across a switch, refused schedules.

SMALL (conftest) is 32 px with 8 px patches: a 4 x 4 grid, so 16 px (2 x 2) is the low phase."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import SMALL, train_run
from safetensors.numpy import load_file

from mlx_clip.config import load_config
from mlx_clip.data.resolution import ResolutionSchedule
from mlx_clip.data.run_data import build_run_data
from mlx_clip.interop.layouts import resize_positional_embedding
from mlx_clip.models.model import create_model
from mlx_clip.models.transformer import VisionTransformer
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main

FAST = ["--eval.every", "0", "--train.save_every", "0", "--data.builtin_train_size", "64"]


def small_model(pool="cls"):
    cfg = load_config(None, [(k.lstrip("-"), v) for k, v in zip(SMALL[::2], SMALL[1::2], strict=True)])
    mcfg = cfg.model_config()
    if pool == "map":
        mcfg = type(mcfg)(**{**mcfg.__dict__, "vision_pool": "map"})
    return create_model(mcfg, seed=0)


@pytest.mark.parametrize("pool", ["cls", "map"])
@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (6, 6), (2, 3)])
def test_on_the_fly_positions_equal_the_fine_tuning_resampler(pool, grid):
    vt = small_model(pool).visual
    pe = np.array(vt.positional_embedding)
    got = np.array(vt.positions(grid))
    if grid[0] == grid[1]:  # the resampler used when a checkpoint is fine-tuned at another size
        want = resize_positional_embedding(pe, grid[0], class_token=pool == "cls")
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    else:  # non-square: rows and columns resampled apart, each as the square case does
        assert got.shape == ((pool == "cls") + grid[0] * grid[1], pe.shape[1])


def test_native_grid_is_the_parameter_itself():
    """At the native size the forward pass is today's: the very same array is added."""
    vt = small_model().visual
    assert vt.grid == 4
    assert vt.positions((4, 4)) is vt.positional_embedding


def test_gradients_reach_the_native_grid_parameter():
    model = small_model()
    vt = model.visual
    w = mx.random.normal((1 + 4, vt.positional_embedding.shape[1]), key=mx.random.key(1))

    def loss(params):
        vt.update(params)
        return mx.sum(vt.positions((2, 2)) * w)

    grads = mx.grad(loss)(vt.trainable_parameters())["positional_embedding"]
    from mlx_clip.interop.layouts import resample_matrix

    m = resample_matrix(4, (2, 2))  # (4, 16): d/dpe of m @ pe is m.T @ w
    want = np.concatenate([np.array(w[:1]), m.T @ np.array(w[1:])])
    assert grads.shape == vt.positional_embedding.shape == (17, 64)
    np.testing.assert_allclose(np.array(grads), want, atol=1e-5)
    # and through the whole model, from 16 px images
    images = mx.random.normal((2, 16, 16, 3), key=mx.random.key(2))
    g = mx.grad(lambda p: (model.update(p), mx.sum(model.encode_image(images)[:, 0]))[1])(
        model.trainable_parameters()
    )
    assert np.abs(np.array(g["visual"]["positional_embedding"])).sum() > 0


def schedule_cfg(schedule, steps=8):
    value = schedule if isinstance(schedule, str) else json.dumps(schedule)
    args = [*SMALL, "--data.resolution_schedule", value, "--train.steps", str(steps)]
    return load_config(None, [(k.lstrip("-"), v) for k, v in zip(args[::2], args[1::2], strict=True)])


def test_loader_gives_the_scheduled_size_at_each_step():
    cfg = schedule_cfg([[0, 16], [0.25, 32], [0.75, 24]])
    data = build_run_data(cfg, cfg.model_config())
    sizes = [data.train_at(s).image_size for s in range(8)]
    assert sizes == [16, 16, 32, 32, 32, 32, 24, 24]
    assert data.train_at(3) is data.train and data.train_at(0) is data.train_at(1)  # built once
    low, native = next(data.train_at(0).epoch(1, 2)), next(data.train.epoch(1, 2))
    assert low["images"].shape == (16, 16, 16, 3) and native["images"].shape == (16, 32, 32, 3)
    # the same samples and captions: only the pixels are resized
    assert np.array_equal(low["index"], native["index"]) and low["captions"] == native["captions"]
    assert ResolutionSchedule.of(None, 8, 32).sizes == [32]


def test_no_schedule_is_the_native_loader_throughout():
    cfg = schedule_cfg(None)
    assert cfg.data.resolution_schedule is None
    data = build_run_data(cfg, cfg.model_config())
    assert all(data.train_at(s) is data.train for s in range(8)) and not data.train_by_size


@pytest.mark.parametrize("schedule", [[[0, 16], [0.25, 32]], [[0, 32], [0.75, 16]]])
def test_resume_is_bit_exact_across_a_switch(tmp_path, schedule):
    """8 steps (2 epochs of 4 batches) == 4, --resume, 4, with the switch in the first or the second half."""
    common = [*FAST, "--steps", "8", "--data.resolution_schedule", json.dumps(schedule)]
    full, _ = train_run(tmp_path, "full", *common)
    half, _ = train_run(tmp_path, "half", *common, "--stop-after", "4")
    assert train_main(["--out", str(half), "--resume", *SMALL, *common])["step"] == 8
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(full / "checkpoints" / "step_8" / name))
        b = load_file(str(half / "checkpoints" / "step_8" / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    # the checkpoint keeps the native 4 x 4 grid (+ class token)
    saved = load_file(str(full / "checkpoints" / "step_8" / "model.safetensors"))
    assert saved["visual.positional_embedding"].shape == (17, 64)
    events = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    switches = [(e["step"], e["image_size"]) for e in events if e["event"] == "resolution"]
    assert switches == [(0, schedule[0][1]), (int(schedule[1][0] * 8), schedule[1][1])]


def test_each_size_is_traced_once(tmp_path, monkeypatch):
    """Back and forth between sizes: the compiled step traces each size once (mx.compile keeps a
    trace per input shape); Python code inside it runs only while tracing."""
    grids = []
    original = VisionTransformer.positions
    monkeypatch.setattr(
        VisionTransformer, "positions", lambda self, grid: grids.append(grid) or original(self, grid)
    )
    schedule = [[0, 16], [0.25, 32], [0.5, 16], [0.75, 32]]
    train_run(tmp_path, "run", *FAST, "--steps", "8", "--train.streams", "1", "--data.resolution_schedule",
              json.dumps(schedule))  # fmt: skip
    assert grids.count((2, 2)) == 1


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([], "must be null or a non-empty list"),
        ([[0, 16, 3]], "[0] must be a [fraction, size] pair"),
        ([[0.1, 16]], "[0]: the first phase must start at fraction 0.0"),
        ([[0, 16], [1.0, 32]], "[1]: the fraction of train.steps where it starts must be in [0, 1)"),
        ([[0, 12]], "[0]: the image size must be a whole multiple of the patch size 8"),
        ([[0, 16.0]], "[0]: the image size must be a whole multiple"),
        ([[0, 16], [0.5, 32], [0.4, 24]], "[2]: the fractions must increase"),
        ([[0, 16], [0.05, 32]], "[1] starts at step 0, as data.resolution_schedule[0] does"),
        ("[[0, a]]", "data.resolution_schedule[0][1]"),
    ],
)
def test_bad_schedules_are_refused(schedule, message):
    with pytest.raises(ConfigError) as e:
        schedule_cfg(schedule)
    assert "data.resolution_schedule" in str(e.value) and message in str(e.value)


def test_torch_ref_refuses_a_schedule():
    from torch_ref.train import check_mirrored

    with pytest.raises(ConfigError, match="data.resolution_schedule .* is not mirrored"):
        check_mirrored(schedule_cfg([[0, 16], [0.5, 32]]))
