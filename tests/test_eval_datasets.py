"""Evaluation sets on disk (mlx_clip/evaluation/{datasets,retrieval_sets,eval_images,templates}.py).

Every dataset is built in tmp_path: tiny PIL images, tar shards through conftest's write_members,
Karpathy JSON by hand. Checks classes, labels and captions, each bad input's message, bad images
skipped and counted as in training, and the shipped templates and class names.
"""

import json
import re

import numpy as np
import pytest
from conftest import encoded, save_image, write_members

from mlx_clip.data.checks import BadDataWarning, SkipLog
from mlx_clip.data.decode import decode_image
from mlx_clip.data.samples import DataError
from mlx_clip.data.transforms import EvalTransform
from mlx_clip.evaluation.datasets import (
    DataChecks,
    read_classification,
    read_image_folder,
    read_labelled_table,
    read_wds_classification,
)
from mlx_clip.evaluation.eval_images import eval_batches, eval_loader, image_features
from mlx_clip.evaluation.retrieval_sets import read_captioned, read_karpathy, read_retrieval
from mlx_clip.evaluation.templates import PROMPTS_DIR, load_classnames, load_templates

quiet = pytest.mark.filterwarnings("ignore::mlx_clip.data.checks.BadDataWarning")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cut_png(seed):
    """A PNG whose header is intact and whose pixel data is cut short: passes a header scan."""
    png = encoded(seed, "PNG", 64, 64)
    return png[: len(png) // 2]


@pytest.fixture
def folder(tmp_path):
    """root/<class>/...: 3 classes (one with images in a sub-folder), a hidden file and a note."""
    root = tmp_path / "pets"
    for i in range(3):
        save_image(root / "tabby_cat" / f"{i}.png", seed=i)
    for i in range(2):
        save_image(root / "dog" / "sub" / f"{i}.jpg", seed=10 + i)
    save_image(root / "axolotl" / "a.webp", seed=20)
    save_image(root / "dog" / ".hidden.png", seed=21)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


# ---------------------------------------------------------------------------
# ImageFolder


def test_image_folder_classes_labels_and_names(folder):
    ds = read_image_folder(folder)
    assert ds.classnames == ["axolotl", "dog", "tabby cat"]  # sorted folder names, _ -> space
    assert ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert [str(p).split("pets/")[1] for p in ds.images] == [
        "axolotl/a.webp",
        "dog/sub/0.jpg",
        "dog/sub/1.jpg",
        "tabby_cat/0.png",
        "tabby_cat/1.png",
        "tabby_cat/2.png",
    ]
    assert ds.templates is None and ds.skipped == [] and ds.name == str(folder)
    # classnames.txt inside the root names the classes in sorted folder order
    (folder / "classnames.txt").write_text("\ufeffaxolotl\ndomestic dog\ntabby cat\n\n")
    assert read_classification(folder).classnames == ["axolotl", "domestic dog", "tabby cat"]
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    assert read_classification(folder).templates == ["a photo of a {}."]  # the set's own prompts


def test_image_folder_bad_layouts(folder, tmp_path):
    (folder / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"classnames\.txt: 2 class names but 3 class folders in .*pets"):
        read_image_folder(folder)
    (folder / "classnames.txt").write_text("a\n\nb\nc\n")
    with pytest.raises(DataError, match=r"classnames\.txt:2: blank line"):
        read_image_folder(folder)
    (folder / "classnames.txt").unlink()
    (folder / "empty_class").mkdir()
    (folder / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"empty_class: empty class folder \(class 2, 'empty class'\)"):
        read_image_folder(folder)
    (tmp_path / "flat").mkdir()
    save_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(tmp_path / "flat")
    with pytest.raises(DataError, match="nowhere: no such folder"):
        read_image_folder(tmp_path / "nowhere")


def test_bad_images_are_skipped_counted_and_logged_as_in_training(folder, tmp_path):
    for i in range(3, 20):  # enough good images that 2 bad ones stay under max_bad_fraction
        save_image(folder / "tabby_cat" / f"{i}.png", seed=i)
    write(folder / "dog" / "junk.png", b"not an image")
    write(folder / "dog" / "zero.jpg", b"")
    log = SkipLog(tmp_path / "skipped.jsonl")
    with pytest.warns(BadDataWarning, match=r"pets: skipped 2 of 25 items .*1 not_an_image, 1 empty_file"):
        ds = read_image_folder(folder, data_checks=DataChecks(max_bad_fraction=0.1, log=log))
    log.close()
    assert len(ds) == 23 and sorted(s.reason for s in ds.skipped) == ["empty_file", "not_an_image"]
    lines = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert sorted(x["item"].rsplit("/", 1)[1] for x in lines) == ["junk.png", "zero.jpg"]
    assert {x["stage"] for x in lines} == {"scan"}
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match=r"more than max_bad_fraction=0\.05"):
        read_image_folder(folder)  # the training default


# ---------------------------------------------------------------------------
# Batches of preprocessed images


def mean_rgb(images):
    """A stand-in encoder: (B, S, S, 3) -> (B, 3), enough to tell images apart."""
    return images.mean(axis=(1, 2))


@quiet
def test_image_features_go_through_the_eval_pipeline_and_drop_decode_failures(folder, tmp_path):
    write(folder / "dog" / "sub" / "cut.png", cut_png(5))  # header fine: the scan keeps it
    ds = read_image_folder(folder)
    assert len(ds) == 7 and ds.skipped == []
    cut = [str(p).endswith("cut.png") for p in ds.images].index(True)
    log = SkipLog(tmp_path / "skipped.jsonl")
    checks = DataChecks(log=log)
    feats, kept = image_features(ds, mean_rgb, 16, batch_size=3, num_workers=2, data_checks=checks)
    log.close()
    assert kept.tolist() == [i for i in range(7) if i != cut]
    want = np.stack([decode_image(ds.images[i], EvalTransform(16)) for i in kept])  # CLIP's eval input
    np.testing.assert_allclose(feats, mean_rgb(want), rtol=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [(x["reason"], x["stage"], x["index"]) for x in lines] == [("truncated_image", "decode", cut)]
    assert ds.labels[kept].tolist() == [0, 1, 1, 2, 2, 2]  # the labels that go with the features
    # batches keep their size, the substitute row is marked
    loader = eval_loader(ds, 16, batch_size=4, num_workers=0)
    sizes, keeps = zip(*[(len(x), k.tolist()) for x, _, k in eval_batches(loader)], strict=True)
    assert sizes == (4, 3) and sum(not k for ks in keeps for k in ks) == 1


# ---------------------------------------------------------------------------
# CLIP_benchmark's WebDataset layout


def wds_set(root, shards, classnames=("cat", "dog", "newt"), templates=None):
    """root/test/{0..n-1}.tar with nshards.txt, root/classnames.txt (+ templates)."""
    (root / "test").mkdir(parents=True)
    for k, members in enumerate(shards):
        write_members(root / "test" / f"{k}.tar", members)
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


def item(key, label, seed, ext="webp"):
    """A classification sample's members: key.<ext> (an image) and key.cls (its label as text)."""
    return [
        (f"{key}.{ext}", encoded(seed, ext.upper().replace("JPG", "JPEG"))),
        (f"{key}.cls", f"{label}\n".encode()),
    ]


def test_wds_classification_layout(tmp_path):
    root = tmp_path / "wds_pets"
    shards = [item("s0", 2, 0) + item("s1", 0, 1, "png"), item("s2", 1, 2, "jpg") + [("s3.png", encoded(3))]]
    templates = ["a photo of a {c}.", "itap of a {c}.", "a photo of a {c}."]
    wds_set(root, shards, templates=templates)
    with pytest.warns(BadDataWarning, match=r"1 unpaired"):
        ds = read_classification(root, data_checks=DataChecks(max_bad_fraction=0.5))
    assert ds.labels.tolist() == [2, 0, 1] and ds.classnames == ["cat", "dog", "newt"]
    assert [im.name for im in ds.images] == ["s0.webp", "s1.png", "s2.jpg"]
    assert ds.templates == ["a photo of a {}.", "itap of a {}."]  # normalised, repeats dropped
    assert [s.reason for s in ds.skipped] == ["unpaired"] and "s3.cls" in ds.skipped[0].detail
    feats, kept = image_features(ds, mean_rgb, 16, num_workers=2)
    assert kept.tolist() == [0, 1, 2] and feats.shape == (3, 3)
    # a shard path or glob: classnames.txt one level up; nshards.txt is not needed
    with pytest.warns(BadDataWarning, match=r"test/\*\.tar: skipped 1 of 4 items"):
        ds2 = read_wds_classification(
            str(root / "test" / "*.tar"), data_checks=DataChecks(max_bad_fraction=0.5)
        )
    assert ds2.labels.tolist() == [2, 0, 1] and ds2.templates == ds.templates


def test_wds_bad_labels_and_layouts(tmp_path):
    wds_set(tmp_path / "a", [item("s0", 3, 0)])
    with pytest.raises(DataError, match=r"0\.tar:s0\.cls: label '3' of s0\.webp is not a class index 0\.\.2"):
        read_wds_classification(tmp_path / "a")
    wds_set(tmp_path / "b", [item("s0", "cat", 0)])
    with pytest.raises(DataError, match=r"label 'cat' of s0\.webp is not a class index"):
        read_wds_classification(tmp_path / "b")
    wds_set(tmp_path / "c", [item("s0", 1, 0)])
    (tmp_path / "c" / "test" / "nshards.txt").write_text("two")
    with pytest.raises(DataError, match=r"nshards\.txt: expected the number of shards .*'two'"):
        read_wds_classification(tmp_path / "c")
    (tmp_path / "c" / "test" / "nshards.txt").write_text("2")
    with pytest.raises(DataError, match=r"1\.tar: no such shard"):
        read_wds_classification(tmp_path / "c")
    wds_set(tmp_path / "d", [item("s0", 1, 0)])
    (tmp_path / "d" / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"no classnames\.txt in .*d; give the class list"):
        read_wds_classification(tmp_path / "d")
    wds_set(tmp_path / "e", [item("s0", 1, 0)], templates=["a photo of a {c} or a {c}."])
    with pytest.raises(
        DataError, match=r"zeroshot_classification_templates\.txt:1: template .* exactly once"
    ):
        read_wds_classification(tmp_path / "e")


# ---------------------------------------------------------------------------
# CSV / JSONL with a label column


def test_labelled_tables(tmp_path):
    for i in range(4):
        save_image(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "classnames.txt").write_text("cat\ndog\n3\n")
    (tmp_path / "val.csv").write_text("image,label\nimg/0.png,dog\nimg/1.png,0\nimg/2.png,3\nimg/3.png,2\n")
    ds = read_labelled_table(tmp_path / "val.csv")
    assert ds.labels.tolist() == [1, 0, 2, 2]  # "3" is a class name (index 2); "2" an index
    assert ds.classnames == ["cat", "dog", "3"] and ds.images[0] == str(
        (tmp_path / "img" / "0.png").resolve()
    )
    rows = [{"image": "img/0.png", "label": 1}, {"image": "img/1.png", "label": "cat"}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_classification(tmp_path / "val.jsonl").labels.tolist() == [1, 0]
    # another class list: a file or "imagenet"
    (tmp_path / "names.txt").write_text("goldfish\n")
    (tmp_path / "one.csv").write_text("image,label\nimg/0.png,goldfish\nimg/1.png,0\n")
    assert read_labelled_table(tmp_path / "one.csv", "imagenet").labels.tolist() == [1, 0]
    assert read_labelled_table(tmp_path / "one.csv", tmp_path / "names.txt").labels.tolist() == [0, 0]


def test_labelled_table_errors(tmp_path):
    for i in range(2):
        save_image(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "classnames.txt").write_text("cat\ndog\ncat\n")
    (tmp_path / "a.csv").write_text("image,label\nimg/0.png,dog\nimg/1.png,bird\n")
    with pytest.raises(
        DataError, match=r"a\.csv:3: label 'bird' is not in the class list; .*classnames\.txt"
    ):
        read_labelled_table(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"image": "img/0.png", "label": 7}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: label 7 is not in the class list.* index 0\.\.2"):
        read_labelled_table(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("image,label\nimg/0.png,cat\n")
    with pytest.raises(DataError, match=r"c\.csv:2: label 'cat' names classes \[0, 2\]"):
        read_labelled_table(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("image,label\nimg/0.png,dog\nimg/0.png,0\n")
    with pytest.raises(
        DataError, match=r"d\.csv:3: .*0\.png is labelled class 0 here, class 1 at .*d\.csv:2"
    ):
        read_labelled_table(tmp_path / "d.csv")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.csv").write_text("image,label\n../img/0.png,dog\n")
    with pytest.raises(DataError, match=r"e\.csv: no class list; write .*sub/classnames\.txt"):
        read_labelled_table(tmp_path / "sub" / "e.csv")
    (tmp_path / "f.csv").write_text("image,class\nimg/0.png,dog\n")
    with pytest.raises(DataError, match=r"f\.csv: no column 'label' \(columns: image, class\)"):
        read_labelled_table(tmp_path / "f.csv")


# ---------------------------------------------------------------------------
# Retrieval


def karpathy(tmp_path, images):
    path = tmp_path / "dataset_flickr.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path


def kimg(filename, split, *captions, filepath=None):
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": []} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@quiet
def test_karpathy_split(tmp_path):
    save_image(tmp_path / "imgs" / "a.jpg", seed=1)
    save_image(tmp_path / "imgs" / "val2014" / "b.jpg", seed=2)
    save_image(tmp_path / "imgs" / "c.jpg", seed=3)
    images = [
        kimg("a.jpg", "test", " A dog. ", "A dog.", "a brown dog"),
        kimg("c.jpg", "train", "not read"),
        kimg("b.jpg", "test", "two cats", filepath="val2014"),
        kimg("gone.jpg", "test", "a missing file"),
    ]
    path = karpathy(tmp_path, images)
    ds = read_retrieval(path, tmp_path / "imgs", data_checks=DataChecks(max_bad_fraction=0.5))
    assert [p.rsplit("imgs/", 1)[1] for p in ds.images] == ["a.jpg", "val2014/b.jpg"]
    assert ds.captions == [["A dog.", "A dog.", "a brown dog"], ["two cats"]]  # all kept, as given
    assert [(s.reason, s.item.rsplit("/", 1)[1]) for s in ds.skipped] == [("missing_file", "gone.jpg")]
    texts, owner = ds.queries()
    assert texts == ["A dog.", "A dog.", "a brown dog", "two cats"] and owner.tolist() == [0, 0, 0, 1]
    texts, owner = ds.queries(np.array([1]))
    assert texts == ["two cats"] and owner.tolist() == [0]
    assert read_karpathy(path, tmp_path / "imgs", "train").captions == [["not read"]]


def test_karpathy_missing_fields(tmp_path):
    save_image(tmp_path / "a.jpg")
    cases = [
        ({"split": "test", "sentences": [{"raw": "x"}]}, r"images\[1\]: no 'filename' field"),
        ({"filename": "a.jpg", "sentences": [{"raw": "x"}]}, r"images\[1\]: no 'split' field"),
        ({"filename": "a.jpg", "split": "test"}, r"images\[1\]: no 'sentences' field"),
        ({"filename": "a.jpg", "split": "test", "sentences": []}, r"images\[1\]: 'sentences' is empty"),
        (
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}, {"tokens": []}]},
            r"images\[1\]: sentences\[1\]: no 'raw' field",
        ),
        (
            {"filename": 3, "split": "test", "sentences": [{"raw": "x"}]},
            r"images\[1\]: 'filename' must be a str, got 3",
        ),
    ]
    for entry, message in cases:
        path = karpathy(tmp_path, [kimg("a.jpg", "test", "fine"), entry])
        with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
            read_karpathy(path)
    path = karpathy(tmp_path, [kimg("a.jpg", "train", "x"), kimg("a.jpg", "restval", "y")])
    with pytest.raises(DataError, match=r"no image has split 'test' \(splits: train \(1\), restval \(1\)\)"):
        read_karpathy(path)
    (tmp_path / "list.json").write_text("{}")
    with pytest.raises(DataError, match=r"list\.json: no 'images' field"):
        read_retrieval(tmp_path / "list.json")


def test_any_training_caption_source_groups_captions_per_image(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "val.csv").write_text("image,caption\n0.png,a\n1.png,b\n0.png,c\n2.png,d\n")
    ds = read_retrieval(tmp_path / "val.csv")
    assert [p.rsplit("/", 1)[1] for p in ds.images] == ["0.png", "1.png", "2.png"]
    assert ds.captions == [["a", "c"], ["b"], ["d"]]
    rows = [{"image": "0.png", "captions": ["a", "b"]}]
    (tmp_path / "val.json").write_text(json.dumps(rows))  # training's JSON (a list), not Karpathy's
    assert read_captioned(tmp_path / "val.json").captions == [["a", "b"]]
    # CLIP_benchmark's retrieval shards: test/*.tar of image + .txt
    members = [
        ("k0.png", encoded(0)),
        ("k0.txt", b"one\ntwo\n"),
        ("k1.png", encoded(1)),
        ("k1.txt", b"three"),
    ]
    (tmp_path / "wds" / "test").mkdir(parents=True)
    write_members(tmp_path / "wds" / "test" / "0.tar", members)
    assert read_retrieval(tmp_path / "wds").captions == [["one", "two"], ["three"]]


# ---------------------------------------------------------------------------
# Templates and class names


def test_shipped_templates_and_classnames():
    openai, short = load_templates("openai"), load_templates("short")
    assert len(openai) == 80 and len(short) == 7 and set(short) <= set(openai)
    assert openai[0] == "a bad photo of a {}." and "itap of a {}." in short
    assert all(t.count("{}") == 1 for t in openai)
    names = load_classnames("imagenet")
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[-1] == "toilet paper"
    assert sorted(p.name for p in PROMPTS_DIR.glob("*.txt")) == [
        "imagenet_classnames.txt",
        "openai_templates.txt",
        "short_templates.txt",
    ]


def test_template_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\ufeffa photo of a {c}.\n\n  {} in the wild  \n")
    assert load_templates(path) == ["a photo of a {}.", "{} in the wild"]
    for bad in ("a photo.", "a {c} and a {}.", "a {class}.", "a {c} }"):
        path.write_text(f"fine {{c}}\n{bad}\n")
        with pytest.raises(DataError, match=re.escape(f"t.txt:2: template {bad!r} must hold")):
            load_templates(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"t\.txt: no templates"):
        load_templates(path)
    with pytest.raises(DataError, match=r"'opeani': no such file, and not one of openai, short"):
        load_templates("opeani")
    path.write_bytes("a {c}\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"t\.txt: the file is UTF-16"):
        load_templates(path)
