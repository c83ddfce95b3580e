"""torch_ref.train runs the same config as mlx_clip.train and stays in step with it."""

import json

import pytest
from conftest import SMALL

import mlx_clip
from mlx_clip.config import load_config
from mlx_clip.run_args import parse_args
from mlx_clip.train import main as mlx_main

torch = pytest.importorskip("torch")
from torch_ref.train import main as torch_main  # noqa: E402


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def temperatures(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["temperature"] for r in records if r["event"] == "temperature"]


OBJECTIVES = {
    "clip": [],
    "siglip": ["--loss.type", "siglip"],
    "hard_negative-cosine-accum": [
        "--loss.type", "hard_negative", "--loss.strategy", "weighted", "--loss.ratio", "0.25",
        "--loss.temperature.schedule", "cosine", "--loss.temperature.start", "0.1",
        "--loss.temperature.end", "0.03", "--optim.accum_steps", "2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_twenty_steps_mlx_and_torch_ref_agree(tmp_path, objective):
    """Same init, same built-in batches: loss curves within 1e-3 relative at every step, and the
    same temperature at every step, for each objective (SigLIP's bias trains in both)."""
    _, overrides = parse_args([*SMALL, *OBJECTIVES[objective]])
    model = mlx_clip.create_model(load_config(None, overrides).model_config(), seed=11)
    mlx_clip.save_weights(model, tmp_path / "init.safetensors")
    common = [
        *SMALL, *OBJECTIVES[objective], "--steps", "20", "--train.log_every", "1",
        "--eval.every", "0", "--model.init_from", str(tmp_path / "init.safetensors"),
        "--optim.lr", "2e-3",
    ]  # fmt: skip
    m = mlx_main(["--out", str(tmp_path / "mlx"), *common])
    t = torch_main(["--out", str(tmp_path / "torch"), "--device", "cpu", *common])
    lm, lt = losses(tmp_path / "mlx"), losses(tmp_path / "torch")
    assert len(lm) == len(lt) == 20
    for step, (a, b) in enumerate(zip(lm, lt, strict=True), 1):
        assert abs(a - b) <= 1e-3 * abs(b), (step, a, b)
    assert lm[-1] < lm[0]
    tm, tt = temperatures(tmp_path / "mlx"), temperatures(tmp_path / "torch")
    assert len(tm) == len(tt) == 20
    assert tm == pytest.approx(tt, rel=1e-4)
    # the same evaluation code on both sides gives close metrics
    assert abs(m["i2t_mean_rank"] - t["i2t_mean_rank"]) < 0.05 * t["i2t_mean_rank"]
    assert m["val_loss"] == pytest.approx(t["val_loss"], rel=2e-2)
