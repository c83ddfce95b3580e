"""mlx_clip.data.pipeline: the seeded rank-aware loader over every source type: content, determinism,
order, sharding, errors (the readers: tests/test_readers.py).

Fixtures are tiny images written with PIL into tmp_path; loaders use 16-pixel outputs.
"""

import io

import numpy as np
import pytest
from conftest import assert_same_batches, collect, encoded, pixels, save_image, write_shard
from PIL import Image

from mlx_clip.data.pipeline import (
    ArraySource,
    DataError,
    Loader,
    Sample,
    epoch_permutation,
    read_samples,
    sample_rng,
)
from mlx_clip.data.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform, normalize

MEAN, STD = np.asarray(OPENAI_MEAN), np.asarray(OPENAI_STD)


@pytest.fixture
def csv_dataset(tmp_path):
    """23 images of varied sizes in imgs/; every third one has three captions."""
    rows = ["image,caption"]
    for i in range(23):
        save_image(tmp_path / "imgs" / f"{i:02d}.png", seed=i, w=20 + i, h=30 - i % 7)
        rows += [f"imgs/{i:02d}.png,image {i}"]
        if i % 3 == 0:
            rows += [f"imgs/{i:02d}.png,second {i}", f"imgs/{i:02d}.png,third {i}"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return read_samples(tmp_path / "data.csv")


# ---------------------------------------------------------------------------
# Loader: content


def test_eval_batches_match_eval_transform(tmp_path):
    """Native decode + Python transform == eval_transform(PIL.Image.open(path)) for every decode path."""
    save_image(tmp_path / "rgb.png", 1, 40, 30)
    save_image(tmp_path / "gray.png", 2, 30, 41, mode="L")
    save_image(tmp_path / "p.png", 3, 33, 33, mode="P")
    save_image(tmp_path / "rgba.png", 4, 20, 50, mode="RGBA")  # alpha: decoded by PIL, composited on white
    save_image(tmp_path / "a.webp", 5)  # a format the native decoder cannot read
    Image.fromarray(pixels(6)[..., 0].astype(np.uint16) * 257).save(tmp_path / "i16.png")
    for q, name in ((95, "q95.jpg"), (60, "q60.jpg")):
        Image.fromarray(pixels(7)).save(tmp_path / name, quality=q)
    Image.fromarray(pixels(8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    names = [
        "rgb.png",
        "gray.png",
        "p.png",
        "rgba.png",
        "a.webp",
        "i16.png",
        "q95.jpg",
        "q60.jpg",
        "cmyk.jpg",
    ]
    samples = [Sample(str(tmp_path / n), [n]) for n in names]
    loader = Loader(samples, 4, 16, train=False, num_workers=2)
    batches = collect(loader)
    images = np.concatenate([b["images"] for b in batches])
    assert [c for b in batches for c in b["captions"]] == names
    for n, out in zip(names, images, strict=True):
        ref = eval_transform(16)(Image.open(tmp_path / n))
        # PNG / PIL paths are exact. The native JPEG decoder matched PIL's libjpeg-turbo bit for bit
        # in mlx-data 0.1.0; allow a couple of 8-bit levels in case another build rounds differently.
        atol = 2 / 255 / STD.min() if n.endswith(".jpg") else 1e-6
        np.testing.assert_allclose(out, ref, rtol=0, atol=atol, err_msg=n)


def test_normalisation_values(tmp_path):
    a = np.zeros((20, 20, 3), np.uint8)
    a[:] = (255, 0, 128)
    Image.fromarray(a).save(tmp_path / "solid.png")
    (b,) = collect(Loader([Sample(str(tmp_path / "solid.png"), ["x"])], 1, 8, train=False, num_workers=1))
    assert b["images"].shape == (1, 8, 8, 3) and b["images"].dtype == np.float32
    expected = (np.array([255, 0, 128]) / 255 - MEAN) / STD
    np.testing.assert_allclose(b["images"][0], np.broadcast_to(expected, (8, 8, 3)), atol=1e-5)
    assert b["index"].dtype == np.int64


def test_tar_source_loads(tmp_path):
    write_shard(tmp_path / "s-0.tar", [(f"k{i}", "png", encoded(i), f"c{i}") for i in range(5)])
    write_shard(
        tmp_path / "s-1.tar",
        [("k5", "jpg", encoded(5, "JPEG"), "c5"), ("k6", "webp", encoded(6, "WEBP"), "c6")],
    )
    samples = read_samples(str(tmp_path / "s-{0,1}.tar"))
    batches = collect(Loader(samples, 3, 16, train=False, num_workers=2))
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert [c for b in batches for c in b["captions"]] == [f"c{i}" for i in range(7)]
    ref = eval_transform(16)(Image.open(io.BytesIO(encoded(1))))
    np.testing.assert_allclose(batches[0]["images"][1], ref, atol=1e-6)


def test_array_source(tmp_path):
    images = np.stack([pixels(i, 16, 16) for i in range(10)])
    caps = [[f"a{i}", f"b{i}"] for i in range(10)]
    src = ArraySource(images, caps)
    (b,) = collect(Loader(src, 10, 16, train=False, num_workers=0))
    np.testing.assert_array_equal(b["images"], normalize(images))  # at model size: only normalised
    assert b["captions"] == [f"a{i}" for i in range(10)]
    # Training: shuffled, one caption per image per epoch, still no augmentation by default.
    train = collect(Loader(src, 5, 16, train=True, num_workers=2))
    for t in train:
        np.testing.assert_array_equal(t["images"], normalize(images[t["index"]]))
        assert all(c in caps[i] for c, i in zip(t["captions"], t["index"], strict=True))
    # In-memory batches are built whole; files take the per-sample path: same captions, same pixels.
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    files = [Sample(str(tmp_path / f"{i}.png"), caps[i]) for i in range(10)]
    from_files = collect(Loader(files, 5, 16, train=True, augment=False, num_workers=2))
    assert_same_batches(train, from_files)
    assert (
        train[0]["captions"][0]
        == caps[train[0]["index"][0]][sample_rng(0, 0, train[0]["index"][0]).integers(2)]
    )
    (small,) = collect(Loader(src, 10, 8, train=False, num_workers=0))  # another size: resized
    np.testing.assert_allclose(small["images"][3], eval_transform(8)(images[3]), atol=1e-6)
    with pytest.raises(DataError, match=r"uint8 \(n, H, W, 3\)"):
        ArraySource(images.astype(np.float32), caps)


def test_tokens(csv_dataset):
    def tokenize(texts):  # a fake tokenizer: (len(texts), 4) int32
        return np.array([[len(t), ord(t[0]), ord(t[-1]), 0] for t in texts], np.int32)

    array_src = ArraySource(np.zeros((23, 16, 16, 3), np.uint8), [s.captions for s in csv_dataset])
    for src in (csv_dataset, array_src):  # per-sample and whole-batch paths
        for b in collect(Loader(src, 4, 16, train=True, num_workers=2, tokenize=tokenize)):
            assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (4, 4)
            np.testing.assert_array_equal(b["tokens"], tokenize(b["captions"]))


# ---------------------------------------------------------------------------
# Loader: determinism, order, sharding


def test_same_seed_same_batches_and_augmentation_is_seeded(csv_dataset):
    kw = dict(train=True, seed=7, augment={"scale": (0.3, 1.0), "color_jitter": 0.2})
    a = collect(Loader(csv_dataset, 4, 16, num_workers=2, **kw))
    b = collect(Loader(csv_dataset, 4, 16, num_workers=2, **kw))
    assert_same_batches(a, b)
    other = collect(Loader(csv_dataset, 4, 16, num_workers=2, **{**kw, "seed": 8}))
    assert not np.array_equal(a[0]["index"], other[0]["index"])


def test_threads_and_prefetch_do_not_change_results(csv_dataset):
    kw = dict(train=True, seed=1, augment={"scale": (0.3, 1.0), "color_jitter": 0.3})
    ref = collect(Loader(csv_dataset, 3, 16, num_workers=0, **kw), epoch=2)
    for workers, prefetch, chunk in [(1, 1, 1), (2, 3, 2), (3, 8, 32), (4, 2, 3)]:
        loader = Loader(csv_dataset, 3, 16, num_workers=workers, prefetch=prefetch, chunk_batches=chunk, **kw)
        assert_same_batches(ref, collect(loader, epoch=2))


def test_start_batch_equals_skipping(csv_dataset):
    loader = Loader(csv_dataset, 3, 16, train=True, seed=5, num_workers=2, chunk_batches=2)
    full = collect(loader, epoch=1)
    assert len(full) == len(loader) == 23 // 3
    for k in (0, 1, 4, len(full)):
        assert_same_batches(full[k:], collect(loader, epoch=1, start_batch=k))
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch(1, start_batch=len(full) + 1)


def test_epochs_differ_in_order_and_captions(csv_dataset):
    loader = Loader(csv_dataset, 4, 16, train=True, seed=0, num_workers=2)
    epochs = [collect(loader, epoch=e) for e in range(4)]
    orders = [np.concatenate([b["index"] for b in ep]) for ep in epochs]
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], epoch_permutation(0, 0, 23)[: len(orders[0])])
    picked = {}  # image 0 has three captions: over four epochs it should not always get the same one
    for ep in epochs:
        for b in ep:
            for i, c in zip(b["index"], b["captions"], strict=True):
                assert c in csv_dataset[i].captions
                picked.setdefault(int(i), set()).add(c)
    assert any(len(v) > 1 for k, v in picked.items() if k % 3 == 0)
    assert all(len(v) == 1 for k, v in picked.items() if k % 3)


def test_rank_sharding_is_disjoint_and_covering(csv_dataset):
    world, bs = 3, 2  # global batch 6: training keeps 3 of 23 // 6 global batches = 18 samples
    train = [
        collect(Loader(csv_dataset, bs, 16, train=True, seed=2, rank=r, world_size=world, num_workers=1))
        for r in range(world)
    ]
    perm = epoch_permutation(2, 0, 23)
    for k in range(23 // (bs * world)):
        # Global batch k is the k-th slice of the epoch permutation, split contiguously by rank.
        joined = np.concatenate([train[r][k]["index"] for r in range(world)])
        np.testing.assert_array_equal(joined, perm[k * 6 : (k + 1) * 6])
    seen = np.concatenate([b["index"] for r in range(world) for b in train[r]])
    assert len(seen) == len(set(seen.tolist())) == 18
    # Evaluation: no drop, no shuffle; the 5 leftover samples are split 2 / 2 / 1.
    evals = [
        Loader(csv_dataset, bs, 16, train=False, rank=r, world_size=world, num_workers=1)
        for r in range(world)
    ]
    shards = [[b["index"] for b in collect(e)] for e in evals]
    assert [len(e) for e in evals] == [len(s) for s in shards] == [4, 4, 4]
    assert [len(s[-1]) for s in shards] == [2, 2, 1]
    assert sorted(np.concatenate([i for s in shards for i in s]).tolist()) == list(range(23))
    np.testing.assert_array_equal(shards[1][0], [2, 3])


def test_eval_has_no_augmentation_and_keeps_order(csv_dataset):
    loader = Loader(csv_dataset, 5, 16, train=False, augment={"color_jitter": 0.5}, num_workers=2)
    batches = collect(loader, epoch=3)
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 3]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(23))
    assert_same_batches(batches, collect(loader, epoch=0))
    assert batches[0]["captions"][0] == "image 0"  # the first caption, always


# ---------------------------------------------------------------------------
# Loader: errors


def test_loader_errors(tmp_path, csv_dataset):
    with pytest.raises(DataError, match="fewer than one global batch"):
        Loader(csv_dataset, 8, 16, train=True, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        Loader(csv_dataset, 2, 16, train=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown augment key"):
        Loader(csv_dataset, 2, 16, train=True, augment={"flip": True})
    good = str(save_image(tmp_path / "good.png"))
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # JPEG magic, garbage body
    jpeg = io.BytesIO()
    Image.fromarray(pixels(0, 64, 64)).save(jpeg, format="JPEG")
    # Truncated JPEGs (half-downloaded files, cut tar members) made mlx-data's native decoder hang.
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    for name in ("garbage.jpg", "truncated.jpg"):
        samples = [Sample(good, ["ok"]), Sample(str(tmp_path / name), ["bad"])]
        with pytest.raises(DataError, match=rf"{name}: cannot decode image"):
            collect(Loader(samples, 2, 16, train=False, num_workers=2))
