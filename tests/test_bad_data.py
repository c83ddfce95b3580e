"""Bad data (issue 8): readers skip and report, the pre-flight scan, the skip log, decode-time substitutes.

Every fixture is written into tmp_path: tiny PIL images, hand-cut bytes for truncated,
empty and bomb files, hand-written CSV / JSONL / tar shards.
"""

import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from conftest import assert_same_batches, collect, encoded, make_csv, pixels, write_members
from PIL import Image

from mlx_clip.data.checks import BadDataWarning, Report, SkipLog, check_image, prepare, scan
from mlx_clip.data.pipeline import DataError, Loader, Sample, open_image
from mlx_clip.data.readers import read_samples
from mlx_clip.data.sample_maker import SUBST
from mlx_clip.data.samples import Skip, read_bytes
from mlx_clip.data.transforms import eval_transform

quiet = pytest.mark.filterwarnings("ignore::mlx_clip.data.checks.BadDataWarning")


def bomb_png(w=30000, h=30000):
    """A ~70-byte PNG whose header declares w x h 1-bit pixels: a decompression bomb."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit grayscale
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def reasons(skipped):
    return {s.item.rsplit("/", 1)[-1]: s.reason for s in skipped}


@pytest.fixture
def image_zoo(tmp_path):
    """Good images in odd modes and every kind of broken file, all named in one CSV."""
    d = tmp_path / "zoo"
    good = {
        "rgb.png": encoded(1, w=24, h=20),  # 480 pixels: the pixel-limit test
        "gray.png": encoded(2, mode="L"),
        "cmyk.jpg": encoded(3, "JPEG", mode="CMYK"),
        "rgba.png": encoded(4, mode="RGBA"),
        "pal.gif": encoded(5, "GIF", mode="P"),
    }
    for name, data in good.items():
        write(d / name, data)
    Image.fromarray(pixels(6)[..., 0].astype(np.uint16) * 257).save(d / "i16.png")  # 16-bit gray
    frames = [Image.fromarray(pixels(s)).convert("P") for s in (7, 8)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    jpeg, png = encoded(9, "JPEG", 64, 64), encoded(10, "PNG", 64, 64)
    bad = {
        "zero.jpg": b"",
        "garbage.png": b"not an image at all",
        "bomb.png": bomb_png(),
        "cut.jpg": jpeg[: len(jpeg) // 2],  # header intact, data cut short
        "cut.png": png[: len(png) // 2],
    }
    for name, data in bad.items():
        write(d / name, data)
    names = [*good, "i16.png", "anim.gif", *bad, "missing.png"]
    (d / "data.csv").write_text("image,caption\n" + "".join(f"{n},a photo of {n}\n" for n in names))
    return d


# ---------------------------------------------------------------------------
# Images: the pre-flight scan


def test_scan_header_and_full_modes(image_zoo):
    header = scan(image_zoo / "data.csv", mode="header", workers=2)
    kept = {str(s.image).rsplit("/", 1)[-1] for s in header.samples}
    odd_but_fine = {"rgb.png", "gray.png", "cmyk.jpg", "rgba.png", "pal.gif", "i16.png", "anim.gif"}
    assert kept == odd_but_fine | {"cut.jpg", "cut.png"}  # a header check cannot see truncation
    assert reasons(header.skipped) == {
        "zero.jpg": "empty_file",
        "garbage.png": "not_an_image",
        "bomb.png": "too_many_pixels",
        "missing.png": "missing_file",
    }
    assert [s.stage for s in header.skipped] == ["read", "scan", "scan", "scan"]  # missing: by the reader
    assert "data.csv:14: image not found" in header.skipped[0].detail  # the line that names it

    full = scan(image_zoo / "data.csv", mode="full", workers=2)
    assert {str(s.image).rsplit("/", 1)[-1] for s in full.samples} == odd_but_fine
    got = reasons(full.skipped)
    assert got["cut.jpg"] == got["cut.png"] == "truncated_image"
    assert full.summary()["by_reason"] == {
        "truncated_image": 2,
        "missing_file": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "too_many_pixels": 1,
    }
    assert full.bad_fraction == pytest.approx(6 / 13)

    off = scan(image_zoo / "data.csv", mode="off")
    assert reasons(off.skipped) == {"missing.png": "missing_file"}  # no image opened
    # The same checks on a list of samples (no reader involved).
    listed = scan([Sample(str(image_zoo / "zero.jpg"), ["x"]), Sample(str(image_zoo / "rgb.png"), ["y"])])
    assert [s.reason for s in listed.skipped] == ["empty_file"] and len(listed.samples) == 1


def test_pixel_limit_is_configurable_and_read_from_the_header(image_zoo):
    rgb = str(image_zoo / "rgb.png")  # 24 x 20 = 480 pixels
    assert check_image(rgb, "header", max_pixels=480) is None
    skip = check_image(rgb, "header", max_pixels=479)
    assert skip.reason == "too_many_pixels" and "24x20 = 480 pixels" in skip.detail
    with pytest.raises(DataError, match="over max_image_pixels=100") as e:
        open_image(rgb, max_pixels=100)
    assert e.value.reason == "too_many_pixels"
    # The 30000 x 30000 bomb is refused from its 70-byte header, even with no limit of ours.
    assert (image_zoo / "bomb.png").stat().st_size < 200
    assert check_image(str(image_zoo / "bomb.png"), "full", max_pixels=None).reason == "too_many_pixels"


def test_odd_modes_decode_and_animated_gif_gives_its_first_frame(image_zoo):
    names = ["gray.png", "cmyk.jpg", "rgba.png", "pal.gif", "i16.png", "anim.gif"]
    samples = [Sample(str(image_zoo / n), [n]) for n in names]
    (batch,) = collect(Loader(samples, 6, 16, train=False, num_workers=0))
    first_frame = eval_transform(16)(Image.fromarray(pixels(7)).convert("P"))
    np.testing.assert_allclose(batch["images"][names.index("anim.gif")], first_frame, atol=1e-6)
    assert np.isfinite(batch["images"]).all()


# ---------------------------------------------------------------------------
# Captions and table rows


def test_caption_rules(tmp_path):
    write(tmp_path / "a.png", encoded(0))
    write(tmp_path / "b.png", encoded(1))
    long = "x" * 100_000
    rows = [
        b"image,caption",
        b"a.png,a good caption",
        b"a.png,",  # empty: dropped, but a.png keeps its good caption
        b"b.png,   ",  # whitespace only: b.png has nothing else
        b"b.png," + long.encode(),  # 100 kB
        b"b.png,caf\xe9 in latin-1",  # not UTF-8
    ]
    (tmp_path / "d.csv").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(DataError, match=r"d\.csv:3: empty caption"):  # strict: the first problem
        read_samples(tmp_path / "d.csv")

    skipped = []
    samples = read_samples(tmp_path / "d.csv", on_error="skip", skipped=skipped, max_caption_chars=4096)
    assert [(s.image.rsplit("/", 1)[-1], s.captions) for s in samples] == [("a.png", ["a good caption"])]
    assert [(s.detail.split("/")[-1].split(":")[1], s.reason) for s in skipped] == [
        ("3", "empty_caption"),
        ("4", "empty_caption"),
        ("5", "caption_too_long"),
        ("6", "caption_not_utf8"),
    ]
    assert "100000 characters (max_caption_chars=4096)" in skipped[2].detail
    # Without a length limit the long caption is kept: a limit is a choice, not a default of the reader.
    skipped = []
    kept = read_samples(tmp_path / "d.csv", on_error="skip", skipped=skipped)
    assert kept[1].captions == [long]
    # The scan applies the same rules to samples given as a list; a dropped caption of a kept
    # image is reported but does not make the image bad.
    listed = [Sample(str(tmp_path / "a.png"), ["ok", "y" * 50]), Sample(str(tmp_path / "b.png"), [" "])]
    report = scan(listed, max_caption_chars=10)
    assert [s.reason for s in report.skipped] == ["caption_too_long", "empty_caption"]
    assert report.samples[0].captions == ["ok"] and report.bad_items() == [str(tmp_path / "b.png")]


def test_csv_rows_with_missing_columns_or_broken_quoting(tmp_path):
    for n in "abcdefg":
        write(tmp_path / f"{n}.png", encoded(ord(n)))
    text = (
        "image,caption\n"
        "a.png,fine\n"
        "b.png\n"  # missing the caption column
        'c.png,"never closed\n'  # an unterminated quote swallows the next lines...
        "d.png,still here\n"
        'e.png,"quoted, with a comma"\n'  # ...up to the next quote: those rows are read again
        "f.png,one, two\n"  # an unquoted delimiter: 3 fields
        ",no image\n"
        'g.png,"x"y\n'  # text after a closing quote
    )
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataError, match=r"d\.csv:3: missing column 'caption' \(1 of 2 fields\)"):
        read_samples(tmp_path / "d.csv")
    skipped = []
    samples = read_samples(tmp_path / "d.csv", on_error="skip", skipped=skipped)
    assert {s.image.rsplit("/", 1)[-1]: s.captions for s in samples} == {
        "a.png": ["fine"],
        "d.png": ["still here"],
        "e.png": ["quoted, with a comma"],
    }
    assert [(s.item.rsplit("/", 1)[-1], s.reason) for s in skipped] == [
        ("d.csv:3", "bad_row"),
        ("d.csv:4", "bad_row"),
        ("d.csv:7", "bad_row"),
        ("d.csv:8", "bad_row"),
        ("d.csv:9", "bad_row"),
    ]
    assert "broken CSV quoting" in skipped[1].detail and "3 fields but 2 columns" in skipped[2].detail


def test_jsonl_and_folder_entries(tmp_path):
    write(tmp_path / "a.png", encoded(0))
    lines = [
        json.dumps({"image": "a.png", "caption": "ok"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"image": "a.png"}),
        json.dumps({"image": "a.png", "caption": 7}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_samples(tmp_path / "d.jsonl")
    skipped = []
    assert len(read_samples(tmp_path / "d.jsonl", on_error="skip", skipped=skipped)) == 1
    assert [s.reason for s in skipped] == ["bad_row", "bad_row", "bad_row", "bad_caption"]
    # Folder with sidecars: an image with no .txt is unpaired.
    folder = tmp_path / "f"
    write(folder / "a.png", encoded(0))
    (folder / "a.txt").write_text("a caption\n")
    write(folder / "b.png", encoded(1))
    with pytest.raises(DataError, match=r"b\.png: no caption file b\.txt"):
        read_samples(folder)
    skipped = []
    assert len(read_samples(folder, on_error="skip", skipped=skipped)) == 1
    assert reasons(skipped) == {"b.png": "unpaired"}
    with pytest.raises(ValueError, match="skipped=\\[\\]"):
        read_samples(folder, on_error="skip")  # skipping silently is not an option


# ---------------------------------------------------------------------------
# Tar shards


def test_tar_unpaired_members(tmp_path):
    write_members(
        tmp_path / "s.tar",
        [("k0.png", encoded(0)), ("k0.txt", b"zero"), ("k1.png", encoded(1)), ("k2.txt", b"two")],
    )
    with pytest.raises(DataError, match=r"sample 'k1' has an image but no k1\.txt"):
        read_samples(str(tmp_path / "s.tar"))
    skipped = []
    samples = read_samples(str(tmp_path / "s.tar"), on_error="skip", skipped=skipped)
    assert [s.captions for s in samples] == [["zero"]]
    assert reasons(skipped) == {"s.tar:k1.png": "unpaired", "s.tar:k2.txt": "unpaired"}


def test_truncated_and_empty_shards(tmp_path):
    members = []
    for i in range(4):
        members += [(f"k{i}.png", encoded(i)), (f"k{i}.txt", f"cap {i}".encode())]
    full = write_members(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    k2 = tarfile.open(tmp_path / "full.tar").getmember("k2.png")
    cut.write_bytes(full[: k2.offset_data + k2.size // 2])  # ends inside k2.png
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("cut.tar", "empty.tar"):
        with pytest.raises(DataError, match=rf"{name}: cannot read tar shard"):
            read_samples(str(tmp_path / name))
    skipped = []
    samples = read_samples(str(tmp_path / "{cut,empty,full}.tar"), on_error="skip", skipped=skipped)
    # cut.tar keeps k0 and k1, full.tar gives all four.
    assert [s.captions[0] for s in samples] == ["cap 0", "cap 1", "cap 0", "cap 1", "cap 2", "cap 3"]
    assert reasons(skipped) == {
        "cut.tar": "truncated_tar",
        "cut.tar:k2.png": "truncated_tar",
        "empty.tar": "bad_tar",
    }
    assert "the complete members before the cut are kept" in skipped[0].detail
    # A shard cut exactly between members has no end-of-archive marker: also reported.
    k1 = tarfile.open(tmp_path / "full.tar").getmember("k1.txt")
    (tmp_path / "edge.tar").write_bytes(full[: k1.offset_data + 512])
    skipped = []
    assert len(read_samples(str(tmp_path / "edge.tar"), on_error="skip", skipped=skipped)) == 2
    assert [s.reason for s in skipped] == ["truncated_tar"] and "end-of-archive" in skipped[0].detail
    # A non-UTF-8 caption member is a bad caption.
    write_members(tmp_path / "latin.tar", [("k.png", encoded(0)), ("k.txt", b"caf\xe9")])
    report = scan(str(tmp_path / "latin.tar"), mode="off")
    assert report.samples == [] and [s.reason for s in report.skipped] == ["caption_not_utf8"]


def test_tar_members_are_never_extracted_by_name(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_members(
        tmp_path / "evil.tar",
        [
            ("../evil.png", encoded(0)),
            ("../evil.txt", b"up"),
            ("/abs/x.png", encoded(1)),
            ("/abs/x.txt", b"abs"),
        ],
    )
    before = sorted(p.name for p in tmp_path.rglob("*"))
    samples = read_samples(str(tmp_path / "evil.tar"))
    assert [s.image.name for s in samples] == ["../evil.png", "/abs/x.png"]
    assert read_bytes(samples[0].image) == encoded(0)  # read in memory, by offset
    report = scan(samples, mode="full")
    (batch,) = collect(Loader(report.samples, 2, 16, train=False, num_workers=0))
    assert batch["captions"] == ["up", "abs"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert not (work / "abs").exists() and not list(work.iterdir())


def test_missing_data_paths_are_named(tmp_path):
    for source, pattern in [
        (tmp_path / "absent.csv", r"absent\.csv: no such file"),
        (str(tmp_path / "s-{0..1}.tar"), r"s-0\.tar: no such shard"),
        (str(tmp_path / "nope" / "*.tar"), r"nope/\*\.tar: no files match"),
    ]:
        with pytest.raises(DataError, match=pattern):
            scan(source)  # skipping is for items; a missing source is always an error
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"dir: no images"):
        scan(tmp_path / "dir")


# ---------------------------------------------------------------------------
# The report: threshold, nothing left, skipped.jsonl, the counted warning


def test_too_much_bad_data_stops_before_training(tmp_path):
    csv_path = make_csv(tmp_path, 18, {"zero.png": b"", "gone.png": None})  # 2 of 20 = 10%
    log_path = tmp_path / "out" / "skipped.jsonl"
    log_path.parent.mkdir()
    with SkipLog(log_path) as log, pytest.warns(BadDataWarning, match=r"skipped 2 of 20 items \(10\.0%\)"):
        with pytest.raises(DataError) as e:
            prepare(csv_path, log=log)
    msg = str(e.value)
    assert "2 of 20 items (10.0%) are bad, more than max_bad_fraction=0.05" in msg
    assert "gone.png" in msg and "zero.png" in msg and str(log_path) in msg  # the first bad files, named
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]  # written before the error
    assert [(r["item"].rsplit("/", 1)[-1], r["reason"], r["stage"]) for r in lines] == [
        ("gone.png", "missing_file", "read"),
        ("zero.png", "empty_file", "scan"),
    ]
    assert all(set(r) == {"item", "reason", "detail", "stage"} for r in lines)
    # A higher threshold lets the rest train; the summary counts by reason.
    with SkipLog(log_path) as log, pytest.warns(BadDataWarning):
        report = prepare(csv_path, log=log, max_bad_fraction=0.1)
    assert len(report.samples) == 18
    assert report.summary()["by_reason"] == {"missing_file": 1, "empty_file": 1}
    assert log.summary()["by_reason"] == {"missing_file": 1, "empty_file": 1}
    assert len(log_path.read_text().splitlines()) == 2  # a new log replaces the old file


def test_nothing_left_is_an_error(tmp_path):
    csv_path = make_csv(tmp_path, 0, {"a.png": b"", "b.png": b"junk"})
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match="no usable samples left") as e:
        prepare(csv_path, max_bad_fraction=1.0)
    assert "a.png: empty file" in str(e.value) and "b.png: cannot decode image" in str(e.value)
    clean = make_csv(tmp_path / "clean", 3, {})
    report = prepare(clean)  # nothing bad: no warning, no error
    assert report.skipped == [] and report.bad_fraction == 0.0
    assert Report([], [], "x").summary()["kept"] == 0


# ---------------------------------------------------------------------------
# Decode time: deterministic substitutes


@pytest.fixture
def slipped(tmp_path):
    """12 good images and 3 broken ones that a header scan would not catch (or that are not scanned)."""
    samples = [Sample(write(tmp_path / f"{i}.png", encoded(i)), [f"c{i}", f"d{i}"]) for i in range(12)]
    jpeg = encoded(99, "JPEG", 32, 32)
    samples[3] = Sample(write(tmp_path / "cut.jpg", jpeg[: len(jpeg) // 2]), ["cut"])
    samples[7] = Sample(write(tmp_path / "junk.png", b"\x89PNG junk"), ["junk"])
    samples[10] = Sample(str(tmp_path / "deleted.png"), ["deleted after the scan"])
    return samples


@quiet
def test_decode_time_substitutes_are_deterministic_and_counted(slipped, tmp_path):
    kw = dict(train=True, seed=3, augment={"scale": (0.5, 1.0), "color_jitter": 0.2}, on_error="skip")
    logs = [SkipLog(tmp_path / f"skips{k}.jsonl") for k in range(2)]
    a = Loader(slipped, 4, 16, num_workers=2, on_skip=logs[0], **kw)
    b = Loader(slipped, 4, 16, num_workers=0, on_skip=logs[1], **kw)
    resumed = Loader(slipped, 4, 16, num_workers=2, **kw)
    epochs = [collect(a, epoch) for epoch in range(2)]
    for epoch, batches in enumerate(epochs):
        assert_same_batches(batches, collect(b, epoch))
        index = np.concatenate([x["index"] for x in batches])
        assert not {3, 7, 10} & set(index.tolist())  # never a broken one
        for x in batches:  # each image keeps its own caption: the substitute's
            assert all(c in slipped[i].captions for i, c in zip(x["index"], x["captions"], strict=True))
        assert_same_batches(batches[1:], collect(resumed, epoch, start_batch=1))  # resume: same batches
    # Sample i's substitute is the first good draw of default_rng([SUBST, seed, epoch, i]).
    pos = list(np.random.default_rng([1, 3, 0]).permutation(12)).index(7)  # where sample 7 sits in epoch 0
    j = int(np.random.default_rng([SUBST, 3, 0, 7]).integers(12))
    if j not in (3, 7, 10):
        assert epochs[0][pos // 4]["index"][pos % 4] == j
    # Counted: each failed decode (3 broken samples per epoch, plus any broken first draws).
    assert a.num_skipped == b.num_skipped >= 6
    for log in logs:
        log.close()
    rows = [json.loads(line) for line in (tmp_path / "skips1.jsonl").read_text().splitlines()]
    assert len(rows) == b.num_skipped
    assert {(r["item"].rsplit("/", 1)[-1], r["reason"]) for r in rows} == {
        ("cut.jpg", "truncated_image"),
        ("junk.png", "not_an_image"),
        ("deleted.png", "missing_file"),
    }
    assert all(r["stage"] == "decode" and {"epoch", "index", "substitute"} <= set(r) for r in rows)
    assert logs[1].summary()["by_stage"] == {"decode": b.num_skipped}


def test_strict_mode_still_raises_and_skip_mode_warns(slipped, tmp_path):
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image"):
        collect(Loader(slipped[:6], 6, 16, train=False, num_workers=0))
    # Eval in skip mode: one batch, the broken one replaced, and a warning per broken file.
    log = SkipLog()
    loader = Loader(slipped[:6], 6, 16, train=False, num_workers=0, on_error="skip", on_skip=log)
    with pytest.warns(BadDataWarning, match=r"cut\.jpg: cannot decode image.*sample 3 replaced by sample"):
        (batch,) = collect(loader)
    assert 3 not in batch["index"].tolist() and loader.num_skipped == log.count == 1
    # The pixel limit also applies at decode time.
    small = Loader(slipped[:2], 2, 16, train=False, num_workers=0, max_image_pixels=100)
    with pytest.raises(DataError, match="over max_image_pixels=100"):
        collect(small)
    with pytest.raises(ValueError, match="on_error"):
        Loader(slipped, 2, 16, train=False, on_error="ignore")


def test_all_broken_raises_after_a_bounded_number_of_substitutes(tmp_path):
    samples = [Sample(str(tmp_path / f"gone{i}.png"), ["x"]) for i in range(4)]
    loader = Loader(samples, 2, 16, train=False, num_workers=0, on_error="skip")
    with pytest.raises(DataError, match="16 substitutes in a row cannot be decoded"):
        collect(loader)
    assert loader.num_skipped == 0  # nothing was replaced
    assert isinstance(Skip("a", "missing_file", "a: gone").to_dict(), dict)
