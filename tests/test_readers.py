"""mlx_clip.data.readers: every source format (CSV/TSV, JSON(L), folders, WebDataset tars), clear
errors naming file, line and column, brace expansion, the seeded train/val split.

Fixtures are tiny images written with PIL into tmp_path.
"""

import io
import json
import tarfile

import pytest
from conftest import encoded, save_image, write_shard

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
    with pytest.raises(DataError, match=r"data\.parquet: unknown data source format"):
        read_samples(tmp_path / "data.parquet")


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
