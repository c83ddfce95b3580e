"""Fine-tuning: init_from, locked towers (LiT), unlocked last layers, per-tower rates, new image sizes."""

import numpy as np
import pytest
from conftest import SMALL
from safetensors.numpy import load_file, save_file

from mlx_clip.config import OptimConfig, load_config
from mlx_clip.interop.layouts import resize_positional_embedding
from mlx_clip.models.config import model_config
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main
from mlx_clip.training.optim_rules import is_locked, lr_at, tower_lr

FAST = [*SMALL, "--eval.every", "0", "--train.save_every", "0", "--optim.warmup_steps", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_main(["--out", str(out), *FAST, "--steps", "2"])
    return out / "checkpoints" / "step_2"


def finetune(tmp_path, base, *extra):
    out = tmp_path / "ft"
    train_main(["--out", str(out), *FAST, "--steps", "3", "--model.init_from", str(base), *extra])
    return load_file(str(base / "model.safetensors")), load_file(
        str(out / "checkpoints/step_3/model.safetensors")
    )


def test_lit_locked_image_tower_is_bit_identical(tmp_path, base):
    before, after = finetune(tmp_path, base, "--optim.lock_image", "true")
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same == k.startswith("visual."), k  # every image weight kept, every other one trained


def test_unlocked_last_layer_of_a_locked_tower(tmp_path, base):
    before, after = finetune(
        tmp_path, base, "--optim.lock_text", "true", "--optim.lock_text_unlocked_layers", "1"
    )  # SMALL has 2 text layers: block 1 and the head train, block 0 and the embeddings do not
    for k in before:
        trains = not k.startswith("text.") or k.startswith(
            ("text.transformer.resblocks.1.", "text.ln_final.", "text.text_projection.")
        )
        assert np.array_equal(before[k], after[k]) != trains, k


def test_locking_rules_and_validation():
    cfg = model_config("tiny")
    o = OptimConfig(lock_image=True, lock_image_unlocked_layers=2)
    assert is_locked("visual.positional_embedding", o, cfg)
    assert is_locked("visual.transformer.resblocks.1.mlp.c_fc.weight", o, cfg)
    assert not is_locked("visual.transformer.resblocks.2.mlp.c_fc.weight", o, cfg)
    assert not is_locked("visual.proj.weight", o, cfg) and not is_locked("logit_scale", o, cfg)
    assert not is_locked("text.token_embedding.weight", o, cfg)
    with pytest.raises(ConfigError, match="lock_text_unlocked_layers must be in"):
        load_config(None, [("optim.lock_text_unlocked_layers", "9")])


def test_per_tower_learning_rates(tmp_path, base):
    o = OptimConfig(lr=1e-3, image_lr=1e-5, warmup_steps=0)
    assert tower_lr("visual.proj.weight", o) == 1e-5 and tower_lr("text.ln_final.bias", o) == 1e-3
    assert lr_at(0, o, 10, base_lr=1e-5) == pytest.approx(1e-5)
    before, after = finetune(tmp_path, base, "--optim.image_lr", "1e-9", "--optim.lr", "1e-3")
    # an image tower at 1e-9 barely moves; the text tower moves by ~lr per step
    dv = max(np.abs(after[k] - before[k]).max() for k in before if k.startswith("visual."))
    dt = max(np.abs(after[k] - before[k]).max() for k in before if k.startswith("text."))
    assert dv < 1e-7 < 1e-4 < dt


def test_finetune_at_a_new_image_size(tmp_path, base):
    """A 32 px checkpoint (4x4 patches) fine-tunes at 48 px: the position grid is resampled to 6x6."""
    out = tmp_path / "big"
    train_main(
        ["--out", str(out), *FAST, "--steps", "1", "--model.init_from", str(base), "--model.image_size", "48"]
    )
    old = load_file(str(base / "model.safetensors"))["visual.positional_embedding"]
    new = load_file(str(out / "checkpoints/step_1/model.safetensors"))["visual.positional_embedding"]
    assert old.shape == (17, 64) and new.shape == (37, 64)
    # one step of lr ~1e-3 away from the resampled grid
    assert np.abs(new - resize_positional_embedding(old, 6)).max() < 5e-3


def test_position_grid_resampling_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    pe = np.random.default_rng(0).standard_normal((1 + 7 * 7, 5)).astype(np.float32)
    for n in (5, 10):
        ours = resize_positional_embedding(pe, n)
        grid = torch.from_numpy(pe[1:]).reshape(1, 7, 7, 5).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(ours[1:], ref.permute(0, 2, 3, 1).reshape(n * n, 5).numpy(), atol=1e-5)
        assert np.array_equal(ours[0], pe[0])  # the class token's position is kept


def test_arch_checkpoint_takes_the_architecture_saved_with_init_from(tmp_path, base):
    """model.arch checkpoint: the ModelConfig recorded in init_from's weights, with the section's
    overrides on top; without init_from, or with weights that record none, a clear error."""
    from mlx_clip.models.locate import saved_config

    cfg = load_config(None, [("model.arch", "checkpoint"), ("model.init_from", str(base))])
    saved = saved_config(base / "model.safetensors")
    assert cfg.model_config().vision_width == saved["vision_width"] != model_config("tiny").vision_width
    assert cfg.model_config() == model_config("tiny").__class__(**saved)
    wider = load_config(
        None, [("model.arch", "checkpoint"), ("model.init_from", str(base)), ("model.image_size", "48")]
    )
    assert wider.model_config().image_size == 48
    with pytest.raises(ConfigError, match="model.init_from is not set"):
        load_config(None, [("model.arch", "checkpoint")])
    plain = tmp_path / "plain.safetensors"  # weights without mlx_clip's header
    save_file({"a": np.zeros(2, np.float32)}, str(plain))
    with pytest.raises(ConfigError, match="records no architecture"):
        load_config(None, [("model.arch", "checkpoint"), ("model.init_from", str(plain))])
