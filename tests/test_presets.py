"""configs/presets: each loads, validates, composes what the README says, and trains on the built-in data."""

from pathlib import Path

import pytest
from conftest import SMALL

from mlx_clip.config import CONFIG_DIR, load_config
from mlx_clip.train import main as train_main

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "presets").glob("*.yaml"))


def test_the_three_presets_exist():
    assert PRESETS == ["industrial", "medical", "scientific"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_model_optimiser_loss_and_augmentation(name):
    path = CONFIG_DIR / "presets" / f"{name}.yaml"
    raw = path.read_text()
    for section in ("model:", "data:", "loss:", "optim:"):
        assert f"\n{section}" in "\n" + raw, (name, section)
    cfg = load_config(path)
    assert cfg.data.augment and cfg.optim.lr < 1e-3  # fine-tuning rates
    expected = {"medical": "clip", "industrial": "hard_negative", "scientific": "siglip"}[name]
    assert cfg.loss.type == expected
    assert not cfg.data.hflip or name == "industrial"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_two_steps_on_builtin_data(tmp_path, name):
    out = Path(tmp_path) / name
    summary = train_main(
        ["--config", str(CONFIG_DIR / "presets" / f"{name}.yaml"), "--out", str(out), *SMALL,
         "--steps", "2", "--eval.every", "0", "--train.save_every", "0"]
    )  # fmt: skip
    assert summary["step"] == 2
