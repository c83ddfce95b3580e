"""Distillation (loss.distill): the loss against open_clip and torch_ref, the embedding store, sample
ids, alignment to the train loader, bad inputs, and embed + distilled training from the CLIs."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import SMALL, encoded

from mlx_clip.config import load_config
from mlx_clip.data.embedding_store import StoreError, align, read_store, write_store
from mlx_clip.data.pipeline import Loader
from mlx_clip.data.readers import source_root
from mlx_clip.data.samples import RowRef, TarRef, sample_id
from mlx_clip.schema import ConfigError
from mlx_clip.training.loss import distill_loss


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(seed, b=6, e=8, d=5):
    rng = np.random.default_rng(seed)
    img, txt = unit(rng.standard_normal((2, b, e))).astype(np.float32)
    t_img, t_txt = unit(rng.standard_normal((2, b, d))).astype(np.float32)
    return img, txt, t_img, t_txt


# ---------------------------------------------------------------------------
# The loss


def open_clip_loss_module():
    """open_clip/loss.py alone (it needs only torch): importing the package takes seconds."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_only", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_distill_loss_matches_open_clip():
    torch = pytest.importorskip("torch")
    open_clip_loss = open_clip_loss_module()
    img, txt, t_img, t_txt = features(0, d=8)  # open_clip's teacher shares the student's width
    ours = distill_loss(*map(mx.array, (img, txt)), mx.array(7.0), mx.array(t_img), mx.array(t_txt), 20.0)
    _, theirs = open_clip_loss.DistillClipLoss()(
        *map(torch.from_numpy, (img, txt)), torch.tensor(7.0), *map(torch.from_numpy, (t_img, t_txt)), 20.0
    )
    assert abs(float(ours) - theirs.item()) < 1e-5


def test_distill_loss_and_gradients_match_torch_ref():
    torch = pytest.importorskip("torch")
    import torch_ref.loss as ref

    img, txt, t_img, t_txt = features(1)  # a teacher of another width than the student

    def ours(img, txt, scale):
        return distill_loss(img, txt, scale, mx.array(t_img), mx.array(t_txt), 14.0)

    args = (mx.array(img), mx.array(txt), mx.array(5.0))
    value, grads = mx.value_and_grad(ours, argnums=(0, 1, 2))(*args)
    tensors = [torch.tensor(a, requires_grad=True) for a in (img, txt, 5.0)]
    theirs = ref.distill_loss(*tensors, torch.from_numpy(t_img), torch.from_numpy(t_txt), 14.0)
    theirs.backward()
    assert abs(float(value) - theirs.item()) < 1e-5
    for g, t in zip(grads, tensors, strict=True):
        np.testing.assert_allclose(np.array(g), t.grad.numpy(), atol=1e-5)


def test_distill_loss_is_least_where_the_student_copies_the_teacher():
    img, txt, _, _ = features(2)
    same = distill_loss(*map(mx.array, (img, txt)), mx.array(10.0), mx.array(img), mx.array(txt), 10.0)
    other = distill_loss(
        *map(mx.array, (img, np.ascontiguousarray(txt[::-1]))),
        mx.array(10.0),
        mx.array(img),
        mx.array(txt),
        10.0,
    )
    logits = 10.0 * img @ txt.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(logits.T - logits.T.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    entropy = (-(p * np.log(p)).sum(1).mean() - (q * np.log(q)).sum(1).mean()) / 2  # the minimum
    assert abs(float(same) - entropy) < 1e-5 and float(other) > float(same)


# ---------------------------------------------------------------------------
# Sample ids and the store


def test_sample_ids_are_relative_to_the_source_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    root = source_root(str(tmp_path / "data.csv"))
    assert sample_id(str(tmp_path / "imgs" / "a.png"), root) == "imgs/a.png"
    assert sample_id(TarRef(str(tmp_path / "s-001.tar"), 512, 10, "k/0.jpg"), root) == "s-001.tar:k/0.jpg"
    assert sample_id(RowRef(str(tmp_path / "p.parquet"), 3, 17, "image"), root) == "p.parquet:3:17"
    assert source_root(str(tmp_path / "imgs")) == str(tmp_path / "imgs")  # a folder source
    assert source_root(str(tmp_path / "s-{000..009}.tar")) == str(tmp_path)
    # a named dataset's or a `datasets` folder's ids are relative to its root, whatever the split
    assert source_root(f"coco:{tmp_path / 'imgs'}:val") == str(tmp_path / "imgs")
    assert source_root(f"hf:{tmp_path / 'imgs'}:validation") == str(tmp_path / "imgs")


def small_store(tmp_path, dim=4, n=5, shard_samples=2):
    rng = np.random.default_rng(0)
    ids = [f"img/{i}.png" for i in range(n)]
    counts = [1 + i % 3 for i in range(n)]
    image = unit(rng.standard_normal((n, dim))).astype(np.float32)
    text = unit(rng.standard_normal((sum(counts), dim))).astype(np.float32)
    meta = {"teacher": "T", "logit_scale": 50.0, "source": "data.csv"}
    write_store(tmp_path / "emb", ids, image, text, counts, meta, "float32", shard_samples)
    return tmp_path / "emb", ids, image, text, counts


def test_store_round_trip_and_alignment_by_id(tmp_path):
    emb, ids, image, text, counts = small_store(tmp_path)
    store = read_store(emb)
    assert store.ids == ids and len(store.index["shards"]) == 3
    np.testing.assert_array_equal(store.image, image)
    np.testing.assert_array_equal(store.text, text)
    # a loader holding samples 3 and 1 (a split, another order): rows follow the loader
    rows = align(store, [ids[3], ids[1]], [counts[3], counts[1]])
    first = sum(counts[:3])
    img, txt = rows.rows(np.array([0, 1, 0]), np.array([0, 1, 1]))  # loader positions, captions drawn
    np.testing.assert_array_equal(img, image[[3, 1, 3]])
    np.testing.assert_array_equal(txt, text[[first, 1 + 1, first + 1]])


def test_missing_samples_are_named(tmp_path):
    emb, ids, *_ = small_store(tmp_path)
    with pytest.raises(StoreError, match=r"emb: 2 of the 3 training samples have no teacher embeddings "
                       r"\('new/a.png', 'new/b.png'\)"):  # fmt: skip
        align(read_store(emb), ["new/a.png", ids[0], "new/b.png"], [1, 1, 1])
    with pytest.raises(StoreError, match=r"sample 'img/0.png' has 1 stored captions but 2"):
        align(read_store(emb), [ids[0]], [2])


def test_a_shard_of_another_dim_is_refused(tmp_path):
    emb, *_ = small_store(tmp_path, dim=4)
    other = tmp_path / "other"
    small_store(other, dim=6)
    (emb / "embeddings-00001.safetensors").write_bytes(
        (other / "emb" / "embeddings-00001.safetensors").read_bytes()
    )
    message = r"00001.safetensors: image embeddings have shape \(2, 6\), but .*index.json says embed_dim 4"
    with pytest.raises(StoreError, match=message):
        read_store(emb)


def test_missing_index_is_refused(tmp_path):
    emb, *_ = small_store(tmp_path)
    (emb / "index.json").unlink()
    with pytest.raises(StoreError, match=r"emb/index.json: missing; write the embeddings with"):
        read_store(emb)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("weight", "-1", r"loss.distill.weight must be in \[0, 1000\], got -1"),
        ("temperature", "0", r"loss.distill.temperature must be in \(0, 100\]"),
        ("temperature", "-0.5", r"loss.distill.temperature must be in \(0, 100\]"),
    ],
)
def test_bad_distill_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [("loss.distill.embeddings", "emb"), (f"loss.distill.{key}", value)])


def test_distill_refuses_accumulation():
    with pytest.raises(ConfigError, match=r"loss.distill does not support optim.accum_steps > 1"):
        load_config(None, [("loss.distill.embeddings", "emb"), ("optim.accum_steps", "2")])


# ---------------------------------------------------------------------------
# Alignment to a train loader of own files, and the batch's drawn captions


def test_teacher_rows_follow_the_batch(tmp_path):
    from mlx_clip.training.distill import load_teacher

    (tmp_path / "imgs").mkdir()
    rows = ["image,caption"]
    for i in range(12):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encoded(i))
        rows += [f"imgs/{i}.png,cap {i} {c}" for c in range(1 + i % 3)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [("data.train", str(tmp_path / "data.csv")), ("data.val_ratio", "0")])
    from mlx_clip.embedding import training_source

    src = training_source(cfg)
    counts = [len(s.captions) for s in src.samples]
    # "embeddings" that say what they are: image row = (sample number, -1), text = (sample, caption)
    number = [int(i.split("/")[1].split(".")[0]) for i in src.ids]
    image = np.array([[n, -1.0] for n in number], np.float32)
    text = np.array([[n, c] for n, k in zip(number, counts, strict=True) for c in range(k)], np.float32)
    write_store(
        tmp_path / "emb", src.ids, image, text, counts, {"teacher": "T", "logit_scale": 9.0}, "float32"
    )
    cfg = load_config(
        None, [("data.train", str(tmp_path / "data.csv")), ("loss.distill.embeddings", str(tmp_path / "emb"))]
    )
    loader = Loader(src.samples[::-1], 4, 16, train=True, seed=3, num_workers=0, tokenize=None)
    teacher = load_teacher(cfg, loader)
    assert teacher.scale == 9.0
    for batch in loader.epoch(1):
        img, txt = map(np.array, teacher.batch_rows(batch))
        caps = [loader.captions[i][c] for i, c in zip(batch["index"], batch["caption_index"], strict=True)]
        assert caps == batch["captions"]  # caption_index is the caption drawn
        assert [f"cap {int(n)} {int(c)}" for n, c in txt] == batch["captions"]
        np.testing.assert_array_equal(img[:, 0], txt[:, 0])
    with pytest.raises(ConfigError, match=r"loss.distill runs on one process only; this run has 2 ranks"):
        load_teacher(cfg, loader, world_size=2)
    mixed = load_config(None, [("loss.distill.embeddings", str(tmp_path / "emb"))])
    mixed.data.train = [{"path": str(tmp_path / "data.csv"), "weight": 1}]
    with pytest.raises(ConfigError, match=r"loss.distill with a mixture .* is not supported yet"):
        load_teacher(mixed, loader)


# ---------------------------------------------------------------------------
# The CLIs end to end


def test_embed_then_distill_from_the_clis(tmp_path, capsys):
    from mlx_clip.embed import main as embed_main
    from mlx_clip.train import main as train_main

    quiet = ["--eval.every", "0", "--train.save_every", "0"]
    train_main(["--out", str(tmp_path / "teacher"), "--steps", "2", *SMALL, *quiet])
    index = embed_main(
        [
            "--checkpoint",
            str(tmp_path / "teacher"),
            "--data",
            "builtin",
            "--out",
            str(tmp_path / "emb"),
            *SMALL,
        ]
    )
    assert index["samples"] == 256 and index["captions"] == 256 * 5
    saved = json.loads((tmp_path / "emb" / "index.json").read_text())
    assert saved["embed_dim"] == 32 and saved["shards"][0]["file"] == "embeddings-00000.safetensors"
    distill = ["--loss.distill.embeddings", str(tmp_path / "emb"), "--loss.distill.weight", "2"]
    summary = train_main(["--out", str(tmp_path / "student"), "--steps", "4", *SMALL, *quiet, *distill])
    assert summary["step"] == 4
    records = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["distill_loss"] for r in records if r.get("event") == "train"]
    assert len(terms) == 2 and all(np.isfinite(terms))
    # with patch dropout too: the kept patches enter the distillation step as they do the plain one
    dropped = ["--model.patch_dropout", "0.5", "--train.log_every", "1"]
    train_main(["--out", str(tmp_path / "dropped"), "--steps", "2", *SMALL, *quiet, *distill, *dropped])
    records = [json.loads(x) for x in (tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["distill_loss"] for r in records if r.get("event") == "train"]
    assert len(terms) == 2 and all(np.isfinite(terms))
    # another built-in dataset than the one embedded: refused, naming both
    with pytest.raises(SystemExit, match=r"embedded from 'built-in shapes"):
        bigger = [*SMALL, "--data.builtin_train_size", "320"]  # (the last value of a key wins)
        train_main(["--out", str(tmp_path / "other"), "--steps", "1", *bigger, *quiet, *distill])


def test_torch_ref_trainer_refuses_distillation_by_name():
    from torch_ref.train import check_mirrored

    with pytest.raises(ConfigError, match=r"torch_ref.train does not mirror loss.distill"):
        check_mirrored(load_config(None, [("loss.distill.embeddings", "emb")]))
    check_mirrored(load_config(None, []))  # the default run is mirrored
