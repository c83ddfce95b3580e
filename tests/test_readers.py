"""mlx_clip.data.readers: every source format (CSV/TSV, JSON(L), folders, WebDataset tars), clear
errors naming file, line and column, brace expansion, the seeded train/val split; (issue 13) a BOM
and wrong encodings alike in every text format, WebDataset keys with dots and duplicates in tars.

Fixtures are tiny images written with PIL into tmp_path.
"""

import io
import json
import tarfile

import pytest
from conftest import encoded, save_image, write_members, write_shard

from mlx_clip.data.readers import read_samples, split_samples
from mlx_clip.data.samples import DataError, Sample, TarRef, read_bytes
from mlx_clip.data.tar_shards import expand_braces


def by_name(samples):
    return {str(s.image).rsplit("/", 1)[-1]: s.captions for s in samples}


def test_csv_relative_paths_and_merged_captions(tmp_path):
    save_image(tmp_path / "sub" / "imgs" / "a.jpg", 1)
    save_image(tmp_path / "sub" / "imgs" / "b.jpg", 2)
    (tmp_path / "sub" / "data.csv").write_text(
        'image,caption\nimgs/a.jpg,a cat\nimgs/b.jpg,"a dog, sitting"\nimgs/a.jpg,the cat again\n'
    )
    samples = read_samples(tmp_path / "sub" / "data.csv")
    assert [s.image for s in samples] == [str(tmp_path / "sub" / "imgs" / n) for n in ("a.jpg", "b.jpg")]
    assert samples[0].captions == ["a cat", "the cat again"]
    assert samples[1].captions == ["a dog, sitting"]


def test_tsv_keeps_quotes(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "d.tsv").write_text('image\tcaption\na.png\ta "quoted" word\n')
    assert read_samples(tmp_path / "d.tsv")[0].captions == ['a "quoted" word']


def test_custom_columns(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("id,file,text\n1,a.png,hello\n")
    assert read_samples(tmp_path / "d.csv", image_key="file", caption_key="text")[0].captions == ["hello"]


def test_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"data\.csv: no column 'image' \(columns: a, b\)"):
        read_samples(tmp_path / "data.csv")
    save_image(tmp_path / "ok.png")
    (tmp_path / "miss.csv").write_text("image,caption\nok.png,fine\nnope.png,missing\n")
    with pytest.raises(DataError, match=r"miss\.csv:3: image not found: .*nope\.png"):
        read_samples(tmp_path / "miss.csv")
    (tmp_path / "empty.csv").write_text("image,caption\nok.png,\n")
    with pytest.raises(DataError, match=r"empty\.csv:2: empty caption"):
        read_samples(tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"absent\.csv: no such file"):
        read_samples(tmp_path / "absent.csv")
    with pytest.raises(DataError, match=r"data\.xlsx: unknown data source format"):
        read_samples(tmp_path / "data.xlsx")  # .parquet is read now: tests/test_formats_parquet_hf.py


def test_json_with_caption_lists(tmp_path):
    save_image(tmp_path / "a.png", 1)
    save_image(tmp_path / "b.png", 2)
    items = [
        {"image": "a.png", "caption": ["one", "two", "  "]},
        {"image": "b.png", "captions": ["three"]},
        {"image": "a.png", "caption": "four"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(items))
    assert by_name(read_samples(tmp_path / "d.json")) == {"a.png": ["one", "two", "four"], "b.png": ["three"]}
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "text": "x"}]))
    with pytest.raises(DataError, match=r"bad\.json: item 0: no key 'caption' \(keys: image, text\)"):
        read_samples(tmp_path / "bad.json")


def test_jsonl_and_its_line_errors(tmp_path):
    save_image(tmp_path / "a.png")
    lines = [
        json.dumps({"img": "a.png", "caption": ["x", "y"]}),
        "",
        json.dumps({"img": "a.png", "caption": "z"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    assert read_samples(tmp_path / "d.jsonl", image_key="img")[0].captions == ["x", "y", "z"]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_samples(tmp_path / "bad.jsonl", image_key="img")


def test_folder_with_captions_txt(tmp_path):
    for n in ("a.jpg", "b.png", "unlisted.png"):
        save_image(tmp_path / n)
    (tmp_path / "captions.txt").write_text("a.jpg\tfirst\nb.png\tsecond\n\na.jpg\tthird\n")
    assert by_name(read_samples(tmp_path)) == {"a.jpg": ["first", "third"], "b.png": ["second"]}
    (tmp_path / "captions.txt").write_text("a.jpg first\n")
    with pytest.raises(DataError, match=r"captions\.txt:1: expected 'name<TAB>caption'"):
        read_samples(tmp_path)


def test_folder_with_sidecars(tmp_path):
    save_image(tmp_path / "a.jpg")
    save_image(tmp_path / "deep" / "b.webp")
    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    (tmp_path / "deep" / "b.txt").write_text("only\n")
    samples = read_samples(tmp_path)
    assert by_name(samples) == {"a.jpg": ["line one", "line two"], "b.webp": ["only"]}
    save_image(tmp_path / "c.png")
    with pytest.raises(DataError, match=r"c\.png: no caption file c\.txt"):
        read_samples(tmp_path)


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}.tar") == ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar"]
    assert expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_tar_shards_by_glob_and_brace(tmp_path):
    write_shard(
        tmp_path / "s-000.tar",
        [("k0", "jpg", encoded(0, "JPEG"), "zero"), ("k1", "png", encoded(1), "one\nuno")],
    )
    write_shard(tmp_path / "s-001.tar", [("d/k2", "webp", encoded(2, "WEBP"), "two")])
    by_glob = read_samples(str(tmp_path / "s-*.tar"))
    by_range = read_samples(str(tmp_path / "s-{000..001}.tar"))
    by_list = read_samples(str(tmp_path / "s-{000,001}.tar"))
    assert by_glob == by_range == by_list
    assert [s.captions for s in by_glob] == [["zero"], ["one", "uno"], ["two"]]
    assert all(isinstance(s.image, TarRef) for s in by_glob)
    assert by_glob[2].image.name == "d/k2.webp"
    # Indexed, not extracted: the referenced bytes are the member's bytes.
    assert read_bytes(by_glob[1].image) == encoded(1)
    assert read_samples(str(tmp_path / "s-000.tar")) == by_glob[:2]
    with pytest.raises(DataError, match=r"s-002\.tar: no such shard"):
        read_samples(str(tmp_path / "s-{000..002}.tar"))
    with pytest.raises(DataError, match=r"x-\*\.tar: no files match"):
        read_samples(str(tmp_path / "x-*.tar"))


def test_tar_sample_without_caption(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        data = encoded(0)
        info = tarfile.TarInfo("k0.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"s\.tar: sample 'k0' has an image but no k0\.txt"):
        read_samples(str(tmp_path / "s.tar"))


def test_split_samples_is_deterministic_disjoint_and_covering():
    samples = [Sample(f"{i}.png", [str(i)]) for i in range(100)]
    train, val = split_samples(samples, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(s.image for s in train + val) == sorted(s.image for s in samples)
    assert split_samples(samples, 0.2, seed=3) == (train, val)
    assert split_samples(samples, 0.2, seed=4)[1] != val
    assert [s.image for s in val] == sorted((s.image for s in val), key=lambda p: int(p.split(".")[0]))
    assert split_samples(samples[:3], 0.01, seed=0)[1] != []  # a requested split is never empty


# ---------------------------------------------------------------------------
# Text formats: BOM and encodings

BOM = "\ufeff"


def _formats(root):
    """(name, writer(text) -> source path) for every text format, each naming a.png and b.png."""
    save_image(root / "a.png", seed=1)
    save_image(root / "b.png", seed=2)

    def csv(t):
        return _put(root / "d.csv", t + "image,caption\na.png,a red cat\nb.png,a blue dog\n")

    def tsv(t):
        return _put(root / "d.tsv", t + "image\tcaption\na.png\ta red cat\nb.png\ta blue dog\n")

    def js(t):
        rows = [{"image": "a.png", "caption": "a red cat"}, {"image": "b.png", "caption": "a blue dog"}]
        return _put(root / "d.json", t + json.dumps(rows))

    def jsonl(t):
        return _put(
            root / "d.jsonl",
            t + '{"image": "a.png", "caption": "a red cat"}\n{"image": "b.png", "caption": "a blue dog"}\n',
        )

    def captions_txt(t):
        _put(root / "captions.txt", t + "a.png\ta red cat\nb.png\ta blue dog\n")
        return root

    return [("csv", csv), ("tsv", tsv), ("json", js), ("jsonl", jsonl), ("captions.txt", captions_txt)]


def _put(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_a_utf8_bom_is_accepted_by_every_text_format(tmp_path):
    expected = {"a.png": ["a red cat"], "b.png": ["a blue dog"]}
    for name, write in _formats(tmp_path):
        assert by_name(read_samples(write(BOM))) == expected, name
        assert by_name(read_samples(write(""))) == expected, name


def test_sidecar_and_tar_captions_lose_their_bom(tmp_path):
    save_image(tmp_path / "side" / "a.png")
    (tmp_path / "side" / "a.txt").write_bytes((BOM + "a red cat\n").encode())
    assert by_name(read_samples(tmp_path / "side")) == {"a.png": ["a red cat"]}
    write_shard(tmp_path / "s.tar", [("k", "png", encoded(), BOM + "a red cat")])
    assert [s.captions for s in read_samples(tmp_path / "s.tar")] == [["a red cat"]]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_are_named_and_refused(tmp_path, encoding):
    for name, write in _formats(tmp_path):
        src = write("")
        target = src / "captions.txt" if src.is_dir() else src
        target.write_bytes(target.read_text().encode(encoding))  # with a mark, except utf-16-le
        with pytest.raises(DataError, match="must be UTF-8") as e:
            read_samples(src, on_error="skip", skipped=[])
        assert str(target) in str(e.value), name
        assert ("NUL bytes" if encoding == "utf-16-le" else encoding.upper()) in str(e.value)
        target.unlink()


def test_latin1_text_is_reported_by_file_and_line_as_not_utf8(tmp_path):
    save_image(tmp_path / "a.png")
    _put(tmp_path / "d.csv", "image,caption\na.png,un caf\xe9 noir\na.png,a cup\n", "latin-1")
    skipped = []
    assert by_name(read_samples(tmp_path / "d.csv", on_error="skip", skipped=skipped)) == {"a.png": ["a cup"]}
    assert [s.reason for s in skipped] == ["caption_not_utf8"]
    assert f"{tmp_path / 'd.csv'}:2:" in skipped[0].detail and "must be UTF-8" in skipped[0].detail
    # A Latin-1 image name does not match the UTF-8 one on disk: the message says why.
    save_image(tmp_path / "caf\xe9.png")
    _put(tmp_path / "e.csv", "image,caption\ncaf\xe9.png,a cup\n", "latin-1")
    with pytest.raises(DataError, match="not UTF-8"):
        read_samples(tmp_path / "e.csv")


def test_utf16_sidecar_and_tar_caption_are_skipped_with_a_reason(tmp_path):
    save_image(tmp_path / "side" / "a.png")
    save_image(tmp_path / "side" / "b.png")
    (tmp_path / "side" / "a.txt").write_bytes("a red cat".encode("utf-16"))
    (tmp_path / "side" / "b.txt").write_text("a blue dog")
    skipped = []
    assert by_name(read_samples(tmp_path / "side", on_error="skip", skipped=skipped)) == {
        "b.png": ["a blue dog"]
    }
    assert [s.reason for s in skipped] == ["caption_not_utf8"] and "UTF-16" in skipped[0].detail
    members = [
        ("k.png", encoded()),
        ("k.txt", "a red cat".encode("utf-16")),
        ("m.png", encoded()),
        ("m.txt", b"ok"),
    ]
    shard = write_members(tmp_path / "s.tar", members)
    skipped = []
    assert [s.captions for s in read_samples(shard, on_error="skip", skipped=skipped)] == [["ok"]]
    assert [(s.reason, s.item) for s in skipped] == [("caption_not_utf8", f"{shard}:k.png")]
    assert f"{shard}:k.txt" in skipped[0].detail and "UTF-16" in skipped[0].detail


# ---------------------------------------------------------------------------
# Tar shards: WebDataset keys


def test_dotted_member_names_are_skipped_with_a_reason(tmp_path):
    shard = write_members(
        tmp_path / "s.tar",
        [
            ("a.jpg", encoded(1, "JPEG")),
            ("a.txt", b"a red cat"),
            ("photo.v2.png", encoded(2)),
            ("photo.v2.txt", b"a blue dog"),
            ("a.json", b"{}"),  # another WebDataset field: ignored quietly
        ],
    )
    skipped = []
    samples = read_samples(shard, on_error="skip", skipped=skipped)
    assert [s.captions for s in samples] == [["a red cat"]]
    assert {(s.reason, s.item) for s in skipped} == {
        ("bad_member_name", f"{shard}:photo.v2.png"),
        ("bad_member_name", f"{shard}:photo.v2.txt"),
    }
    assert "photo_v2.png" in next(s.detail for s in skipped if s.item.endswith(".png"))
    with pytest.raises(DataError, match="photo.v2.png"):
        read_samples(shard)  # strict mode names it too


@pytest.mark.parametrize("order", ["image first", "caption first"])
def test_a_duplicate_key_keeps_the_first_pair_and_logs_the_second(tmp_path, order):
    pairs = [[("a.png", encoded(1)), ("a.txt", b"one")], [("a.png", encoded(2)), ("a.txt", b"two")]]
    if order == "caption first":
        pairs = [p[::-1] for p in pairs]
    shard = write_members(
        tmp_path / "s.tar", [*pairs[0], ("b.png", encoded(3)), ("b.txt", b"three"), *pairs[1]]
    )
    skipped = []
    samples = read_samples(shard, on_error="skip", skipped=skipped)
    assert [s.captions for s in samples] == [["one"], ["three"]]  # "two" is not attached to the first a.png
    with tarfile.open(shard) as tf:
        first = next(m for m in tf if m.name == "a.png")
    assert samples[0].image.offset == first.offset_data
    assert [s.reason for s in skipped] == ["duplicate_key"]
    assert str(shard) in skipped[0].detail and "a.png" in skipped[0].detail and "a.txt" in skipped[0].detail


def test_one_image_with_two_caption_members_keeps_both(tmp_path):
    shard = write_members(tmp_path / "s.tar", [("a.png", encoded()), ("a.txt", b"one"), ("a.txt", b"two")])
    assert [s.captions for s in read_samples(shard)] == [["one", "two"]]
