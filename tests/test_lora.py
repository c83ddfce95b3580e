"""LoRA / QLoRA: zero-init equivalence, a frozen base, adapters-only checkpoints with a base
reference, merge, resume, config checks, and gradients against torch_ref."""

import dataclasses
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import ODD_ARCH, SMALL, random_tokens
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import mlx_clip
from mlx_clip.config import load_config
from mlx_clip.export import main as export_main
from mlx_clip.interop.layouts import WeightError
from mlx_clip.models.adapters import build_lora_model
from mlx_clip.models.config import ModelConfig
from mlx_clip.models.lora import LoRALinear, merge_lora
from mlx_clip.models.lora_config import FinetuneConfig, LoraConfig
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main
from mlx_clip.training.build import build_training

FAST = [*SMALL, "--eval.every", "0", "--train.save_every", "0", "--optim.warmup_steps", "0"]
ALL = "[attn_qkv, attn_out, mlp, proj]"
LORA = ["--finetune.lora.enabled", "true", "--finetune.lora.targets", ALL, "--optim.lr", "1e-2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A SMALL model trained one step: the base weights file (with its run's tokenizer beside it)."""
    out = tmp_path_factory.mktemp("base")
    train_main(["--out", str(out), *FAST, "--steps", "1"])
    return out / "checkpoints" / "step_1"


def lora_args(base):
    return [*FAST, "--steps", "4", "--model.init_from", str(base), *LORA, "--finetune.lora.dropout", "0.1"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base):
    """4 LoRA steps (every target, with dropout) from the base."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train_main(["--out", str(out), *lora_args(base)])
    return out


def small_cfg(base, *extra):
    return load_config(
        None,
        [(a[2:], b) for a, b in zip(*[iter([*FAST, *LORA, *extra])] * 2, strict=True)]
        + [("model.init_from", str(base / "model.safetensors"))],
    )


def batch(mcfg, n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, mcfg.image_size, mcfg.image_size, 3)).astype(np.float32)
    return images, random_tokens(rng, n, mcfg.context_length, mcfg.vocab_size)


def features(model, images, tokens):
    return [np.array(f) for f in (model.encode_image(mx.array(images)), model.encode_text(mx.array(tokens)))]


def test_step_zero_equals_the_base_model(base):
    plain = mlx_clip.load(base)[0]
    model = mlx_clip.create_model(plain.config, seed=3)
    ft = FinetuneConfig(LoraConfig(enabled=True, targets=["attn_qkv", "attn_out", "mlp", "proj"]))
    build_lora_model(model, ft, base / "model.safetensors")
    assert len([m for _, m in model.named_modules() if isinstance(m, LoRALinear)]) == 2 * (2 * 4) + 2
    images, tokens = batch(plain.config)
    for a, b in zip(features(plain, images, tokens), features(model, images, tokens), strict=True):
        assert np.array_equal(a, b)  # B = 0: bit for bit


@pytest.mark.parametrize("extra", [[], ["--train.precision", "bfloat16", "--optim.accum_steps", "2"]])
def test_training_moves_only_the_adapters(base, extra):
    """The compiled step (clipping, accumulation, bf16) leaves the base bit-identical."""
    cfg = small_cfg(base, "--finetune.lora.train_norms", "true", *extra)
    training = build_training(cfg)
    model = training.model
    before = dict(tree_flatten(model.parameters()))
    images, tokens = batch(model.config, n=16)
    for _ in range(2):
        loss, norm = training.step(mx.array(images), mx.array(tokens))
        mx.eval(training.state, loss, norm)
    assert np.isfinite(loss.item())
    after = dict(tree_flatten(model.parameters()))
    for k in before:
        trains = k.endswith(("lora_a", "lora_b")) or ".ln_" in k
        if k.endswith("lora_a") and "resblocks" not in k:
            continue  # a projection's A gets a gradient only through a nonzero B (after step 1)
        assert np.array_equal(np.array(before[k]), np.array(after[k])) != trains, k
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {k for k in before if k.endswith(("lora_a", "lora_b")) or ".ln_" in k}


def test_checkpoint_holds_adapters_and_its_base_reference(lora_run, base):
    step = lora_run / "checkpoints" / "step_4"
    saved = load_file(str(step / "model.safetensors"))
    assert all(k.endswith(("lora_a", "lora_b")) or k == "logit_scale" for k in saved)
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if k.endswith("lora_b"))  # trained
    from mlx_clip.models.locate import resolve_init, safetensors_header

    ref = json.loads(safetensors_header(step / "model.safetensors")["__metadata__"]["lora_base"])
    assert ref["path"] == str((base / "model.safetensors").resolve()) and len(ref["sha256"]) == 64
    with pytest.raises(WeightError, match="is a LoRA checkpoint .* --merge"):
        resolve_init(str(lora_run))  # not a base to start another run from, until merged
    model = mlx_clip.load(lora_run)[0]
    full = load_file(str(base / "model.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    for k, v in full.items():  # the base as it was, bit for bit
        assert np.array_equal(np.array(params[k]), v), k


def test_merge_gives_the_same_features(lora_run, tmp_path):
    export_main(["--checkpoint", str(lora_run), "--merge", "--to", "mlx_clip", "--out", str(tmp_path / "m")])
    adapted, merged = mlx_clip.load(lora_run)[0], mlx_clip.load(tmp_path / "m")[0]
    assert merged.lora is None and not any(k.endswith("lora_a") for k, _ in tree_flatten(merged.parameters()))
    images, tokens = batch(merged.config)
    for a, b in zip(features(adapted, images, tokens), features(merged, images, tokens), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    export_main(["--checkpoint", str(lora_run), "--merge", "--to", "torch_ref", "--out", str(tmp_path / "t")])
    assert (tmp_path / "t" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="add --merge"):
        export_main(["--checkpoint", str(lora_run), "--to", "torch_ref", "--out", str(tmp_path / "x")])


def test_qlora_trains_from_the_cli(tmp_path, base):
    out = tmp_path / "q"
    summary = train_main([
        "--out", str(out), *FAST, "--steps", "2", "--model.init_from", str(base), *LORA,
        "--finetune.quantize_base", "4", "--finetune.quantize_group_size", "32",
    ])  # fmt: skip
    assert summary["step"] == 2
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if r.get("event") == "train")
    model = mlx_clip.load(out)[0]
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.bits == 4 and m.weight.dtype == mx.uint32 for m in layers)
    notes = merge_lora(model)
    assert "dequantized" in notes[-1]


def test_resume_is_bit_exact_with_lora(tmp_path, base, lora_run):
    """4 steps == 2, stop, --resume, 2 (dropout draws are keyed on the step)."""
    train_main(["--out", str(tmp_path / "half"), *lora_args(base), "--stop-after", "2"])
    train_main(["--out", str(tmp_path / "half"), "--resume", *lora_args(base)])
    for name in ("model", "optimizer"):
        a = load_file(str(lora_run / "checkpoints" / "step_4" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "half" / "checkpoints" / "step_4" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


def test_a_moved_or_changed_base_is_a_clear_error(tmp_path, base):
    shutil.copytree(base, tmp_path / "base")
    out = tmp_path / "run"
    train_main(["--out", str(out), *FAST, "--steps", "1", "--model.init_from", str(tmp_path / "base"), *LORA])
    weights = (tmp_path / "base" / "model.safetensors").resolve()
    weights.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(WeightError, match=f"needs its base weights {weights} \\(sha256 [0-9a-f]{{64}}\\)"):
        mlx_clip.load(out)
    (tmp_path / "elsewhere.safetensors").rename(weights)
    mlx_clip.load(out)  # back in place: loads
    with open(weights, "r+b") as f:  # one byte of the data changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(WeightError, match=f"{weights} with sha256 .* has changed"):
        mlx_clip.load(out)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["--finetune.lora.rank", "0"], "finetune.lora.rank"),
        (["--finetune.lora.targets", "[attn_qkv, conv]"], "finetune.lora.targets"),
        (
            ["--optim.lock_image", "true", "--optim.lock_image_unlocked_layers", "1"],
            "optim.lock_image_unlocked_layers",
        ),
        (["--finetune.lora.dropout", "1.0"], "finetune.lora.dropout"),
        (["--finetune.lora.layers", "9"], "finetune.lora.layers"),
        (["--finetune.quantize_group_size", "48"], "finetune.quantize_group_size"),
    ],
)
def test_config_validation_names_the_key(base, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        small_cfg(base, *extra)


def test_lora_needs_a_base():
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, [("finetune.lora.enabled", "true")])
    assert load_config(None, []).finetune == FinetuneConfig()  # off by default


def test_gradients_match_torch_ref(tmp_path):
    torch = pytest.importorskip("torch")
    import torch_ref
    from mlx_clip.interop.layouts import torch_to_canonical
    from mlx_clip.models.lora import apply_lora, freeze_for_lora
    from mlx_clip.training.loss import clip_loss
    from torch_ref.lora import apply_lora as torch_apply_lora

    lora = LoraConfig(enabled=True, rank=4, alpha=8, targets=["attn_qkv", "attn_out", "mlp", "proj"])
    lora = dataclasses.replace(lora, train_norms=True, train_logit_scale=True)
    m = mlx_clip.create_model(ModelConfig.from_dict(ODD_ARCH), seed=1)
    apply_lora(m, FinetuneConfig(lora))
    freeze_for_lora(m, lora)
    rng = np.random.default_rng(0)  # B != 0, so A gets a gradient too
    m.update(_lora_b_random(m, rng))
    path = tmp_path / "w.safetensors"
    mlx_clip.save_weights(m, path)
    t = torch_ref.create_model(m.config, seed=2, device="cpu")
    torch_apply_lora(t, lora)
    torch_ref.load_weights(t, path)  # strict: the adapters have the same keys in both frameworks
    images, tokens = batch(m.config, n=5, seed=3)
    _, mgrads = nn.value_and_grad(m, lambda model, x, y: clip_loss(*model(x, y)))(
        m, mx.array(images), mx.array(tokens)
    )
    mgrads = {k: np.array(v) for k, v in tree_flatten(mgrads)}
    timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    torch_ref.clip_loss(*t(timages, torch.from_numpy(tokens).long())).backward()
    tgrads = torch_to_canonical({k: p.grad.numpy() for k, p in t.named_parameters() if p.requires_grad})
    assert mgrads.keys() == tgrads.keys() and any(k.endswith("lora_a") for k in mgrads)
    for k in mgrads:
        scale = max(1.0, float(np.abs(tgrads[k]).max()))
        np.testing.assert_allclose(mgrads[k], tgrads[k], rtol=1e-4, atol=1e-6 + 1e-5 * scale, err_msg=k)


def _lora_b_random(model, rng):
    """Every lora_b at small random values (the adapters' gradients are then all nonzero)."""
    from mlx.utils import tree_unflatten

    new = [
        (k, mx.array(0.02 * rng.standard_normal(v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.parameters())
        if k.endswith("lora_b")
    ]
    return tree_unflatten(new)


def test_lora_training_tracks_torch_ref(tmp_path, base):
    """torch_ref.train with the same finetune.lora (same A from lora_a_init, B = 0): the same loss
    curve within 1e-3 relative, so the adapters, freezing and optimizer groups agree."""
    pytest.importorskip("torch")
    from torch_ref.train import main as torch_main

    common = [*FAST, "--steps", "6", "--train.log_every", "1", "--model.init_from", str(base), *LORA]
    common += ["--finetune.lora.train_norms", "true", "--finetune.lora.train_logit_scale", "true"]
    train_main(["--out", str(tmp_path / "mlx"), *common])
    torch_main(["--out", str(tmp_path / "torch"), "--device", "cpu", *common])
    curves = []
    for name in ("mlx", "torch"):
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["loss"] for r in records if r["event"] == "train"])
    assert len(curves[0]) == len(curves[1]) == 6 and curves[0][-1] < curves[0][0]
    for step, (a, b) in enumerate(zip(*curves, strict=True), 1):
        assert abs(a - b) <= 1e-3 * abs(b), (step, a, b)


def test_targets_layers_and_what_stays_trainable():
    from mlx_clip.models.lora_config import frozen_by_lora, lora_targets

    mcfg = ModelConfig.from_dict(ODD_ARCH)  # 3 vision blocks, 2 text blocks, text_projection
    lora = LoraConfig(enabled=True, towers=["text"], targets=["mlp", "proj"], layers=1, train_norms=True)
    assert lora_targets(mcfg, lora) == [
        "text.transformer.resblocks.1.mlp.c_fc",
        "text.transformer.resblocks.1.mlp.c_proj",
        "text.text_projection",
    ]
    assert frozen_by_lora("text.transformer.resblocks.0.attn.in_proj.weight", lora)
    assert not frozen_by_lora("text.transformer.resblocks.1.mlp.c_fc.lora_b", lora)
    assert not frozen_by_lora("text.ln_final.weight", lora)  # train_norms
    assert not frozen_by_lora(
        "visual.transformer.resblocks.0.attn.in_proj.weight", lora
    )  # optim.lock_* decides
    assert frozen_by_lora("logit_scale", lora) and not frozen_by_lora(
        "logit_scale", dataclasses.replace(lora, train_logit_scale=True)
    )


@pytest.mark.parametrize("kernels", ["native", "fast"])
def test_qlora_merge_gives_the_same_features(base, kernels, monkeypatch):
    """The quantized base through mx.quantized_matmul (native) or dequantize + matmul (the CPU
    kernel), adapters nonzero; merging dequantizes and gives the same features within 1e-5."""
    monkeypatch.setenv("MLX_CLIP_KERNELS", kernels)
    model = mlx_clip.create_model(mlx_clip.load(base)[0].config, seed=None)
    ft = FinetuneConfig(LoraConfig(enabled=True, targets=["attn_qkv", "mlp", "proj"]), 8, 32)
    build_lora_model(model, ft, base / "model.safetensors")
    model.update(_lora_b_random(model, np.random.default_rng(1)))
    model.eval()
    images, tokens = batch(model.config)
    adapted = features(model, images, tokens)
    assert "dequantized" in merge_lora(model)[-1]
    for a, b in zip(adapted, features(model, images, tokens), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_with_an_ema_saves_loads_and_merges_the_ema_adapters(tmp_path, base):
    """train.ema_decay with LoRA: ema.safetensors is an adapters-only file like model.safetensors, so
    mlx_clip.load(ema=True) and export --merge --ema take the EMA adapters on the same base."""
    out = tmp_path / "ema"
    train_main(["--out", str(out), *FAST, "--steps", "3", "--model.init_from", str(base), *LORA,
                "--train.ema_decay", "0.5"])  # fmt: skip
    ckpt = out / "checkpoints" / "step_3"
    assert (
        load_file(str(ckpt / "ema.safetensors")).keys() == load_file(str(ckpt / "model.safetensors")).keys()
    )
    raw, ema = mlx_clip.load(ckpt)[0], mlx_clip.load(ckpt, ema=True)[0]
    images, tokens = batch(raw.config)
    ema_features = features(ema, images, tokens)
    assert not np.array_equal(features(raw, images, tokens)[1], ema_features[1])
    export_main(
        ["--checkpoint", str(ckpt), "--merge", "--ema", "--to", "mlx_clip", "--out", str(tmp_path / "m")]
    )
    merged = mlx_clip.load(tmp_path / "m")[0]
    for a, b in zip(features(merged, images, tokens), ema_features, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
