"""Epoch orders for training: a plain shuffle, or hard-negative batches of related captions.

Both are pure functions of (seed, epoch) that return a permutation of the n samples; the Loader
cuts it into global batches of g = batch_size * world_size consecutive indices and gives each
rank a contiguous slice, so sharding, dropping the last partial batch and `start_batch` resume
work the same way for either order.

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
# First words of the seed sequences of the two orders (data.py's per-sample streams use 2 and 3).
PERM, HARD = 1, 4
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
    "epoch_permutation",
    "hard_negative_order",
    "key_words",
    "shared_word_rate",
]
