"""Weighted mixtures of training sources (issue 17): config entries, the epoch order, rank slices,
per-draw sample streams, per-source bad-data checks and fingerprints, exact resume from the CLI."""

import json

import numpy as np
import pytest
from conftest import SMALL, collect, encoded, make_csv, save_image, train_run, write_shard
from safetensors.numpy import load_file

from mlx_clip.config import load_config
from mlx_clip.data.checks import BadDataWarning, SkipLog
from mlx_clip.data.pipeline import Loader, Sample
from mlx_clip.data.run_data import build_run_data
from mlx_clip.data.sampler import Mixture, mixture_order
from mlx_clip.data.samples import DataError
from mlx_clip.data.synthetic import write_dataset
from mlx_clip.schema import ConfigError
from mlx_clip.train import main as train_main


def mixture_arg(*sources) -> str:
    """--data.train's value for (path, weight) pairs: a YAML flow list."""
    return "[" + ", ".join(f"{{path: '{p}', weight: {w}}}" for p, w in sources) + "]"


# ---------------------------------------------------------------------------
# The epoch order


def test_draws_per_source_follow_the_weights():
    mix = Mixture((50, 300, 20), (1.0, 2.0, 5.0))
    n = sum(mix.sizes)
    for epoch in range(5):
        order = mixture_order(mix, 7, epoch)
        assert len(order) == n and order.min() >= 0 and order.max() < n
        counts = mix.counts(order)
        expected, sigma = n * mix.shares, np.sqrt(n * mix.shares * (1 - mix.shares))
        assert np.all(np.abs(counts - expected) <= 4 * sigma), (counts, expected)
        # Within a source, a sample repeats only once all of its samples were drawn:
        # the upsampled source's samples come up floor or ceil(draws / size) times each,
        per = np.bincount(order[order >= 350] - 350, minlength=20)
        assert per.max() - per.min() <= 1 and per.sum() == counts[2]
        # and the down-weighted one's never twice.
        assert len(set(order[(order >= 50) & (order < 350)].tolist())) == counts[1]


def test_order_is_a_pure_function_of_seed_and_epoch():
    mix = Mixture((8, 3, 5), (1.0, 0.0, 2.0))
    a = mixture_order(mix, 1, 0)
    np.testing.assert_array_equal(a, mixture_order(mix, 1, 0))
    assert not np.array_equal(a, mixture_order(mix, 1, 1))
    assert not np.array_equal(a, mixture_order(mix, 2, 0))
    assert mix.counts(a)[1] == 0 and len(a) == 13  # weight 0: never drawn, nor counted in the epoch


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Samples of three sources end to end (6, 10 and 4 images, 3 captions each) and their Mixture."""
    tmp = tmp_path_factory.mktemp("three")
    samples = [
        Sample(str(save_image(tmp / f"{i}.png", seed=i, w=20, h=20)), [f"a{i}", f"b{i}", f"c{i}"])
        for i in range(20)
    ]
    return samples, Mixture((6, 10, 4), (1.0, 1.0, 3.0))


def mixture_loader(three_sources, **kw):
    samples, mix = three_sources
    args = dict(train=True, seed=5, num_workers=0, augment={"scale": (0.3, 1.0)}, mixture=mix)
    return Loader(samples, kw.pop("batch_size", 4), 12, **{**args, **kw})


def test_rank_slices_concatenate_to_the_global_batches(three_sources):
    one = mixture_loader(three_sources)
    ranks = [mixture_loader(three_sources, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        whole = collect(one, epoch)
        parts = [collect(r, epoch) for r in ranks]
        assert len(whole) == len(parts[0]) == len(parts[1]) == 5
        for k, batch in enumerate(whole):
            for key in ("index", "images"):
                joined = np.concatenate([parts[0][k][key], parts[1][k][key]])
                np.testing.assert_array_equal(batch[key], joined)
            assert batch["captions"] == parts[0][k]["captions"] + parts[1][k]["captions"]
        # resume at a batch: the same batches from there on
        for x, y in zip(whole[2:], collect(one, epoch, start_batch=2), strict=True):
            np.testing.assert_array_equal(x["images"], y["images"])
    assert one.source_counts(0).sum() == 20 and len(one.source_counts(0)) == 3


def test_a_sample_drawn_twice_gets_other_draws(three_sources):
    loader = mixture_loader(three_sources)
    order = loader.epoch_order(0)
    index = np.concatenate([b["index"] for b in collect(loader, 0)])
    images = np.concatenate([b["images"] for b in collect(loader, 0)])
    np.testing.assert_array_equal(index, order)
    twice = next(i for i in order.tolist() if (order == i).sum() > 1)  # source 2 is upsampled
    first, second = np.flatnonzero(order == twice)[:2]
    assert not np.array_equal(images[first], images[second])  # another crop each time


# ---------------------------------------------------------------------------
# Config: bad entries


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", r"data\.train is an empty list"),
        ("[{path: a.csv, weight: -1}]", r"data\.train\[0\]\.weight must be >= 0, got -1\.0 \(a\.csv\)"),
        (
            "[{path: a.csv, weight: 0}, {path: b.csv, weight: 0}]",
            r"every weight is 0 \(data\.train\[0\]\.weight=0",
        ),
        ("[{path: a.csv}, {weight: 2}]", r"data\.train\[1\]: missing key 'path'.*got \{'weight': 2\}"),
        ("[{path: a.csv, wieght: 2}]", r"unknown config key 'data\.train\[0\]\.wieght'; did you mean"),
        ("[{path: a.csv, format: zip}]", r"data\.train\[0\]\.format must be"),
        ("[{path: builtin}]", r"data\.train\[0\]\.path 'builtin'"),
        ("[{path: ''}]", r"data\.train\[0\]\.path is empty"),
    ],
)
def test_bad_entries_name_the_entry(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [("data.train", value)])


def test_plain_paths_and_the_hard_negative_sampler():
    assert load_config(None, [("data.train", "x.csv")]).data.train == "x.csv"
    cfg = load_config(None, [("data.train", "[{path: x.csv, weight: 0}, {path: y, format: folder}]")])
    assert [(s.path, s.weight, s.format) for s in cfg.data.sources()] == [
        ("x.csv", 0.0, "auto"),
        ("y", 1.0, "folder"),
    ]
    with pytest.raises(ConfigError, match="hard_negative does not combine with a data.train mixture"):
        load_config(None, [("data.train", "[{path: x.csv}]"), ("data.sampler", "hard_negative")])


# ---------------------------------------------------------------------------
# Bad data: each source checked on its own


def small_config(train: str, *extra):
    pairs = [(SMALL[i][2:], SMALL[i + 1]) for i in range(0, len(SMALL), 2)]
    return load_config(None, [*pairs, ("data.batch_size", "8"), ("data.train", train), *extra])


def tar_source(path, n):
    items = [(f"t{i:03d}", "png", encoded(100 + i, w=8, h=8), f"tar cap {i}") for i in range(n)]
    write_shard(path, items)
    return path


def test_the_bad_share_is_per_source(tmp_path):
    bad = {"zero.png": b"", "gone.png": None}
    crowded = make_csv(tmp_path / "a", 18, bad)  # 2 of 20 bad: 10%
    clean = make_csv(tmp_path / "b", 20, {})
    cfg = small_config(mixture_arg((crowded, 1), (clean, 1)))  # 2 of 40 together: 5%
    with SkipLog(tmp_path / "skips.jsonl") as log, pytest.warns(BadDataWarning):
        with pytest.raises(DataError, match=r"data\.train\[0\] .*a/d\.csv: 2 of 20 items \(10\.0%\) are bad"):
            build_run_data(cfg, cfg.model_config(), skip_log=log)
    # The same two bad items spread thinly (1 of 20 in each of two sources, 5%) train.
    spread = [make_csv(tmp_path / n, 19, {f"{n}.png": b""}) for n in ("c", "d")]
    shard = tar_source(tmp_path / "t.tar", 12)
    cfg = small_config(mixture_arg((spread[0], 1), (spread[1], 2), (shard, 1)))
    with SkipLog(tmp_path / "skips.jsonl") as log, pytest.warns(BadDataWarning):
        data = build_run_data(cfg, cfg.model_config(), skip_log=log)
    lines = [json.loads(x) for x in (tmp_path / "skips.jsonl").read_text().splitlines()]
    assert [(x["source"], x["item"].rsplit("/", 1)[-1]) for x in lines] == [
        ("data.train[0]", "c.png"),
        ("data.train[1]", "d.png"),
    ]
    # 19 kept per csv, 12 in the tar; 5% held out of each (1, 1, 1)
    assert [(s.samples, s.skipped) for s in data.sources] == [(18, 1), (18, 1), (11, 0)]
    assert data.train.num_samples == 47 and data.evals["val"].loader.num_samples == 3
    line = "18 samples, 1 skipped, weight 2, expected share 50.0% (1.3 passes over it per epoch)"
    assert data.sources[1].describe().endswith(line)


# ---------------------------------------------------------------------------
# A mixture from the CLI: exact resume, per-epoch counts, fingerprints


@pytest.fixture(scope="module")
def mixture_runs(tmp_path_factory):
    """A csv source (64 images) and a folder source (24) at weights 1 and 3: 6 steps straight, and
    3 + resume + 3 (an epoch is 5 batches of 16, so both cross into epoch 1)."""
    tmp = tmp_path_factory.mktemp("mix")
    csv = write_dataset(tmp / "a", 64, image_size=40, seed=3, fmt="csv")
    folder = write_dataset(tmp / "b", 24, image_size=40, seed=4, fmt="folder")
    common = ["--data.train", mixture_arg((csv, 1), (folder, 3)), "--steps", "6", "--eval.every", "0"]
    common += ["--train.save_every", "0"]
    full, _ = train_run(tmp, "full", *common)
    half, _ = train_run(tmp, "half", *common, "--stop-after", "3")
    train_main(["--out", str(half), "--resume", *SMALL, *common])
    return full, half, folder, common


def test_resume_across_a_mixture_is_bit_exact(mixture_runs):
    full, half, _, _ = mixture_runs
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(full / "checkpoints" / "step_6" / name))
        b = load_file(str(half / "checkpoints" / "step_6" / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


def test_draws_per_source_are_logged_once_per_epoch(mixture_runs):
    full, half, _, _ = mixture_runs
    for out in (full, half):
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        mixes = [r for r in records if r["event"] == "mixture"]
        assert [r["epoch"] for r in mixes] == [0, 1]  # the resumed run starts mid-epoch 0
        assert all(sum(r["drawn"].values()) == 80 for r in mixes)  # 5 batches of 16
        assert set(mixes[0]["drawn"]) == {"data.train[0]", "data.train[1]"}
        assert all("epoch" in r for r in records if r["event"] in ("train", "eval"))
    fingerprint = json.loads((full / "checkpoints" / "step_6" / "state.json").read_text())["data"]
    assert fingerprint["data.train[1]"]["weight"] == 3.0 and fingerprint["data.train[0]"]["samples"] == 61


def test_resume_refuses_a_changed_source_or_weight(mixture_runs, tmp_path):
    _, half, folder, common = mixture_runs
    csv = common[1].split("'")[1]
    (folder / "000023.png").unlink()
    (folder / "000023.txt").unlink()
    with pytest.raises(SystemExit, match=r"data\.train\[1\] samples: 23 -> 22"):
        train_main(["--out", str(half), "--resume", *SMALL, *common, "--steps", "8"])
    reweighted = [*common, "--data.train", mixture_arg((csv, 2), (folder, 3))]
    with pytest.raises(SystemExit, match=r"cannot resume .* changed data\.train"):
        train_main(["--out", str(half), "--resume", *SMALL, *reweighted, "--steps", "8"])


def test_a_bad_image_at_decode_time_is_replaced_from_its_own_source(tmp_path):
    """validate off: the junk image reaches the loader, which substitutes a sample of the same
    source and logs the skip with its source."""
    junk = make_csv(tmp_path / "a", 15, {"junk.png": b"junk"})
    shard = tar_source(tmp_path / "t.tar", 16)
    cfg = small_config(
        mixture_arg((junk, 3), (shard, 1)), ("data.validate", "'off'"), ("data.val_ratio", "0")
    )
    with SkipLog(tmp_path / "skips.jsonl") as log:
        data = build_run_data(cfg, cfg.model_config(), skip_log=log)
        with pytest.warns(BadDataWarning, match="junk.png"):
            batches = collect(data.train, 0)
    lines = [json.loads(x) for x in (tmp_path / "skips.jsonl").read_text().splitlines()]
    assert lines and all(x["source"] == "data.train[0]" and x["stage"] == "decode" for x in lines)
    assert all(x["index"] == 15 and 0 <= x["substitute"] < 15 for x in lines)  # the csv's own samples
    assert 15 not in np.concatenate([b["index"] for b in batches]).tolist()
