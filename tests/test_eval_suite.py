"""The evaluation suite (mlx_clip/evaluation/suite.py) and `python -m mlx_clip.eval` on named sets.

The suite tests use numpy encoders (an image's feature is a projection of its mean colour), so
they check the bookkeeping against the metric functions directly; the CLI tests run a tiny
random-init checkpoint end to end.
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.samples import DataError
from mlx_clip.evaluation.classification import zero_shot_metrics
from mlx_clip.evaluation.datasets import DataChecks
from mlx_clip.evaluation.metrics import retrieval_metrics, zero_shot_classifier
from mlx_clip.evaluation.suite import EvalSetSpec, class_text_features, evaluate_sets, load_sets, parse_spec
from mlx_clip.evaluation.templates import load_templates

COLOURS = {"red_fox": (220, 40, 30), "green_frog": (30, 200, 60), "blue_jay": (40, 60, 220)}


def solid(path, colour, seed, size=40):
    """A `colour` image with a little noise, written to `path` (parents created)."""
    noise = np.random.default_rng(seed).integers(-20, 21, (size, size, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root, per_class=4, seed=0):
    """root/<class>/<i>.png: 3 classes x `per_class` images of the class's colour."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            solid(root / name / f"{i}.png", colour, seed + 100 * k + i)
    return root


def karpathy(root, n=5):
    """root/karpathy.json: n test images (two captions each) and one train image."""
    images = []
    for i, colour in enumerate(
        [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (9, 9, 9)][: n + 1]
    ):
        solid(root / "img" / f"{i}.png", colour, i)
        split = "train" if i == n else "test"
        sentences = [{"raw": f"picture number {i}"}, {"raw": f"image {i} of a colour"}]
        images.append({"filepath": "img", "filename": f"{i}.png", "split": split, "sentences": sentences})
    path = root / "karpathy.json"
    path.write_text(json.dumps({"images": images}))
    return path


# Numpy encoders: fixed random projections, so features are deterministic and shared by every test.
PROJECT = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
VOCAB = np.random.default_rng(1).normal(size=(997, 8)).astype(np.float32)


def encode_image(images):
    return images.mean(axis=(1, 2)) @ PROJECT  # (B, S, S, 3) -> (B, 8)


def tokenize(texts):
    return np.array([[hash(w) % 997 for w in (t.split() + ["<pad>"] * 12)[:12]] for t in texts], np.int32)


def encode_text(tokens):
    return VOCAB[tokens].sum(axis=1)  # (B, T) -> (B, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return {
        "folder": image_folder(root / "colours"),
        "train": image_folder(root / "probe_train", per_class=6, seed=7),
        "karpathy": karpathy(root),
    }


# ---------------------------------------------------------------------------
# Specs


def test_parse_spec_forms_and_errors():
    assert parse_spec("zeroshot", "pets=data/pets") == EvalSetSpec("pets", "zeroshot", "data/pets")
    assert parse_spec("zeroshot", " in1k = val/ ", "short").templates == "short"
    assert parse_spec("retrieval", "coco=a=b.json").path == "a=b.json"  # the first '=' splits
    assert parse_spec("linear_probe", "p=tr,te") == EvalSetSpec("p", "linear_probe", "tr", "te")
    with pytest.raises(ValueError, match="unknown evaluation set kind 'zeroshots'; use one of zeroshot"):
        parse_spec("zeroshots", "a=b")
    for kind, text, says in [
        ("zeroshot", "pets", "expected NAME=PATH"),
        ("zeroshot", "=pets", "expected NAME=PATH"),
        ("retrieval", "coco=", "expected NAME=PATH"),
        ("zeroshot", "a/b=x", "no '/' or space"),
        ("linear_probe", "p=train", "expected NAME=TRAIN,TEST"),
        ("linear_probe", "p=a,b,c", "expected NAME=TRAIN,TEST"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_spec(kind, text)


def test_load_sets_reads_once_and_fails_early(data, tmp_path):
    specs = [
        parse_spec("zeroshot", f"colours={data['folder']}", "short"),
        parse_spec("retrieval", f"caps={data['karpathy']}"),
        parse_spec("linear_probe", f"probe={data['train']},{data['folder']}"),
    ]
    zs, ret, probe = load_sets(specs, image_size=32)
    assert zs.data.classnames == ["blue jay", "green frog", "red fox"] and len(zs.data) == 12
    assert zs.templates == load_templates("short") and zs.image_size == 32
    assert len(ret.data) == 5 and ret.data.captions[0] == ["picture number 0", "image 0 of a colour"]
    assert len(probe.data) == 18 and len(probe.test) == 12

    with pytest.raises(DataError, match="set name 'colours' is given twice"):
        load_sets([specs[0], parse_spec("retrieval", f"colours={data['karpathy']}")], 32)
    with pytest.raises(DataError, match=r"zeroshot set 'x': .*nowhere: no such file or folder"):
        load_sets([parse_spec("zeroshot", f"x={tmp_path / 'nowhere'}")], 32)
    with pytest.raises(DataError, match="unknown kind 'detection'"):
        load_sets([EvalSetSpec("x", "detection", str(data["folder"]))], 32)
    with pytest.raises(DataError, match="templates 'fancy': no such file"):
        load_sets([parse_spec("zeroshot", f"x={data['folder']}", "fancy")], 32)
    # the two splits of a probe must name the same classes
    other = image_folder(tmp_path / "other", per_class=2)
    (other / "red_fox").rename(other / "red_wolf")
    with pytest.raises(DataError, match="both splits need the same class list"):
        load_sets([parse_spec("linear_probe", f"p={data['train']},{other}")], 32)
    # "dataset" templates: the set's own file when it has one, else OpenAI's 80
    assert load_sets([parse_spec("zeroshot", f"x={data['folder']}", "dataset")], 32)[
        0
    ].templates == load_templates("openai")
    own = image_folder(tmp_path / "own", per_class=1)
    (own / "zeroshot_classification_templates.txt").write_text("a {c} in colour.\n")
    assert load_sets([parse_spec("zeroshot", f"x={own}", "dataset")], 32)[0].templates == ["a {} in colour."]


def test_evaluate_sets_equals_the_metric_functions(data):
    specs = [
        parse_spec("zeroshot", f"colours={data['folder']}", "short"),
        parse_spec("retrieval", f"caps={data['karpathy']}"),
        parse_spec("linear_probe", f"probe={data['train']},{data['folder']}"),
    ]
    loaded = load_sets(specs, image_size=32)
    calls = []

    def counting_text(tokens):
        calls.append(len(tokens))
        return encode_text(tokens)

    scalars, details = evaluate_sets(loaded, encode_image, counting_text, tokenize, batch_size=8)
    # zero-shot: 3 classes x 7 templates, encoded once, in batches of 8; then 10 retrieval captions
    assert calls == [8, 8, 5, 8, 2]
    zs = loaded[0]
    from mlx_clip.evaluation.eval_images import image_features

    feats, kept = image_features(zs.data, encode_image, 32)
    prompts = [t.format(c) for c in zs.data.classnames for t in zs.templates]
    classifier = zero_shot_classifier(encode_text(tokenize(prompts)).reshape(3, 7, -1))
    np.testing.assert_allclose(
        class_text_features(zs.data.classnames, zs.templates, encode_text, tokenize), classifier, atol=1e-6
    )
    want = zero_shot_metrics(feats, classifier, zs.data.labels[kept], zs.data.classnames)
    for k in ("top1", "mean_per_class_recall"):
        assert scalars[f"colours/{k}"] == pytest.approx(want[k], abs=1e-9)
    assert "colours/top5" not in scalars  # 3 classes: top-5 is left out
    d = details["colours"]
    assert d["kind"] == "zeroshot" and d["images"] == 12 and d["skipped"] == 0 and d["templates"] == 7
    assert d["confusion"] == want["confusion"].tolist() and sum(map(sum, d["confusion"])) == 12
    assert set(d["per_class_recall"]) == {"blue jay", "green frog", "red fox"}
    json.dumps(details)  # plain JSON types

    ret = loaded[1]
    feats, kept = image_features(ret.data, encode_image, 32)
    texts, owner = ret.data.queries(kept)
    want = retrieval_metrics(feats, encode_text(tokenize(texts)), owner)
    for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10", "t2i_mean_rank", "i2t_median_rank"):
        assert scalars[f"caps/{k}"] == pytest.approx(want[k], abs=1e-9)
    assert details["caps"] == {"kind": "retrieval", "images": 5, "captions": 10, "skipped": 0}

    # linear probe: colours are separable by their mean, so the probe is perfect
    assert scalars["probe/probe_top1"] == 1.0 and scalars["probe/probe_mean_per_class_recall"] == 1.0
    assert details["probe"]["train_images"] == 18 and details["probe"]["images"] == 12
    assert details["probe"]["confusion"] == (np.eye(3, dtype=int) * 4).tolist()


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "cut", per_class=3)
    png = (root / "red_fox" / "0.png").read_bytes()
    (root / "red_fox" / "0.png").write_bytes(png[: len(png) // 2])  # header intact: passes the scan
    (root / "blue_jay" / "1.png").write_bytes(b"not an image")  # fails the scan
    with pytest.warns(Warning):
        loaded = load_sets(
            [parse_spec("zeroshot", f"cut={root}", "short")], 32, DataChecks(max_bad_fraction=0.5)
        )
        _, details = evaluate_sets(loaded, encode_image, encode_text, tokenize)
    assert details["cut"]["skipped"] == 2 and details["cut"]["images"] == 7


# ---------------------------------------------------------------------------
# python -m mlx_clip.eval on named sets

TINY = [
    "--steps", "1", "--model.image_size", "32", "--model.patch_size", "8", "--model.vision_width", "32",
    "--model.vision_heads", "2", "--model.vision_layers", "1", "--model.text_width", "32",
    "--model.text_layers", "1", "--model.context_length", "16", "--model.vocab_size", "600",
    "--model.embed_dim", "16", "--data.builtin_train_size", "32", "--data.builtin_val_size", "16",
    "--data.batch_size", "16", "--train.progress", "false", "--eval.every", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(a one-step run's checkpoint, a copy of it with other random weights)."""
    import shutil

    from mlx_clip.models.model import create_model
    from mlx_clip.models.weights import save_weights
    from mlx_clip.train import main as train_main

    root = tmp_path_factory.mktemp("eval_cli")
    train_main(["--out", str(root / "run"), *TINY])
    a = root / "run" / "checkpoints" / "latest"
    b = root / "other"
    shutil.copytree(a.resolve(), b)
    model, _, _ = __import__("mlx_clip").load(a)
    save_weights(create_model(model.config, seed=123), b / "model.safetensors")
    return a.resolve(), b


def cli(*argv):
    from mlx_clip.eval import main as eval_main

    return eval_main([str(a) for a in argv])


def test_cli_sets_table_json_and_png(checkpoints, data, tmp_path, capsys):
    a, _ = checkpoints
    out = tmp_path / "res" / "eval.json"
    sets = ["--zeroshot", f"colours={data['folder']}", "--retrieval", f"caps={data['karpathy']}"]
    sets += ["--linear-probe", f"probe={data['train']},{data['folder']}"]
    result = cli("--checkpoint", a, *sets, "--templates", "short", "--batch-size", "8", "--out", out)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["set", "metric", "value"]
    assert "colours  top1" in printed and "caps     i2t_R@1" in printed and "probe_top1" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["checkpoint"] == str(a)
    assert {
        "colours/top1",
        "colours/mean_per_class_recall",
        "caps/t2i_median_rank",
        "probe/probe_top1",
    } <= set(saved["metrics"])
    assert saved["details"]["colours"]["per_class_recall"].keys() == {"blue jay", "green frog", "red fox"}
    assert np.array(saved["details"]["colours"]["confusion"]).sum() == 12
    png = out.parent / "confusion_colours.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (out.parent / "confusion_caps.png").exists()


def test_cli_compare_differences(checkpoints, data, tmp_path, capsys):
    a, b = checkpoints
    sets = ["--zeroshot", f"colours={data['folder']}", "--retrieval", f"caps={data['karpathy']}"]
    out = tmp_path / "ab.json"
    result = cli(
        "--checkpoint", a, "--compare", b, "--no-verify", *sets, "--templates", "short", "--out", out
    )
    printed = capsys.readouterr().out
    assert printed.splitlines()[2].split() == ["set", "metric", "A", "B", "B-A"]
    mine, theirs = result["metrics"], result["compare"]["metrics"]
    assert result["compare"]["checkpoint"] == str(b) and mine != theirs
    assert result["difference"] == {k: theirs[k] - mine[k] for k in mine}
    assert json.loads(out.read_text())["difference"] == result["difference"]
    assert (tmp_path / "confusion_colours.png").is_file() and (tmp_path / "confusion_colours_B.png").is_file()
    # a checkpoint against itself: every difference is 0
    same = cli(
        "--checkpoint", a, "--compare", a, *sets, "--templates", "short", "--out", tmp_path / "aa.json"
    )
    assert set(same["difference"].values()) == {0.0}
    assert "+0.0000" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(checkpoints, data, tmp_path):
    a, _ = checkpoints
    folder = f"colours={data['folder']}"
    for argv, says in [
        (["--zeroshot", "colours"], "error: zeroshot set 'colours': expected NAME=PATH"),
        (["--zeroshot", f"x={tmp_path / 'nope'}"], "error: zeroshot set 'x': .*nope: no such file or folder"),
        (
            ["--zeroshot", folder, "--retrieval", f"colours={data['karpathy']}"],
            "error: set name 'colours' is given twice",
        ),
        (["--linear-probe", folder], "error: linear_probe set .*expected NAME=TRAIN,TEST"),
        (["--zeroshot", folder, "--templates", "fancy"], "error: templates 'fancy': no such file"),
        (["--compare", a], "error: --compare needs at least one"),
        (["--zeroshot", folder, "--data", "x.csv"], "error: --data is for the run's own val split"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli("--checkpoint", a, *argv, "--out", tmp_path / "e.json")
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        assert re.match(says, e.value.code), e.value.code
    with pytest.raises(SystemExit, match="error: .*nowhere"):
        cli("--checkpoint", tmp_path / "nowhere", "--zeroshot", folder)
    with pytest.raises(SystemExit, match=r"^error: .*missing\.csv: no such file"):  # was a traceback
        cli("--checkpoint", a, "--data", tmp_path / "missing.csv", "--out", tmp_path / "e.json")


def test_cli_without_sets_keeps_the_run_val_json(checkpoints, tmp_path, capsys):
    a, _ = checkpoints
    metrics = cli("--checkpoint", a, "--out", tmp_path / "val.json")
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(metrics))
    assert "zeroshot_top1" in metrics and "i2t_R@1" in metrics and metrics["checkpoint"] == str(a)


def test_cli_builtin_val_as_a_table_equals_training_eval(checkpoints, tmp_path):
    """The run's own held-out images written to disk (a labelled CSV, the 24 class names, the
    built-in prompts) give the zero-shot numbers of training's evaluation."""
    from mlx_clip.data.run_data import BUILTIN_SEED
    from mlx_clip.data.synthetic import generate
    from mlx_clip.data.synthetic_captions import TEMPLATES
    from mlx_clip.data.synthetic_scene import CLASSNAMES

    a, _ = checkpoints
    val = generate(16, image_size=32, seed=BUILTIN_SEED, part="val", split="single", grid=0)  # as TINY's val
    rows = ["image,label"]
    for i, (image, label) in enumerate(zip(val.images, val.labels, strict=True)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{CLASSNAMES[label]}")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    ours = cli("--checkpoint", a, "--zeroshot", f"builtin={tmp_path / 'val.csv'}", "--templates", "dataset")
    run = cli("--checkpoint", a, "--out", tmp_path / "run_eval.json")
    assert ours["details"]["builtin"]["images"] == 16
    assert ours["metrics"]["builtin/top1"] == pytest.approx(run["zeroshot_top1"], abs=1e-9)
    assert ours["metrics"]["builtin/top5"] == pytest.approx(run["zeroshot_top5"], abs=1e-9)
