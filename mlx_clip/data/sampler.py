"""Epoch orders for training: a plain shuffle, hard-negative batches of related captions, or a
weighted mixture of sources.

Each is a pure function of (seed, epoch) that returns n sample indices (a permutation of the n
samples, except a mixture's, which may repeat some); the Loader cuts it into global batches of
g = batch_size * world_size consecutive indices and gives each rank a contiguous slice, so
sharding, dropping the last partial batch and `start_batch` resume work the same way for any order.

A mixture's epoch (`mixture_order`): the sources' samples are concatenated (source 0 first), and
an epoch is as many draws as the sources of weight > 0 hold together. Each draw picks its source
with probability weight / sum(weights); within a source the draws walk a permutation of it drawn
from (seed, epoch, source), and a source drawn more often than it has samples (upsampled) starts
a fresh permutation each time it runs out. So a source's expected share of an epoch is its weight's
share, a source's samples repeat within an epoch only once all of them were drawn, and a
down-weighted source shows a different random part of itself every epoch.

Hard negatives (`hard_negative_order`): each sample has key words, the content words that all
of its captions share (lowercase words, minus STOPWORDS and minus words in more than half of the
samples, which group nothing). Per epoch every sample picks one of its key words at random; the
samples are sorted by that word (the words in a random order, ties broken at random), cut into
global batches, and the full batches are shuffled. A batch then holds mostly samples that share
a word ("red ...", "... circle"), so its in-batch negatives differ from the positive in fewer
ways. Only the per-epoch work is vectorised numpy (one lexsort); the key words are found once.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass

import numpy as np

from ..config import Sampler

SAMPLERS = typing.get_args(Sampler)
# First words of the seed sequences of the orders (sample_maker.py's per-sample streams use 2 and 3).
PERM, HARD, MIX = 1, 4, 5
# Function words and caption boilerplate ("a photo of ..."): never a key.
STOPWORDS = frozenset(
    """a an the of in on at to and or with by for from as is are was were be been being has have
    it its this that these those there here image photo picture""".split()
)
# A word in more than this share of the samples is too common to make a batch any harder.
MAX_KEY_SHARE = 0.5
# Words are runs of >= 2 letters (any script); "\n" ends a caption in the joined text. The ASCII
# pattern finds the same tokens in lowercase ASCII text, twice as fast.
_TOKEN = re.compile(r"[^\W\d_]{2,}|\n")
_ASCII_TOKEN = re.compile(r"[a-z]{2,}|\n")


@dataclass(frozen=True)
class KeyWords:
    """Each sample's key words as word ids, in CSR layout: sample i has ids[start[i]:start[i + 1]]."""

    ids: np.ndarray  # int64 (total,)
    start: np.ndarray  # int64 (n + 1,)
    vocab: list[str]  # word of each id

    def __len__(self) -> int:
        return len(self.start) - 1

    def words(self, i: int) -> list[str]:
        return [self.vocab[j] for j in self.ids[self.start[i] : self.start[i + 1]]]


def key_words(captions: list[list[str]], max_share: float = MAX_KEY_SHARE) -> KeyWords:
    """Key words of every sample: the content words common to all its captions (all of its
    captions' words when they share none), minus words in more than `max_share` of the samples
    (unless that would leave a sample with none).

    Content words: lowercase runs of >= 2 letters, not in STOPWORDS. One regex pass over all the
    text, then numpy on (caption, word) id pairs: seconds per million captions, once per run.
    """
    n = len(captions)
    n_caps = np.array([len(c) for c in captions], np.int64)
    text = "\n".join(c.replace("\n", " ") for caps in captions for c in caps).lower() + "\n"
    tokens = (_ASCII_TOKEN if text.isascii() else _TOKEN).findall(text)
    words = sorted(set(tokens))  # "\n" sorts first: id 0; sorted, so ids do not depend on hashing
    vocab = {w: i for i, w in enumerate(words)}
    tok = np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens))
    V = len(vocab)
    stop = np.zeros(V, bool)
    stop[[vocab[w] for w in STOPWORDS if w in vocab]] = True
    end = tok == 0
    caption = np.cumsum(end) - end  # the caption of each token
    word = ~end & ~stop[tok]
    # Distinct (caption, word), then per (sample, word) the number of its captions that say it.
    cw, _ = _unique(caption[word] * V + tok[word])
    sample = np.repeat(np.arange(n), n_caps)[cw // V]
    if n and n_caps.max() > 1:
        sw, said = _unique(sample * V + cw % V)
        sample, wid = sw // V, sw % V
    else:  # one caption each: already distinct and sorted by sample
        wid, said = cw % V, np.ones(len(cw), np.int64)
    in_all = said == n_caps[sample]
    keep = in_all | (np.bincount(sample[in_all], minlength=n) == 0)[sample]
    sample, wid = sample[keep], wid[keep]
    # Drop the too-common words, except for a sample that has nothing else.
    common = np.bincount(wid, minlength=V)[wid] > max_share * n
    keep = ~common | (np.bincount(sample[~common], minlength=n) == 0)[sample]
    sample, wid = sample[keep], wid[keep]  # sorted by sample (_unique)
    start = np.concatenate([[0], np.cumsum(np.bincount(sample, minlength=n))]).astype(np.int64)
    return KeyWords(wid, start, words)


def _unique(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of int64 `x` and their counts (np.unique, by sorting: numpy 2.4's
    hash-based np.unique is much slower on millions of int64; measured:
    benchmarks/RESULTS.md#numbers-quoted-in-the-code)."""
    x = np.sort(x)
    first = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]]))
    return x[first], np.diff(np.append(first, len(x)))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The random sampler's order."""
    return np.random.default_rng([PERM, seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Mixture:
    """Weighted sources laid end to end in one sample list: source s holds sizes[s] samples."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise ValueError(f"Mixture: {len(self.sizes)} sizes but {len(self.weights)} weights")
        if min(self.sizes) < 1 or min(self.weights) < 0 or not sum(self.weights) > 0:
            raise ValueError(f"Mixture: sizes must be >= 1 and weights >= 0 with a positive sum: {self}")

    @property
    def offsets(self) -> np.ndarray:
        """Where each source starts in the sample list, and the end: int64 (sources + 1,)."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def draws(self) -> int:
        """Draws per epoch: the samples of the sources that are drawn at all (weight > 0)."""
        return sum(n for n, w in zip(self.sizes, self.weights, strict=True) if w > 0)

    @property
    def shares(self) -> np.ndarray:
        """Each source's probability per draw."""
        w = np.asarray(self.weights, np.float64)
        return w / w.sum()

    def source_of(self, index: np.ndarray) -> np.ndarray:
        """The source of each sample index."""
        return np.searchsorted(self.offsets, index, side="right") - 1

    def counts(self, index: np.ndarray) -> np.ndarray:
        """How many of `index` (an order, or part of one) come from each source: int64 (sources,)."""
        return np.bincount(self.source_of(index), minlength=len(self.sizes))


def mixture_order(mix: Mixture, seed: int, epoch: int) -> np.ndarray:
    """A mixture's epoch (module doc): `mix.draws` sample indices, each draw's source picked by
    weight, each source walked along fresh permutations of itself."""
    n, offsets = mix.draws, mix.offsets
    source = np.random.default_rng([MIX, seed, epoch]).choice(len(mix.sizes), size=n, p=mix.shares)
    order = np.empty(n, np.int64)
    for s, size in enumerate(mix.sizes):
        at = np.flatnonzero(source == s)  # the draws of source s, in epoch order
        walks = -(-len(at) // size)  # permutations needed (ceil)
        perms = [np.random.default_rng([MIX, seed, epoch, s, w]).permutation(size) for w in range(walks)]
        order[at] = offsets[s] + (np.concatenate(perms)[: len(at)] if perms else [])
    return order


def hard_negative_order(keys: KeyWords, seed: int, epoch: int, group: int) -> np.ndarray:
    """A permutation of the samples in which each run of `group` (the global batch) mostly
    shares a key word; the n % group samples at the end are the ones training drops."""
    n, rng = len(keys), np.random.default_rng([HARD, seed, epoch])
    count = np.diff(keys.start)
    # One key word per sample, uniformly among its own; samples without any form one more group.
    pick = keys.start[:-1] + (rng.random(n) * count).astype(np.int64)
    none = len(keys.vocab)
    key = np.full(n, none, np.int64)
    key[count > 0] = keys.ids[pick[count > 0]]
    word_rank = rng.permutation(none + 1)  # the order of the groups
    order = np.lexsort((rng.random(n), word_rank[key]))  # by group, at random within one
    # Shuffle the full batches, so the groups' order is no pattern over the epoch.
    full = n // group * group
    blocks = order[:full].reshape(-1, group)[rng.permutation(n // group)]  # (n // group, group)
    return np.concatenate([blocks.reshape(-1), order[full:]])


def shared_word_rate(keys: KeyWords, batches: list[np.ndarray]) -> float:
    """Share of sample pairs within a batch that have a key word in common, over all batches:
    how much harder a sampler's in-batch negatives are (a diagnostic, and what the tests check)."""
    hits = pairs = 0
    for b in batches:
        sets = [set(keys.ids[keys.start[i] : keys.start[i + 1]].tolist()) for i in b.tolist()]
        for x in range(len(sets)):
            hits += sum(1 for y in range(x + 1, len(sets)) if sets[x] & sets[y])
        pairs += len(sets) * (len(sets) - 1) // 2
    return hits / max(pairs, 1)


__all__ = [
    "SAMPLERS",
    "STOPWORDS",
    "KeyWords",
    "Mixture",
    "epoch_permutation",
    "hard_negative_order",
    "key_words",
    "mixture_order",
    "shared_word_rate",
]
