"""Patch dropout (model.patch_dropout, training/patch_dropout.py): parity with torch_ref given the
same kept patches, open_clip's count, p = 0 as before, no dropout at evaluation, the draw keyed on
(seed, step) and split-invariant, exact resume, and refused values."""

import json
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import GRID5_ARCH, SMALL, assert_grads_match_torch
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import mlx_clip
from benchmarks import train_throughput as tt
from benchmarks.flops import clip_flops_per_pair
from mlx_clip.config import load_config
from mlx_clip.models.config import ModelConfig
from mlx_clip.models.streams import Lanes
from mlx_clip.run_args import parse_args
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main
from mlx_clip.training import loss as mlx_loss
from mlx_clip.training.build import build_training, make_grad_fn, make_loss_parts
from mlx_clip.training.patch_dropout import PatchDropout, draw_keep, num_kept

torch = pytest.importorskip("torch")
import torch_ref  # noqa: E402
from torch_ref import loss as torch_loss  # noqa: E402
from torch_ref.train import main as torch_main  # noqa: E402

# A 5 x 5 patch grid; "map" is SigLIP's pooling (no class token: every token is a patch).
BASE = ModelConfig(**GRID5_ARCH)
POOLS = {"cls": BASE, "map": replace(BASE, vision_pool="map", vision_pre_norm=False, patch_bias=True)}


def batch(cfg, n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, cfg.vocab_size, (n, cfg.context_length)).astype(np.int32)
    return images, tokens


@pytest.mark.parametrize("pool", POOLS)
def test_features_loss_and_gradients_match_torch_ref_given_the_same_kept_patches(pool, tmp_path):
    cfg = POOLS[pool]
    m = mlx_clip.create_model(cfg, seed=1)
    mlx_clip.save_weights(m, tmp_path / "w.safetensors")
    t = torch_ref.create_model(cfg, seed=2, device="cpu")
    torch_ref.load_weights(t, tmp_path / "w.safetensors")
    images, tokens = batch(cfg)
    keep = draw_keep(0.5, cfg.num_patches, seed=0, step=7, batch=6)
    assert keep.shape == (6, 12)
    ti, tt, tk = (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(tokens).long(),
        torch.from_numpy(keep),
    )
    mf = m.encode_image(mx.array(images), normalize=False, keep=mx.array(keep))
    np.testing.assert_allclose(
        np.array(mf), t.encode_image(ti, False, tk).detach().numpy(), atol=1e-5, rtol=1e-5
    )

    def loss_fn(model, *args):
        return mlx_loss.clip_loss(*model(*args))

    loss, grads = nn.value_and_grad(m, loss_fn)(m, mx.array(images), mx.array(tokens), mx.array(keep))
    tloss = torch_loss.clip_loss(*t(ti, tt, tk))
    tloss.backward()
    np.testing.assert_allclose(float(loss), tloss.item(), atol=1e-5)
    assert abs(float(loss) - float(loss_fn(m, mx.array(images), mx.array(tokens)))) > 1e-4  # it dropped
    mgrads = assert_grads_match_torch(grads, t)
    # the dropped patches' position embeddings get no gradient from any image that dropped them
    seen = np.zeros(cfg.num_patches, bool)
    seen[keep.ravel()] = True
    pos = (
        mgrads["visual.positional_embedding"][1:] if pool == "cls" else mgrads["visual.positional_embedding"]
    )
    assert np.all(pos[~seen] == 0) and np.all(np.abs(pos[seen]).sum(-1) > 0)


def test_count_is_open_clips():
    """open_clip's PatchDropout keeps max(1, int(n * (1 - p))) patches: truncation, not rounding."""
    from open_clip.transformer import PatchDropout as OpenClipPatchDropout

    for n, p in [(196, 0.5), (196, 0.3), (49, 0.25), (100, 0.9), (10, 0.99), (49, 0.0)]:
        drop = OpenClipPatchDropout(p, exclude_first_token=True).train() if p else None
        tokens = torch.zeros(2, n + 1, 4)
        kept = (drop(tokens).shape[1] - 1) if drop else n
        assert num_kept(n, p) == kept, (n, p)
    assert num_kept(100, 0.9) == 9  # int(100 * 0.0999...) as open_clip, not round()'s 10


def test_draw_is_keyed_on_seed_and_step_and_split_by_rank():
    a = draw_keep(0.5, 49, seed=3, step=10, batch=8)
    assert a.dtype == np.int32 and a.shape == (8, 24)
    assert np.array_equal(a, draw_keep(0.5, 49, seed=3, step=10, batch=8))
    assert not np.array_equal(a, draw_keep(0.5, 49, seed=3, step=11, batch=8))
    assert not np.array_equal(a, draw_keep(0.5, 49, seed=4, step=10, batch=8))
    assert all(len(set(row)) == 24 and list(row) == sorted(row) and row.max() < 49 for row in a)
    # each data-parallel rank takes its contiguous rows of the global batch's draw (pipeline.py's split)
    whole = PatchDropout(0.5, 6, seed=3).keep(10, 8, 42, 42)
    ranks = [PatchDropout(0.5, 6, seed=3, rank=r, world_size=2).keep(10, 4, 42, 42) for r in (0, 1)]
    assert np.array_equal(whole, a) and np.array_equal(np.concatenate(ranks), a)


def test_p0_is_the_model_of_before_and_evaluation_never_drops():
    images, _ = batch(BASE)
    plain = mlx_clip.create_model(BASE, seed=1)
    dropping = mlx_clip.create_model(replace(BASE, patch_dropout=0.5), seed=1)
    for (k, a), (_, b) in zip(
        tree_flatten(plain.parameters()), tree_flatten(dropping.parameters()), strict=True
    ):
        assert np.array_equal(np.array(a), np.array(b)), k  # no weight depends on it
    # evaluation and inference pass no kept patches: every patch, whatever the config says
    x = np.array(plain.encode_image(mx.array(images)))
    assert np.array_equal(x, np.array(dropping.encode_image(mx.array(images))))
    # keeping every patch is the identity, bit for bit
    every = np.broadcast_to(np.arange(BASE.num_patches, dtype=np.int32), (6, BASE.num_patches))
    assert np.array_equal(x, np.array(plain.encode_image(mx.array(images), keep=mx.array(every))))
    assert ModelConfig().patch_dropout == 0.0


def small_cfg(*extra):
    return load_config(None, parse_args([*SMALL, *extra])[1])


def test_training_draws_per_step_and_streams_and_accumulation_split_one_draw():
    cfg = small_cfg("--model.patch_dropout", "0.5", "--data.batch_size", "8")
    assert build_training(small_cfg()).patch_dropout is None  # p = 0: the step of before
    training = build_training(cfg)
    assert training.patch_dropout == PatchDropout(0.5, 8, cfg.train.seed)
    images, tokens = (mx.array(x) for x in batch(training.model.config, n=8))
    keep = mx.array(training.patch_dropout.keep(0, 8, 32, 32))
    assert keep.shape == (8, 8)  # 16 patches of 8 px in 32 px images
    one, grads = make_grad_fn(training.model, cfg)(images, tokens, keep)
    two, grads2 = make_grad_fn(training.model, cfg, lanes=Lanes(2))(images, tokens, keep)
    from mlx_clip.training.accum import make_accum_grad_fn

    acc, grads3 = make_accum_grad_fn(training.model, 2, *make_loss_parts(cfg))(images, tokens, keep)
    for loss, g in ((two, grads2), (acc, grads3)):
        assert abs(float(loss) - float(one)) < 1e-5
        for (k, a), (_, b) in zip(tree_flatten(grads), tree_flatten(g), strict=True):
            np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, err_msg=k)


def test_cli_resume_is_bit_exact_and_torch_ref_draws_the_same(tmp_path):
    """4 steps == 2, stop, --resume, 2 with model.patch_dropout 0.5; torch_ref.train, from the same
    initial weights, draws the same patches: the same losses step by step."""
    init = tmp_path / "init.safetensors"
    mlx_clip.save_weights(mlx_clip.create_model(small_cfg().model_config(), seed=11), init)
    common = [
        *SMALL, "--steps", "4", "--eval.every", "0", "--train.save_every", "0", "--train.log_every", "1",
        "--model.patch_dropout", "0.5", "--model.init_from", str(init),
    ]  # fmt: skip
    train_main(["--out", str(tmp_path / "full"), *common])
    train_main(["--out", str(tmp_path / "half"), *common, "--stop-after", "2"])
    train_main(["--out", str(tmp_path / "half"), "--resume", *common])
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step_4" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "half" / "checkpoints" / "step_4" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    torch_main(["--out", str(tmp_path / "torch"), "--device", "cpu", *common])
    lm, lt = (train_losses(tmp_path / name) for name in ("full", "torch"))
    assert len(lm) == len(lt) == 4
    np.testing.assert_allclose(lm, lt, rtol=1e-4)


def train_losses(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5", ".nan", "'half'"])
def test_bad_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.patch_dropout"):
        small_cfg("--model.patch_dropout", value)


def test_flops_count_the_kept_tokens():
    full, half = (clip_flops_per_pair(replace(BASE, patch_dropout=p))["image"] for p in (0.0, 0.5))
    assert half["patch_embed"] == full["patch_embed"]  # every patch is embedded, then dropped
    assert half["qkv"] * 26 == full["qkv"] * 13  # 12 kept patches + the class token, of 25 + 1


def test_benchmark_times_the_dropping_step(tmp_path):
    backends = "mlx-cpu"  # (each torch worker takes ~10 s to start)
    argv = ["--arch", "tiny", "--batch", "4", "--warmup", "0", "--steps", "2", "--backends", backends]
    doc = tt.main(
        [
            *argv,
            "--patch-dropout",
            "0.5",
            "--gemm-size",
            "64",
            "--gemm-reps",
            "1",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    assert doc["settings"]["patch_dropout"] == 0.5 and doc["settings"]["model"]["patch_dropout"] == 0.5
    for r in doc["results"]:
        assert "error" not in r and r["loss_finite"], r


def test_two_ranks_draw_the_rows_of_one_process(tmp_path):
    """4 steps on 2 ranks == 4 steps in one process with the same global batch (weights within
    1e-5, as tests/test_distributed.py): each rank drops the patches of its rows of the one draw."""
    import test_distributed as dist

    args = [*dist.SMALL, "--steps", "4", "--eval.every", "0", "--model.patch_dropout", "0.5"]
    dist.check(dist.launch("-m", "mlx_clip.train", "--out", str(tmp_path / "two"), *args))
    train_main(["--out", str(tmp_path / "one"), *args])
    a, b = (
        load_file(str(tmp_path / r / "checkpoints" / "step_4" / "model.safetensors")) for r in ("two", "one")
    )
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
