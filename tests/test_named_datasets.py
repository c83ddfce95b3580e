"""Named datasets laid out as their publishers ship them (data/named.py): coco:ROOT, flickr30k:ROOT and
cc3m:ROOT, each built here as a small copy of the real layout with PIL, offline."""

import json

import pytest
from conftest import encoded, save_image, train_run, write_members

from mlx_clip.config import DataConfig
from mlx_clip.data import checks, named
from mlx_clip.data.readers import detect_format, read_samples
from mlx_clip.data.run_data import val_source
from mlx_clip.data.samples import DataError, Skip, TarRef
from mlx_clip.evaluation.retrieval_sets import read_retrieval
from mlx_clip.evaluation.spec import EvalSetSpec
from mlx_clip.evaluation.suite import load_sets


def captions_of(i):
    return [f"photo {i} caption {j}" for j in range(2 + i % 4)]  # 2 to 5 captions each


def write_coco(root, split, ids, year="2017", missing=()):
    """ROOT/annotations/captions_{split}{year}.json and ROOT/{split}{year}/ as COCO ships them: the
    annotations interleaved (not grouped by image), image ids that are not positions."""
    images = [{"id": 1000 + i, "file_name": f"{1000 + i:012d}.jpg", "height": 30, "width": 40} for i in ids]
    for i in ids:
        if i not in missing:
            save_image(root / f"{split}{year}" / f"{1000 + i:012d}.jpg", i)
    anns = [
        {"image_id": 1000 + i, "id": 10 * i + j, "caption": f" {c} "}
        for j in range(5)
        for i in ids
        for c in captions_of(i)[j : j + 1]
    ]
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    path = root / "annotations" / f"captions_{split}{year}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train", range(16))
    write_coco(root, "val", range(16, 22))
    return root


# ---------------------------------------------------------------------------
# COCO


def test_coco_reads_the_official_layout(coco):
    assert detect_format(f"coco:{coco}") == "coco"
    train = read_samples(f"coco:{coco}")
    assert len(train) == 16
    assert [s.captions for s in train] == [captions_of(i) for i in range(16)]  # every caption, in order
    assert train[3].image == str(coco / "train2017" / "000000001003.jpg")
    val = read_samples(f"coco:{coco}:val")
    assert [s.image.rsplit("/", 2)[1:] for s in val][0] == ["val2017", "000000001016.jpg"]
    assert len(val) == 6 and read_samples(f"coco:{coco}:train") == train
    assert read_samples(str(coco), fmt="coco") == train  # data.format: coco with a plain ROOT
    assert named.default_val(f"coco:{coco}") == f"coco:{coco}:val"
    assert named.default_val(f"coco:{coco}:val") is None
    assert named.source_files(f"coco:{coco}:val") == [str(coco / "annotations" / "captions_val2017.json")]


def test_coco_2014_and_val_as_an_eval_set(tmp_path):
    root = tmp_path / "coco14"
    write_coco(root, "val", range(5), year="2014")
    ds = read_retrieval(f"coco:{root}:val")
    assert len(ds) == 5 and ds.captions[1] == captions_of(1)
    (loaded,) = load_sets([EvalSetSpec("coco", "retrieval", f"coco:{root}:val")], 32)
    assert len(loaded.data) == 5


def test_coco_bad_input(tmp_path, coco):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(
        DataError, match=r"not the COCO captions layout: looked for annotations/captions_train2017"
    ):
        read_samples(f"coco:{missing}")
    with pytest.raises(DataError, match=r"coco has no split 'test' \(splits: train, val\)"):
        read_samples(f"coco:{coco}:test")
    with pytest.raises(DataError, match=r"no such folder \(the root of the coco dataset\)"):
        read_samples(f"coco:{tmp_path / 'nowhere'}")
    # An annotation naming a missing image, an image entry with no file_name, a caption-less annotation.
    ann = write_coco(tmp_path / "bad", "train", range(40), missing={7})
    data = json.loads(ann.read_text())
    del data["images"][3]["file_name"]
    data["annotations"][0] = {"image_id": 1000, "id": 1}
    data["annotations"].append({"image_id": 5555, "id": 2, "caption": "no such image"})
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[0\]: no 'caption' field"):
        read_samples(f"coco:{tmp_path / 'bad'}")  # strict: the first problem raises
    skipped: list[Skip] = []
    samples = read_samples(f"coco:{tmp_path / 'bad'}", on_error="skip", skipped=skipped)
    got = {(s.reason, s.item.rsplit("/", 1)[-1]) for s in skipped}
    assert got == {
        ("bad_row", "captions_train2017.json: annotations[0]"),
        ("bad_row", "captions_train2017.json: images[3]"),
        ("bad_row", "captions_train2017.json: annotations (image_id 5555)"),
        ("missing_file", "000000001007.jpg"),
    }
    assert len(samples) == 38 and samples[0].captions == captions_of(0)[1:]
    # The 5% rule counts the 4 bad entries (a bad annotation is its own item, as a bad CSV row is).
    report = checks.scan(f"coco:{tmp_path / 'bad'}", mode="off")
    assert report.bad_fraction == pytest.approx(4 / 42)
    report.check(0.1)
    with pytest.raises(DataError, match=r"4 of 42 items \(9\.5%\) are bad, more than max_bad_fraction=0.05"):
        report.check(0.05)
    with pytest.raises(DataError, match=r"data.val: coco:\S+ reads the train split; name the split"):
        val_source(DataConfig(val=f"coco:{coco}"))


# ---------------------------------------------------------------------------
# Flickr30k


def karpathy_flickr(root, folder="flickr30k-images"):
    splits = ["train"] * 8 + ["restval"] * 2 + ["val"] * 3 + ["test"] * 3
    images = []
    for i, split in enumerate(splits):
        save_image(root / folder / f"{100 + i}.jpg", i)
        sentences = [{"raw": c, "tokens": c.split(), "sentid": j} for j, c in enumerate(captions_of(i))]
        images.append({"filename": f"{100 + i}.jpg", "imgid": i, "split": split, "sentences": sentences})
    (root / named.FLICKR_KARPATHY).write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


@pytest.mark.parametrize("folder", ["flickr30k-images", "flickr30k_images", "images"])
def test_flickr30k_karpathy_splits(tmp_path, folder):
    root = karpathy_flickr(tmp_path / "f30k", folder)
    train = read_samples(f"flickr30k:{root}")
    assert len(train) == 10  # train + restval
    assert train[9].image == str(root / folder / "109.jpg") and train[9].captions == captions_of(9)
    assert [s.captions for s in read_samples(f"flickr30k:{root}:test")] == [
        captions_of(i) for i in (13, 14, 15)
    ]
    assert len(read_samples(f"flickr30k:{root}:restval")) == 2
    assert named.default_val(f"flickr30k:{root}") == f"flickr30k:{root}:val"
    with pytest.raises(
        DataError, match=r"flickr30k has no split 'dev' \(splits: train, val, test, restval\)"
    ):
        read_samples(f"flickr30k:{root}:dev")


def test_flickr30k_results_csv_kaggle_layout(tmp_path):
    """Kaggle's zip: flickr30k_images/results.csv beside flickr30k_images/flickr30k_images/; the
    header and rows with a space after each pipe; a row without its second pipe is a bad_row."""
    root = tmp_path / "kaggle"
    rows = ["image_name| comment_number| comment"]
    for i in range(12):
        save_image(root / "flickr30k_images" / "flickr30k_images" / f"{i}.jpg", i)
        rows += [f"{i}.jpg| {j}| {c}" for j, c in enumerate(captions_of(i))]
    rows[5] = "3.jpg| 4 A dog runs across the grass ."  # as in the real file: a pipe missing
    (root / "flickr30k_images" / "results.csv").write_text("\n".join(rows) + "\n")
    skipped: list[Skip] = []
    samples = read_samples(f"flickr30k:{root}", on_error="skip", skipped=skipped)
    assert len(samples) == 12 and samples[2].captions == captions_of(2)
    assert samples[1].captions == captions_of(1)[:2] + captions_of(1)[3:]  # line 6 lost
    assert [(s.reason, s.item.rsplit("/", 1)[-1]) for s in skipped] == [("bad_row", "results.csv:6")]
    assert named.default_val(f"flickr30k:{root}") is None  # no splits: data.val_ratio applies
    with pytest.raises(
        DataError, match=r"results.csv has no splits; use flickr30k:\S+ \(val from data.val_ratio"
    ):
        read_samples(f"flickr30k:{root}:val")
    root = tmp_path / "no_images"
    root.mkdir()
    (root / "results.csv").write_text(rows[0] + "\n")
    with pytest.raises(
        DataError, match=r"no image folder for results.csv: looked for flickr30k_images/flickr30k_i"
    ):
        read_samples(f"flickr30k:{root}")


# ---------------------------------------------------------------------------
# CC3M (img2dataset's output)


def write_i2d_shard(folder, shard, ids):
    """img2dataset's webdataset output: NNNNN.tar (key.jpg, key.txt, key.json) with NNNNN_stats.json
    and an NNNNN.parquet index beside it (neither read)."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i in ids:
        key = f"{shard:05d}{i:04d}"
        members += [(f"{key}.jpg", encoded(i, "JPEG", 32, 32)), (f"{key}.txt", f"cc3m caption {i}".encode())]
        members.append((f"{key}.json", json.dumps({"key": key, "caption": f"cc3m caption {i}"}).encode()))
    write_members(folder / f"{shard:05d}.tar", members)
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": len(ids)}))
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read PAR1")


def test_cc3m_shards_with_train_and_validation_folders(tmp_path):
    root = tmp_path / "cc3m"
    write_i2d_shard(root / "training", 0, range(8))
    write_i2d_shard(root / "training", 1, range(8, 16))
    write_i2d_shard(root / "validation", 0, range(16, 20))
    train = read_samples(f"cc3m:{root}")
    assert len(train) == 16 and isinstance(train[0].image, TarRef) and train[9].captions == ["cc3m caption 9"]
    assert [s.captions[0] for s in read_samples(f"cc3m:{root}:val")][0] == "cc3m caption 16"
    assert named.default_val(f"cc3m:{root}") == f"cc3m:{root}:val"
    assert [p.rsplit("/", 1)[1] for p in named.source_files(f"cc3m:{root}")] == ["00000.tar", "00001.tar"]
    flat = tmp_path / "flat"
    write_i2d_shard(flat, 0, range(6))
    assert len(read_samples(f"cc3m:{flat}")) == 6 and named.default_val(f"cc3m:{flat}") is None
    with pytest.raises(DataError, match=r"no val split: looked for \S+/val/ or validation/"):
        read_samples(f"cc3m:{flat}:val")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: no .tar shards or .parquet files \(CC3M as img2dataset"):
        read_samples(f"cc3m:{tmp_path / 'nothing'}")


def test_cc3m_parquet_output(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "cc3m"
    root.mkdir()
    cols = {"key": [str(i) for i in range(6)], "caption": [f"c {i}" for i in range(6)]}
    cols["jpg"] = [encoded(i, "JPEG", 32, 32) for i in range(6)]
    pq.write_table(pa.table(cols), root / "00000.parquet")
    samples = read_samples(f"cc3m:{root}")
    assert len(samples) == 6 and samples[4].captions == ["c 4"]


# ---------------------------------------------------------------------------
# Training from the CLI


def test_coco_trains_from_the_cli_with_val_from_val2017(tmp_path, coco, capsys):
    args = [
        "--data.train",
        f"coco:{coco}",
        "--eval.every",
        "0",
        "--train.save_every",
        "0",
        "--data.batch_size",
        "8",
    ]
    out, summary = train_run(tmp_path, "run", *args, "--steps", "2")
    assert summary["step"] == 2
    assert f"data: val from coco:{coco}:val" in capsys.readouterr().out
    (state,) = out.glob("checkpoints/step_*/state.json")
    data = json.loads(state.read_text())["data"]
    assert data["train"]["samples"] == 16 and data["val"]["samples"] == 6  # not a val_ratio share
    assert data["val"]["source"] == f"coco:{coco}:val"
    assert list(data["val"]["files"]) == [str(coco / "annotations" / "captions_val2017.json")]
    # A changed val annotation file is seen on --resume (its size is in the fingerprint).
    ann = coco / "annotations" / "captions_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({"image_id": 1016, "id": 99999, "caption": "one more caption"})
    ann.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"cannot resume .* changed the data fingerprint \(val files"):
        train_run(tmp_path, "run", *args, "--steps", "4", "--resume")
