"""Parquet files, Hugging Face `datasets` folders (hf:DIR) and img2dataset's output as training data:
every layout is built here, offline, with pyarrow, datasets and PIL (data/parquet.py, hf_disk.py,
columnar.py, tar_shards.py)."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import SMALL, encoded, pixels, save_image, train_run, write_members

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mlx_clip.data import checks, columnar  # noqa: E402
from mlx_clip.data.decode import open_image  # noqa: E402
from mlx_clip.data.pipeline import Loader  # noqa: E402
from mlx_clip.data.readers import detect_format, read_samples  # noqa: E402
from mlx_clip.data.samples import DataError, RowRef  # noqa: E402

QUIET = ["--eval.every", "0", "--train.save_every", "0", "--steps", "2"]
N = 40  # 32 train + 8 val at val_ratio 0.2: two batches of SMALL's 16
assert "--data.batch_size" in SMALL


def png(i):
    return encoded(i, "PNG", 32, 32)


def caption(i):
    return f"a photo of thing {i}"


def write_parquet(path, columns, row_group_size=16, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size, **kw)
    return path


def trains(tmp_path, name, source, *extra):
    out, summary = train_run(
        tmp_path, name, "--data.train", str(source), "--data.val_ratio", "0.2", *QUIET, *extra
    )
    assert summary["step"] == 2
    return out


def same_pixels(image, i):
    np.testing.assert_array_equal(np.asarray(open_image(image)), pixels(i, 32, 32))


# ---------------------------------------------------------------------------
# Parquet


def test_img2dataset_parquet_output_trains_from_the_cli(tmp_path, capsys):
    """img2dataset's parquet output format: image bytes in "jpg", "caption", metadata columns, and
    a _stats.json beside each file; the folder is the source. A null image is skipped (1 of 40, under
    the 5% rule) and logged in skipped.jsonl."""
    root = tmp_path / "i2d"
    for part in range(2):
        rows = range(part * N // 2, (part + 1) * N // 2)
        cols = {
            "key": [f"{i:09d}" for i in rows],
            "url": [f"http://x/{i}.jpg" for i in rows],
            "caption": [caption(i) for i in rows],
            "status": ["success"] * len(rows),
            "jpg": [None if i == 5 else png(i) for i in rows],  # a null image: skipped and logged
        }
        write_parquet(root / f"{part:05d}.parquet", cols, row_group_size=8)
        (root / f"{part:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    assert detect_format(root) == "parquet"
    samples = read_samples(root)
    assert len(samples) == N and samples[3].captions == [caption(3)]
    assert samples[9].image == RowRef(str(root / "00000.parquet"), 1, 1, "jpg")
    same_pixels(samples[9].image, 9)
    assert "image column 'jpg' (no column 'image')" in capsys.readouterr().out
    with pytest.warns(checks.BadDataWarning, match=r"skipped 1 of 40 items \(2\.5%\).*1 null_image"):
        out = trains(tmp_path, "run", root)
    skips = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["item"], s["reason"]) for s in skips] == [
        (f"{root / '00000.parquet'}:row group 0:row 5", "null_image")
    ]


@pytest.mark.parametrize("layout", ["bytes", "struct", "struct_path", "path"])
def test_parquet_image_column_variants_and_caption_lists(tmp_path, layout):
    n = 6
    names = [f"img/{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        save_image(tmp_path / name, i, 32, 32)
    image = {
        "bytes": [png(i) for i in range(n)],
        "struct": [{"bytes": png(i), "path": f"{i}.png"} for i in range(n)],  # HF's Image storage
        "struct_path": [{"bytes": None, "path": name} for name in names],
        "path": names,
    }[layout]
    if layout in ("struct", "path"):  # a list of strings per row (one column holds one type)
        captions = [[caption(i), f"another caption {i}"][: 1 + i % 2] for i in range(n)]
    else:
        captions = [caption(i) for i in range(n)]
    src = write_parquet(tmp_path / "d.parquet", {"image": image, "caption": captions}, row_group_size=4)
    samples = read_samples(src)
    assert [s.captions for s in samples] == [c if isinstance(c, list) else [c] for c in captions]
    for i in (0, 5):
        same_pixels(samples[i].image, i)
    assert isinstance(samples[0].image, str if layout == "path" else RowRef)


def test_parquet_reads_one_row_group_at_a_time(tmp_path, monkeypatch):
    """A file of 6 row groups of ~6 MB of image bytes and a cache budget under one row group:
    indexing reads no image bytes, and reading every image (in order, then at random) reads at most
    a row group per image, each once in order, and holds about one row group."""
    rng = np.random.default_rng(0)
    rows, size = 6, 1_000_000  # per row group: 6 rows of 1 MB
    blobs = [rng.bytes(size) for _ in range(rows * 6)]
    src = write_parquet(
        tmp_path / "big.parquet",
        {"image": blobs, "caption": [caption(i) for i in range(len(blobs))]},
        row_group_size=rows,
        compression="none",
    )
    group_bytes = rows * size
    assert src.stat().st_size > 5 * group_bytes  # the file is far over the budget below

    monkeypatch.setattr(columnar, "CACHE_BYTES", group_bytes // 2)  # the budget: under one row group
    samples = read_samples(src)
    budget = 1.5 * group_bytes
    orders = [range(len(samples)), rng.permutation(len(samples))]

    # The Arrow memory held while every image is read at random: about one row group.
    columnar.clear_cache()
    base, peak = pa.total_allocated_bytes(), 0
    for i in orders[1]:
        assert columnar.read_cell(samples[i].image) == blobs[i]
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert group_bytes <= peak < budget, peak

    read = []

    class Counting(io.RawIOBase):  # the bytes pyarrow reads from the file, per ParquetFile
        def __init__(self, path):
            self.f = open(path, "rb")  # noqa: SIM115

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def tell(self):
            return self.f.tell()

        def readinto(self, b):
            n = self.f.readinto(b)
            read.append(n)
            return n

    monkeypatch.setattr(columnar, "parquet_file", lambda path: pq.ParquetFile(Counting(path)))
    assert len(read_samples(src)) == len(blobs) and sum(read) < size  # indexing: captions only
    for order in orders:  # the bytes read: at most one row group per image, one per group in order
        read.clear()
        columnar.clear_cache()
        for i in order:
            before = sum(read)
            assert columnar.read_cell(samples[i].image) == blobs[i]
            assert sum(read) - before < budget
            assert len(columnar._cache) == 1  # the most recent row group
        if order is orders[0]:
            assert sum(read) < 1.1 * src.stat().st_size
    columnar.clear_cache()


def test_loader_workers_read_each_row_group_once(tmp_path, monkeypatch):
    """mlx-data's worker threads share the row groups read (a per-thread cache would forget them)."""
    src = write_parquet(
        tmp_path / "d.parquet",
        {"image": [png(i) for i in range(N)], "caption": [caption(i) for i in range(N)]},
    )
    samples = read_samples(src)
    calls, read_group = [], columnar._read_group
    monkeypatch.setattr(columnar, "_read_group", lambda ref: calls.append(ref.group) or read_group(ref))
    columnar.clear_cache()
    batches = list(Loader(samples, 8, 32, train=False, num_workers=2).epoch(0))
    assert sorted(calls) == [0, 1, 2]  # 40 rows in groups of 16
    np.testing.assert_array_equal(batches[4]["index"], np.arange(32, 40))
    columnar.clear_cache()


def test_parquet_bad_input(tmp_path):
    """Null image, bytes that are not an image, a row group whose image column or caption column
    is corrupt: counted skips naming file, row group and column; a missing column: an error listing
    the columns; too much bad data: the 5% rule stops the run."""
    n = 48
    images = [png(i) for i in range(n)]
    images[1], images[2] = None, b"this is not an image"
    src = write_parquet(
        tmp_path / "bad.parquet", {"image": images, "caption": [caption(i) for i in range(n)]}
    )
    meta = pq.ParquetFile(src).metadata
    with open(src, "r+b") as f:  # overwrite the page header of group 1's image column chunk
        f.seek(meta.row_group(1).column(0).data_page_offset)
        f.write(b"\xff" * 64)
    report = checks.scan(str(src))
    reasons = {s.item: s.reason for s in report.skipped}
    assert reasons[f"{src}:row group 0:row 1"] == "null_image"
    assert reasons[f"{src}:row group 0:row 2"] == "not_an_image"
    corrupt = [s for s in report.skipped if s.reason == "corrupt_row_group"]
    assert len(corrupt) == 16 and "row group 1, column 'image': cannot read" in corrupt[0].detail
    assert len(report.samples) == n - 18
    with pytest.raises(DataError, match=r"18 of 48 items \(37\.5%\) are bad"):
        report.check()

    # The caption column's chunk: its rows are skipped while indexing, with the same reason.
    src2 = write_parquet(
        tmp_path / "bad2.parquet", {"image": images[3:35], "caption": [caption(i) for i in range(32)]}
    )
    meta = pq.ParquetFile(src2).metadata
    with open(src2, "r+b") as f:
        f.seek(meta.row_group(0).column(1).data_page_offset)
        f.write(b"\xff" * 64)
    skipped = []
    samples = read_samples(src2, on_error="skip", skipped=skipped)
    assert len(samples) == 16 and len(skipped) == 16
    assert (
        skipped[0].reason == "corrupt_row_group"
        and "row group 0 (16 rows): cannot read column 'caption'" in skipped[0].detail
    )

    with pytest.raises(DataError, match=r"no column 'text' \(data.caption_key\); columns: image, caption"):
        read_samples(src, caption_key="text")
    two = write_parquet(tmp_path / "two.parquet", {"a": [png(0)], "b": [png(1)], "caption": ["x"]})
    with pytest.raises(DataError, match=r"several image columns could be it: a, b; set data.image_key"):
        read_samples(two)


# ---------------------------------------------------------------------------
# Hugging Face datasets on disk


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "sentences": datasets.List(datasets.Value("string")),
            "id": datasets.Value("int64"),
        }
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {
                "image": [{"bytes": png(i), "path": None} for i in rows],
                "sentences": [[caption(i), f"more about {i}"] for i in rows],
                "id": list(rows),
            },
            features=features,
        )

    datasets.DatasetDict(train=split(range(N)), test=split(range(N, N + 4))).save_to_disk(str(root / "dd"))
    return root / "dd"


def test_hf_dataset_dict_trains_from_the_cli(tmp_path, hf_dir, capsys):
    samples = read_samples(f"hf:{hf_dir}")
    assert len(samples) == N and samples[7].captions == [caption(7), "more about 7"]
    same_pixels(samples[7].image, 7)
    assert "caption column 'sentences'" in capsys.readouterr().out
    test = read_samples(f"hf:{hf_dir}:test")
    assert len(test) == 4
    same_pixels(test[1].image, N + 1)
    assert detect_format(hf_dir) == "hf"  # a save_to_disk folder is recognised without hf:
    trains(tmp_path, "run", f"hf:{hf_dir}")


def test_hf_bad_input(tmp_path, hf_dir):
    with pytest.raises(DataError, match=r"no split 'validation' in .* \(splits: train, test\)"):
        read_samples(f"hf:{hf_dir}:validation")
    with pytest.raises(
        DataError, match=r"(?s)hf:nlphuji/flickr30k: no such folder.*from disk only.*save_to_disk"
    ):
        read_samples("hf:nlphuji/flickr30k")
    with pytest.raises(DataError, match=r"no column 'caption_en' \(data.caption_key\)"):
        read_samples(f"hf:{hf_dir}", caption_key="caption_en")


# ---------------------------------------------------------------------------
# img2dataset's webdataset output


def test_img2dataset_webdataset_output_trains_from_the_cli(tmp_path):
    """00000.tar (key.jpg + key.txt + key.json, or key.jpg + key.json only) beside 00000_stats.json
    and 00000.parquet: the folder trains as it is, captions from .txt, else .json["caption"]."""
    root = tmp_path / "i2d"
    root.mkdir()
    for shard in range(2):
        members, keys = [], []
        for i in range(shard * N // 2, (shard + 1) * N // 2):
            key = f"{shard:05d}{i:04d}"
            keys.append(key)
            members.append((f"{key}.jpg", encoded(i, "JPEG", 32, 32)))
            if i % 2:
                members.append((f"{key}.txt", caption(i).encode()))
            meta = {"key": key, "caption": f"json {caption(i)}", "status": "success", "url": "http://x"}
            members.append((f"{key}.json", json.dumps(meta).encode()))
        write_members(root / f"{shard:05d}.tar", members)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": len(keys)}))
        write_parquet(root / f"{shard:05d}.parquet", {"key": keys, "status": ["success"] * len(keys)})
    assert detect_format(root) == "tar"
    samples = read_samples(root)
    assert len(samples) == N
    assert samples[0].captions == [f"json {caption(0)}"] and samples[1].captions == [caption(1)]
    assert {os.path.basename(s.image.path) for s in samples} == {"00000.tar", "00001.tar"}
    with tarfile.open(root / "00000.tar") as tf:
        assert len(tf.getnames()) == 50
    trains(tmp_path, "run", root)
