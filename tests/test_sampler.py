"""mlx_clip.data.sampler + Loader(sampler=...): key words, and hard-negative epoch orders that are
permutations, pure functions of (seed, epoch), sharded and resumed like the random order, and
measurably more alike within a batch than random batches."""

import numpy as np
import pytest

from mlx_clip.data import synthetic
from mlx_clip.data.pipeline import ArraySource, Loader
from mlx_clip.data.sampler import (
    epoch_permutation,
    hard_negative_order,
    key_words,
    shared_word_rate,
)


@pytest.fixture(scope="module")
def shapes():
    """600 built-in images (16 px: only the captions matter here) with the default captions."""
    d = synthetic.generate(600, image_size=16, seed=0, part="train", split="mixed")
    return ArraySource(d.images, d.captions)


def loader(src, sampler="hard_negative", **kw):
    kw = {"seed": 3, "num_workers": 0, **kw}
    return Loader(src, kw.pop("batch_size", 16), 16, train=True, sampler=sampler, **kw)


def test_key_words_are_the_content_words_all_captions_share():
    keys = key_words(
        [
            ["A photo of a red circle.", "a red circle on the left"],  # shared: red, circle
            ["a dog", "a cat"],  # nothing shared: every word of the sample
            ["it is in the photo"],  # stopwords only: no key
            ["Ein grünes Quadrat", "GRÜNES quadrat, 2 x"],  # any script, case-folded, no digits / 1-letter
        ]
    )
    assert [sorted(keys.words(i)) for i in range(4)] == [
        ["circle", "red"],
        ["cat", "dog"],
        [],
        ["grünes", "quadrat"],
    ]
    # ASCII text takes a faster pattern: the same words.
    assert key_words([["Ein rotes Quadrat", "ROTES quadrat, 2 x"]]).words(0) == ["quadrat", "rotes"]


def test_too_common_words_are_not_keys():
    caps = [["a thing"], ["a red thing"], ["a blue thing"], ["a green ball"]]
    keys = key_words(caps)  # "thing" is in 3 of 4 samples: kept only where nothing else is left
    assert [keys.words(i) for i in range(4)] == [["thing"], ["red"], ["blue"], ["ball", "green"]]
    assert [keys.words(i) for i in range(4)] != [key_words(caps, max_share=1.0).words(i) for i in range(4)]


def test_order_is_a_permutation_a_pure_function_of_seed_and_epoch(shapes):
    keys, n = key_words(shapes.captions), len(shapes)
    orders = [hard_negative_order(keys, 3, e, 16) for e in range(3)]
    for o in orders:
        assert o.dtype == np.int64 and np.array_equal(np.sort(o), np.arange(n))
    assert np.array_equal(orders[1], hard_negative_order(key_words(shapes.captions), 3, 1, 16))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[1], hard_negative_order(keys, 4, 1, 16))
    # Not the same grouping every epoch: few batch-mate pairs of epoch 0 meet again in epoch 1.
    mates = [{frozenset(p) for b in o[: n // 16 * 16].reshape(-1, 16) for p in _pairs(b)} for o in orders[:2]]
    assert len(mates[0] & mates[1]) < 0.25 * len(mates[0])  # measured: 6%


def _pairs(batch):
    b = batch.tolist()
    return [(b[i], b[j]) for i in range(len(b)) for j in range(i + 1, len(b))]


def test_batches_share_key_words_far_more_than_random_batches(shapes):
    """The statistic: the share of same-batch sample pairs with a key word in common. Random
    batches of the built-in data: ~0.5 (mostly two samples of one colour or one shape);
    hard-negative batches: ~0.95 (all but the batches that straddle two groups)."""
    keys = key_words(shapes.captions)
    rates = {
        s: np.mean([shared_word_rate(keys, loader(shapes, s).rank_batches(e)) for e in range(3)])
        for s in ("random", "hard_negative")
    }
    assert rates["random"] < 0.6, rates
    assert rates["hard_negative"] > 0.9, rates


def test_same_batch_count_and_rank_sharding_as_random(shapes):
    world, b = 3, 4
    g = world * b
    for sampler in ("random", "hard_negative"):
        ranks = [loader(shapes, sampler, batch_size=b, rank=r, world_size=world) for r in range(world)]
        assert [len(x) for x in ranks] == [len(shapes) // g] * world
        order = ranks[0].epoch_order(2)
        assert all(np.array_equal(order, x.epoch_order(2)) for x in ranks)  # every rank agrees
        batches = [x.rank_batches(2) for x in ranks]
        for k in range(len(shapes) // g):  # global batch k: slice k of the order, split by rank
            joined = np.concatenate([batches[r][k] for r in range(world)])
            np.testing.assert_array_equal(joined, order[k * g : (k + 1) * g])
        seen = np.concatenate([i for r in batches for i in r])
        assert len(set(seen.tolist())) == len(seen) == len(shapes) // g * g
    assert np.array_equal(loader(shapes, "random").epoch_order(5), epoch_permutation(3, 5, len(shapes)))


def test_resume_from_start_batch_gives_the_same_remaining_batches(shapes):
    src = ArraySource(shapes.images[:200], shapes.captions[:200])
    full = list(loader(src, num_workers=2, chunk_batches=3).epoch(1))
    for k in (0, 1, 5, len(full)):
        resumed = list(loader(src, num_workers=0).epoch(1, start_batch=k))  # a fresh loader, as on resume
        assert len(resumed) == len(full) - k
        for x, y in zip(full[k:], resumed, strict=True):
            np.testing.assert_array_equal(x["index"], y["index"])
            np.testing.assert_array_equal(x["images"], y["images"])
            assert x["captions"] == y["captions"]


def test_evaluation_ignores_the_sampler_and_bad_names_fail(shapes):
    ev = Loader(shapes, 50, 16, train=False, sampler="hard_negative", num_workers=0)
    assert np.concatenate(ev.rank_batches(0)).tolist() == list(range(len(shapes)))
    with pytest.raises(ValueError, match="sampler must be one of"):
        loader(shapes, "hardest")


def test_samples_without_key_words_still_train(shapes):
    caps = [["the"]] * 10 + [[f"word{chr(97 + i % 5)}"] for i in range(30)]  # 10 without any key
    src = ArraySource(np.zeros((40, 16, 16, 3), np.uint8), caps)
    order = loader(src, batch_size=8).epoch_order(0)
    assert np.array_equal(np.sort(order), np.arange(40))
