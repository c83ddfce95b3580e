"""Inference API (mlx_clip.inference) and `python -m mlx_clip.predict`: loading, zero-shot
probabilities, search ranking against an independent cosine computation, and the index cache."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_RUN
from mlx.utils import tree_flatten
from PIL import Image

import mlx_clip
from mlx_clip import inference
from mlx_clip.data.synthetic import write_dataset
from mlx_clip.data.transforms import eval_transform
from mlx_clip.inference import SkippedImageWarning, encode_images, encode_texts, index_folder
from mlx_clip.models.locate import file_sha256
from mlx_clip.models.model import CLIP, create_model
from mlx_clip.models.weights import save_weights
from mlx_clip.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return mlx_clip.load(run_dir)


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A run trained with the sigmoid loss: its model has a learnable logit_bias."""
    from mlx_clip.train import main as train_main

    out = tmp_path_factory.mktemp("predict_siglip") / "run"
    train_main(["--out", str(out), *TINY_RUN, "--loss.type", "siglip"])
    return out


@pytest.fixture(scope="module")
def image_src(tmp_path_factory):
    # 48 px images, so the 32 px model's preprocessing really resizes and crops.
    return write_dataset(tmp_path_factory.mktemp("images"), 6, image_size=48, fmt="folder")


@pytest.fixture
def folder(tmp_path, image_src):
    """A fresh copy per test, with two images in a subfolder (the scan is recursive)."""
    out = tmp_path / "imgs"
    (out / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted(image_src.glob("*.png"))):
        shutil.copy2(p, out / ("sub" if i >= 4 else "") / p.name)
    return out


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cli(*args):
    cmd = [sys.executable, "-m", "mlx_clip.predict", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_load_returns_model_tokenizer_preprocess(run_dir, loaded, image_src):
    model, tokenizer, preprocess = loaded
    assert mlx_clip.load is inference.load
    assert isinstance(model, CLIP) and not model.training
    step = run_dir / "checkpoints" / "step_3"
    saved = mx.load(str(step / "model.safetensors"))
    for key, value in tree_flatten(model.parameters()):
        assert mx.array_equal(value, saved[key]), key
    assert tokenizer(["a red circle"]).shape == (1, 16)

    paths = sorted(image_src.glob("*.png"))[:3]
    x = np.stack([preprocess(p) for p in paths])  # from paths
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], eval_transform(32)(Image.open(paths[0])))
    np.testing.assert_array_equal(preprocess(Image.open(paths[1])), x[1])  # from a PIL image
    feats = encode_images(model, preprocess, paths, batch_size=2)
    np.testing.assert_allclose(feats, np.array(model.encode_image(mx.array(x))), atol=1e-5)
    # A step directory gives the same model as the run directory.
    np.testing.assert_allclose(encode_images(mlx_clip.load(step)[0], preprocess, paths), feats, atol=1e-6)


def test_load_without_config_yaml_and_errors(run_dir, loaded, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "checkpoints" / "latest", bare)
    (bare / "config.yaml").unlink()  # the ModelConfig is also in the safetensors header
    model, _, preprocess = mlx_clip.load(bare)
    assert model.config == loaded[0].config and preprocess.image_size == 32
    (bare / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="bare"):
        mlx_clip.load(bare)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        mlx_clip.load(tmp_path / "nothing")


def test_prompts_for():
    t = ("a photo of a {}.", "an {} drawing", "{} in the wild")
    assert inference.prompts_for("cat", t) == ["a photo of a cat.", "an cat drawing", "cat in the wild"]
    assert inference.prompts_for("a cat", t) == ["a photo of a cat.", "a cat drawing", "a cat in the wild"]
    assert inference.prompts_for("The sea", t[:1]) == ["a photo of The sea."]
    assert inference.prompts_for("a dog on a sofa.", t) == ["a dog on a sofa."]  # a sentence: as is
    assert inference.prompts_for(" cat ", ()) == ["cat"]


def test_zero_shot_probs_match_hand_computation(loaded, image_src):
    model, tokenizer, preprocess = loaded
    x = np.stack([preprocess(p) for p in sorted(image_src.glob("*.png"))])
    labels, templates = ["red circle", "a blue square", "green cross."], ("a {}.", "a photo of a {}.")
    probs = inference.zero_shot_probs(model, tokenizer, x, labels, templates)
    assert probs.shape == (6, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)

    # Independent: unnormalised features, numpy normalisation, explicit prompts and softmax.
    prompts = [
        ["a red circle.", "a photo of a red circle."],
        ["a blue square.", "a photo of a blue square."],
        ["green cross."],
    ]
    classes = np.stack(
        [
            _unit(_unit(np.array(model.encode_text(mx.array(tokenizer(p)), normalize=False))).mean(0))
            for p in prompts
        ]
    )
    img = _unit(np.array(model.encode_image(mx.array(x), normalize=False)))
    logits = math.exp(min(model.logit_scale.item(), math.log(100))) * img @ classes.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-5)
    # Image features (N, E) in place of images give the same probabilities.
    feats = encode_images(model, preprocess, sorted(image_src.glob("*.png")))
    np.testing.assert_allclose(
        inference.zero_shot_probs(model, tokenizer, feats, labels, templates), probs, atol=1e-6
    )


def test_siglip_probs_are_independent_sigmoids(siglip_run, image_src):
    """A model trained with loss.type siglip scores each label on its own:
    sigmoid(logit_scale * cos + logit_bias), not a softmax over the labels."""
    model, tokenizer, preprocess = mlx_clip.load(siglip_run)
    saved = mx.load(str(siglip_run / "checkpoints" / "latest" / "model.safetensors"))
    assert model.logit_bias.item() == saved["logit_bias"].item()  # loaded, not the -10 init
    assert inference.probability_kind(model) == "sigmoid" and inference.logit_bias(model) is not None
    x = np.stack([preprocess(p) for p in sorted(image_src.glob("*.png"))])
    labels, templates = ["red circle", "a blue square", "green cross."], ("a {}.",)
    probs = inference.zero_shot_probs(model, tokenizer, x, labels, templates)

    # Independent: explicit prompts, numpy cosine, the sigmoid written out.
    prompts = [["a red circle."], ["a blue square."], ["green cross."]]
    classes = np.stack(
        [_unit(np.array(model.encode_text(mx.array(tokenizer(p)), normalize=False)))[0] for p in prompts]
    )
    img = _unit(np.array(model.encode_image(mx.array(x), normalize=False)))
    scale = math.exp(min(model.logit_scale.item(), math.log(100)))
    expected = 1 / (1 + np.exp(-(scale * img @ classes.T + model.logit_bias.item())))
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
    assert not np.allclose(probs.sum(axis=1), 1.0, atol=0.05)  # no normalisation over the labels
    # A label's probability does not depend on which other labels are asked about.
    alone = inference.zero_shot_probs(model, tokenizer, x, labels[1:2], templates)
    np.testing.assert_allclose(alone[:, 0], probs[:, 1], rtol=1e-5)


def test_siglip_run_predict_and_eval_cli(siglip_run, image_src, tmp_path):
    """predict --json says the probabilities are sigmoids and gives zero_shot_probs'; mlx_clip.eval
    rebuilds the model with its bias from config.yaml and evaluates it; without config.yaml the
    safetensors header's ModelConfig rebuilds the bias too."""
    from mlx_clip.eval import main as eval_main

    images = sorted(image_src.glob("*.png"))[:2]
    labels = ["red circle", "blue square", "green cross"]
    out = predict_main(["--checkpoint", str(siglip_run), "--images", *map(str, images), "--labels", *labels])
    assert out["probability"] == "sigmoid"
    model, tokenizer, preprocess = mlx_clip.load(siglip_run)
    feats = encode_images(model, preprocess, images)
    expected = inference.zero_shot_probs(model, tokenizer, feats, labels)
    for res, row in zip(out["results"], expected, strict=True):
        np.testing.assert_allclose([res["probs"][label] for label in labels], row, rtol=1e-6)

    metrics = eval_main(["--checkpoint", str(siglip_run), "--out", str(tmp_path / "eval.json")])
    assert 0 <= metrics["zeroshot_top1"] <= 1 and "i2t_R@1" in metrics

    bare = tmp_path / "bare"
    shutil.copytree(siglip_run / "checkpoints" / "latest", bare)
    (bare / "config.yaml").unlink()
    assert mlx_clip.load(bare)[0].logit_bias.item() == model.logit_bias.item()


def test_search_ranks_by_cosine_similarity(loaded, run_dir, folder):
    model, tokenizer, preprocess = loaded
    sha = file_sha256(run_dir / "checkpoints" / "latest" / "model.safetensors")
    index = index_folder(model, preprocess, folder, sha, batch_size=4)
    assert index.paths == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "sub/000004.png",
        "sub/000005.png",
    ]
    query = "a small red circle on the left"
    hits = index.search(encode_texts(model, tokenizer, [query])[0], top=10)

    t = eval_transform(32)
    x = np.stack([t(Image.open(folder / p)) for p in index.paths])
    img = _unit(np.array(model.encode_image(mx.array(x), normalize=False)))
    txt = _unit(np.array(model.encode_text(mx.array(tokenizer([query])), normalize=False)))[0]
    cos = img @ txt
    order = np.argsort(-cos)
    assert [p for p, _ in hits] == [index.paths[i] for i in order]
    np.testing.assert_allclose([s for _, s in hits], cos[order], atol=1e-5)
    assert [p for p, _ in index.search(txt.astype(np.float32), top=2)] == [index.paths[i] for i in order[:2]]


def test_cache_reuses_and_refreshes(loaded, run_dir, folder, tmp_path, monkeypatch):
    model, tokenizer, preprocess = loaded
    calls = []

    def counting(model, preprocess, images, *args, **kwargs):
        calls.append([Path(p).relative_to(folder).as_posix() for p in images])
        return real(model, preprocess, images, *args, **kwargs)

    real = inference.encode_images
    monkeypatch.setattr(inference, "encode_images", counting)
    sha = file_sha256(run_dir / "checkpoints" / "latest" / "model.safetensors")

    def index():
        calls.clear()
        return index_folder(model, preprocess, folder, sha)

    first = index()
    assert calls == [first.paths] and first.embedded == 6 and first.reused == 0
    assert first.cache_file == folder / ".mlx_clip_index" / f"{sha[:16]}.safetensors"
    manifest = json.loads(first.cache_file.with_suffix(".json").read_text())
    assert [f["path"] for f in manifest["files"]] == first.paths and manifest["model_sha256"] == sha
    mtime = first.cache_file.stat().st_mtime_ns

    second = index()  # nothing changed: nothing embedded, the cache is not rewritten
    assert calls == [] and second.reused == 6 and second.paths == first.paths
    np.testing.assert_array_equal(second.features, first.features)
    assert first.cache_file.stat().st_mtime_ns == mtime

    st = (folder / "000001.png").stat()
    os.utime(folder / "000001.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    shutil.copyfile(folder / "000003.png", folder / "sub/000004.png")  # replaced (new content and mtime)
    os.utime(folder / "sub/000004.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    third = index()
    assert calls == [["000001.png", "sub/000004.png"]] and third.embedded == 2 and third.reused == 4
    row = third.paths.index
    np.testing.assert_allclose(
        third.features[row("sub/000004.png")], first.features[row("000003.png")], atol=1e-6
    )
    assert not np.allclose(third.features[row("sub/000004.png")], first.features[row("sub/000004.png")])

    (folder / "000002.png").unlink()
    (folder / "sub" / "bad.png").write_bytes(b"not an image")
    shutil.copyfile(folder / "000000.png", folder / "sub" / "new.jpg")  # any extension: PIL sniffs
    with pytest.warns(SkippedImageWarning, match="bad.png"):
        fourth = index()
    assert calls == [["sub/bad.png", "sub/new.jpg"]] and fourth.skipped == ["sub/bad.png"]
    assert "000002.png" not in fourth.paths and "sub/new.jpg" in fourth.paths and fourth.removed == 1
    manifest = json.loads(first.cache_file.with_suffix(".json").read_text())
    assert [f["path"] for f in manifest["files"]] == fourth.paths

    # Another checkpoint: its own cache file, everything embedded with its own weights.
    other = tmp_path / "other"
    shutil.copytree(run_dir / "checkpoints" / "latest", other)
    save_weights(create_model(model.config, seed=1), other / "model.safetensors")
    model2, _, _ = mlx_clip.load(other, verify=False)  # weights swapped by hand: checksums differ
    sha2 = file_sha256(other / "model.safetensors")
    calls.clear()
    with pytest.warns(SkippedImageWarning):
        fifth = index_folder(model2, preprocess, folder, sha2)
    assert sha2 != sha and fifth.cache_file != first.cache_file and fifth.embedded == len(fifth.paths)
    assert first.cache_file.is_file() and fifth.cache_file.is_file()
    assert not np.allclose(fifth.features, fourth.features, atol=1e-3)


def test_cache_dir_corruption_and_unwritable(loaded, folder, tmp_path):
    model, _, preprocess = loaded
    sha = "ab" * 32
    first = index_folder(model, preprocess, folder, sha, cache_dir=tmp_path / "cache")
    assert first.cache_file.parent.parent == tmp_path / "cache" and not (folder / ".mlx_clip_index").exists()
    assert index_folder(model, preprocess, folder, sha, cache_dir=tmp_path / "cache").reused == 6

    manifest = first.cache_file.with_suffix(".json")
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, generation="stale")))  # an interrupted update
    with pytest.warns(UserWarning, match="ignored"):
        assert index_folder(model, preprocess, folder, sha, cache_dir=tmp_path / "cache").embedded == 6
    first.cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignored"):
        again = index_folder(model, preprocess, folder, sha, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(again.features, first.features, atol=1e-6)

    (tmp_path / "file").write_text("")  # a cache location that cannot be created
    with pytest.warns(UserWarning, match="cannot write the index cache"):
        broken = index_folder(model, preprocess, folder, sha, cache_dir=tmp_path / "file")
    assert broken.cache_file is None and len(broken.paths) == 6


def test_cli_zero_shot(run_dir, image_src):
    images = sorted(image_src.glob("*.png"))[:2]
    labels = ["red circle", "blue square", "green cross"]
    r = _cli("--checkpoint", run_dir, "--images", *images, "--labels", *labels)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(images[0]) and lines[4] == str(images[1])
    for block in (lines[1:4], lines[5:8]):
        probs = [float(line.split("%")[0]) for line in block]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 100) < 0.05
        assert sorted(line.split("%  ")[1] for line in block) == sorted(labels)

    r = _cli("--checkpoint", run_dir, "--images", *images, "--labels", *labels, "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["probability"] == "softmax"
    assert [res["image"] for res in out["results"]] == [str(p) for p in images]
    for res in out["results"]:
        assert abs(sum(res["probs"].values()) - 1) < 1e-5 and len(res["top"]) == 2
        assert res["top"][0]["prob"] == max(res["probs"].values()) >= res["top"][1]["prob"]


def test_cli_search(run_dir, folder, capsys):
    r = _cli("--checkpoint", run_dir, "--index", folder, "--query", "a red circle", "a blue square", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 6 and out["index"]["embedded"] == 6
    for q in out["queries"]:
        scores = [h["score"] for h in q["results"]]
        assert len(scores) == 6 and scores == sorted(scores, reverse=True)

    (folder / "broken.png").write_bytes(b"")
    predict_main(
        ["--checkpoint", str(run_dir), "--index", str(folder), "--query", "a red circle", "--top", "3"]
    )
    captured = capsys.readouterr()
    assert "warning: skipped" in captured.err and "broken.png" in captured.err
    assert "0 embedded, 6 reused" in captured.out and captured.out.count(str(folder)) == 4


def test_cli_errors_name_the_path(run_dir, image_src, tmp_path):
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--index", str(image_src), "--query", "x"], "missing"),
        (
            ["--checkpoint", str(run_dir), "--images", str(tmp_path / "no.png"), "--labels", "a", "b"],
            "no.png",
        ),
        (["--checkpoint", str(run_dir), "--index", str(tmp_path / "nodir"), "--query", "x"], "nodir"),
    ]
    (tmp_path / "bad.png").write_bytes(b"junk")
    cases.append(
        (["--checkpoint", str(run_dir), "--images", str(tmp_path / "bad.png"), "--labels", "a"], "bad.png")
    )
    for argv, name in cases:
        with pytest.raises(SystemExit) as e:
            predict_main(argv)
        assert str(e.value.code).startswith("error: ") and name in str(e.value.code)
    with pytest.raises(SystemExit):  # a template without a slot for the label
        predict_main(
            ["--checkpoint", str(run_dir), "--images", "x.png", "--labels", "a", "--templates", "oops"]
        )


def test_search_reads_the_checkpoint_once(run_dir, folder, monkeypatch):
    """load() checks model.safetensors against state.json; the index key reuses that digest instead
    of hashing the file again (a SO400M checkpoint is 3.5 GB)."""
    from mlx_clip.models import locate

    real, hashed = locate.file_sha256, []
    monkeypatch.setattr(locate, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    predict_main(["--checkpoint", str(run_dir), "--index", str(folder), "--query", "a red circle"])
    assert hashed.count("model.safetensors") == 1
    hashed.clear()
    predict_main(["--checkpoint", str(run_dir), "--index", str(folder), "--query", "x", "--no-verify"])
    assert hashed == ["model.safetensors"]  # not verified: hashed for the index key only
