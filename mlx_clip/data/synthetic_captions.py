"""The built-in dataset's captions: templates, complete paraphrases and the zero-shot prompt
ensemble, filled in from the facts of each rendered scene (synthetic_scene.py).
"""

from __future__ import annotations

import numpy as np

from .synthetic_scene import COLORS, SHAPES, Objects

N_CAPTIONS = 5  # captions per image: the same count for every split, so batches can index uniformly
TEMPLATES: list[str] = [
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "a small {}.",
    "a large {}.",
]
_SINGLE_TEMPLATES = (
    "a {color} {shape}.",
    "a photo of a {color} {shape}.",
    "a {size} {color} {shape}.",
    "a picture of a {size} {color} {shape} {pos}.",
    "a {color} {shape} {pos}",
    "{size} {color} {shape} {pos}",
    "a photo of a {size} {color} {shape} {pos}",
    "there is a {color} {shape} {pos}.",
)
# {a} is the left / upper object; {rel} is its relation to {b}, {inv} the converse.
_PAIR_TEMPLATES = (
    "a {a} {rel} a {b}.",
    "a {b} {inv} a {a}.",
    "a photo of a {a} {rel} a {b}",
    "a picture of a {b} {inv} a {a}.",
    "there is a {a} {rel} a {b}",
    "{b} {inv} {a}",
)
_SIZE_WORDS = (("small",), ("large", "big"))
# Complete paraphrases (`paraphrases` >= 2): every template states every fact, in its own word order.
_SINGLE_PARAPHRASES = (
    "a {size} {color} {shape} {pos}.",
    "a photo of a {size} {color} {shape} {pos}.",
    "{pos}, a {size} {color} {shape}.",
    "there is a {size} {color} {shape} {pos}.",
    "{pos} there is a {size} {color} {shape}.",
    "a {color} {shape}, {size}, {pos}.",
    "the {color} {shape} {pos} is {size}.",
    "a picture of a {size} {color} {shape} {pos}.",
    "{size} {color} {shape} {pos}",
    "a {size} {shape} coloured {color}, {pos}.",
)
# {a} and {b} carry their size words; {a} is the left / upper object, as in _PAIR_TEMPLATES.
_PAIR_PARAPHRASES = (
    "a {a} {rel} a {b}.",
    "a {b} {inv} a {a}.",
    "a photo of a {a} {rel} a {b}.",
    "a picture of a {b} {inv} a {a}.",
    "there is a {a} {rel} a {b}.",
    "there is a {b} {inv} a {a}.",
    "the {a} is {rel} the {b}.",
    "the {b} is {inv} the {a}.",
    "{a} {rel} {b}",
    "{b} {inv} {a}",
)
MAX_PARAPHRASES = min(len(_SINGLE_PARAPHRASES), len(_PAIR_PARAPHRASES))


# ----------------------------------------------------------------------------- captions


def _position_phrase(cx: float, cy: float, S: int) -> str:
    """The true position of a centre: "on the left", "at the top", "in the top left", "in the center"."""
    h = "left" if cx < 0.4 * S else "right" if cx > 0.6 * S else None
    v = "top" if cy < 0.4 * S else "bottom" if cy > 0.6 * S else None
    if h and v:
        return f"in the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the center"


def _pick_templates(rng: np.random.Generator, n: int, n_templates: int, k: int = N_CAPTIONS) -> np.ndarray:
    """(n, k) distinct template indices per row: a random permutation prefix per image."""
    return np.argsort(rng.random((n, n_templates)), axis=1)[:, :k]


def single_paraphrases(rng: np.random.Generator, obj: Objects, S: int, k: int) -> list[list[str]]:
    """k complete paraphrases per image: distinct templates, so the k strings differ."""
    n = len(obj.r)
    picks = _pick_templates(rng, n, len(_SINGLE_PARAPHRASES), k)
    synonym = rng.integers(0, 2, size=(n, k))  # "large" or "big", per caption
    colors, out = list(COLORS), []
    for i in range(n):
        words = _SIZE_WORDS[int(obj.large[i])]
        facts = dict(
            color=colors[obj.color[i]],
            shape=SHAPES[obj.shape[i]],
            pos=_position_phrase(float(obj.cx[i]), float(obj.cy[i]), S),
        )
        out.append(
            [
                _SINGLE_PARAPHRASES[t].format(size=words[synonym[i, j] % len(words)], **facts)
                for j, t in enumerate(picks[i])
            ]
        )
    return out


def pair_paraphrases(
    rng: np.random.Generator, a: Objects, b: Objects, vertical: np.ndarray, k: int
) -> list[list[str]]:
    n = len(a.r)
    picks = _pick_templates(rng, n, len(_PAIR_PARAPHRASES), k)
    synonym = rng.integers(0, 2, size=(n, k, 2))  # per caption and object: "large" or "big"
    colors, out = list(COLORS), []

    def describe(o: Objects, i: int, syn: int) -> str:
        words = _SIZE_WORDS[int(o.large[i])]
        return f"{words[syn % len(words)]} {colors[o.color[i]]} {SHAPES[o.shape[i]]}"

    for i in range(n):
        rel, inv = ("above", "below") if vertical[i] else ("left of", "right of")
        out.append(
            [
                _PAIR_PARAPHRASES[t].format(
                    a=describe(a, i, synonym[i, j, 0]), b=describe(b, i, synonym[i, j, 1]), rel=rel, inv=inv
                )
                for j, t in enumerate(picks[i])
            ]
        )
    return out


def single_captions(rng: np.random.Generator, obj: Objects, S: int) -> list[list[str]]:
    n = len(obj.r)
    picks = _pick_templates(rng, n, len(_SINGLE_TEMPLATES))
    synonym = rng.integers(0, 2, size=(n, N_CAPTIONS))  # "large" or "big", per caption
    colors, out = list(COLORS), []
    for i in range(n):
        words = _SIZE_WORDS[int(obj.large[i])]
        pos = _position_phrase(float(obj.cx[i]), float(obj.cy[i]), S)
        color, shape = colors[obj.color[i]], SHAPES[obj.shape[i]]
        out.append(
            [
                _SINGLE_TEMPLATES[t].format(
                    size=words[synonym[i, j] % len(words)], color=color, shape=shape, pos=pos
                )
                for j, t in enumerate(picks[i])
            ]
        )
    return out


def pair_captions(rng: np.random.Generator, a: Objects, b: Objects, vertical: np.ndarray) -> list[list[str]]:
    n = len(a.r)
    picks = _pick_templates(rng, n, len(_PAIR_TEMPLATES))
    # Per caption and per object: whether the size word is said, and which synonym.
    say_size = rng.random((n, N_CAPTIONS, 2)) < 0.5
    synonym = rng.integers(0, 2, size=(n, N_CAPTIONS, 2))
    colors, out = list(COLORS), []

    def describe(o: Objects, i: int, j: int, k: int) -> str:
        noun = f"{colors[o.color[i]]} {SHAPES[o.shape[i]]}"
        if not say_size[i, j, k]:
            return noun
        words = _SIZE_WORDS[int(o.large[i])]
        return f"{words[synonym[i, j, k] % len(words)]} {noun}"

    for i in range(n):
        rel, inv = ("above", "below") if vertical[i] else ("left of", "right of")
        out.append(
            [
                _PAIR_TEMPLATES[t].format(a=describe(a, i, j, 0), b=describe(b, i, j, 1), rel=rel, inv=inv)
                for j, t in enumerate(picks[i])
            ]
        )
    return out
