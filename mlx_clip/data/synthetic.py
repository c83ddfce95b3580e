"""The built-in dataset: coloured shapes on a plain background, with compositional captions.

`generate` renders everything in memory with vectorized numpy (no mlx, no torch, no PIL), so the
default training run needs no download and its result is reproducible bit for bit:

    data = generate(20_000, image_size=64, seed=0, part="train")   # a few seconds on a laptop CPU
    data.images    # (n, S, S, 3) uint8
    data.captions  # n lists of N_CAPTIONS strings, e.g. "a large red circle on the left"
    data.labels    # (n,) int32 index into CLASSNAMES (-1 for two-object images)
    generate(20_000, paraphrases=3).captions  # n lists of 3 complete paraphrases each

Zero-shot classification uses CLASSNAMES (6 colours x 4 shapes = 24 classes, chance 1/24 = 4.2%)
with the TEMPLATES prompt ensemble. Each `part` draws from its own derived seed, so the "val" images
are never the "train" images.

Splits:
  single  one object; captions vary colour, shape, size (small / large) and position.
  pair    two non-overlapping objects and their relation: "a small red circle left of a blue square".
  mixed   3 single images then 1 pair image, repeating (75% / 25%).

Captions: by default (`paraphrases=1`) each image has N_CAPTIONS phrasings of varying detail:
all name the colour and shape, some also the size and position ("a red circle.", "small red circle
in the top left"). `paraphrases=k` (2 <= k <= MAX_PARAPHRASES) writes k complete paraphrases
instead: different templates and word order, each naming every fact (size, colour, shape and
position; for pairs both objects with their sizes and the relation). Captions are drawn after
the pixels, so the images do not depend on `paraphrases`.

`write_dataset` (and `python -m mlx_clip.synthetic --out DIR --n 1000`) exports images + captions to
disk, to try the bring-your-own-data path with known-good data.
"""

from __future__ import annotations

import argparse
import csv
import struct
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BuiltinSplit

# Well separated in RGB: every colour has one channel <= 60 and one >= 140, so it stands out from both
# the dark and the light grey backgrounds, and the nearest-colour decision survives the jitter.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 195),
    "orange": (245, 140, 30),
}
SHAPES: list[str] = ["circle", "square", "triangle", "cross"]
# Class index = colour_idx * len(SHAPES) + shape_idx, matching `labels`.
CLASSNAMES: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
# Prompt ensemble for zero-shot; the caption templates below use the same phrasings, so prompts are
# in-distribution for the text tower (including the plain "a" before every colour, as "a {}." gives).
TEMPLATES: list[str] = [
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "a small {}.",
    "a large {}.",
]
SPLITS = typing.get_args(BuiltinSplit)
PARTS = ("train", "val", "test")
N_CAPTIONS = 5  # captions per image: the same count for every split, so batches can index uniformly

# Geometry, as fractions of the image side. r is an object's "radius": the half-extent of a circle,
# the half-length of a cross arm; square and triangle are scaled around it to a similar area.
_SIZE_RANGES = ((0.08, 0.12), (0.16, 0.20))  # (small, large); the gap makes the size word unambiguous
# How far each shape reaches from its centre, in units of r: (left, right, up, down). The triangle's
# centre is its centroid, so it reaches further up than down.
_REACH = np.array([[1.0] * 4, [0.85] * 4, [1.04, 1.04, 1.2, 0.6], [1.0] * 4], dtype=np.float32)
_MARGIN = 0.03  # free border around every object
_PAIR_GAP = 0.08  # free space between the two objects of a pair: > 2 px even at 32 px
# Position words come from the object centre: < 0.4 is left/top, > 0.6 is right/bottom. Centres are
# drawn from three bands that stay clear of those thresholds, so a word is never borderline.
_BANDS = ((None, 0.35), (0.45, 0.55), (0.65, None))
# On a grid (`generate(grid=g)`, g = the ViT's patch size) objects are centred on cells (small,
# radius 0.42 g: one cell) or on cell corners (large, 0.8 g: a 2x2 block), so every shape looks the
# same to the patch embedding wherever it is. A small ViT learns shapes from far fewer samples than
# with free placement, where each shape straddles patches at arbitrary offsets.
_GRID_SMALL, _GRID_LARGE = 0.42, 0.8
_COLOR_JITTER = 15  # per-object, per-channel uniform jitter of the RGB value
_NOISE = 4.0  # per-pixel uniform luminance noise, +-_NOISE grey levels
_CHUNK_PIXELS = 1 << 20  # pixels rendered at once: float32 planes of 4 MB, whatever the image size

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


@dataclass
class SyntheticData:
    """A generated dataset, aligned by index.

    images:   (n, S, S, 3) uint8, RGB.
    captions: n lists of distinct captions of the same image (N_CAPTIONS, or `paraphrases` if >= 2).
    labels:   (n,) int32 class index into CLASSNAMES; -1 for two-object ("pair") images.
    """

    images: np.ndarray
    captions: list[list[str]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class _Objects:
    """Parameters of one object per image, all arrays of length B; positions and r in pixels."""

    color: np.ndarray  # (B,) int, index into COLORS
    shape: np.ndarray  # (B,) int, index into SHAPES
    large: np.ndarray  # (B,) bool
    r: np.ndarray  # (B,) float32
    cx: np.ndarray  # (B,) float32, column of the centre
    cy: np.ndarray  # (B,) float32, row of the centre
    rgb: np.ndarray  # (B, 3) float32, jittered colour

    def take(self, idx: slice) -> _Objects:
        return _Objects(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


# ----------------------------------------------------------------------------- sampling


def _rng(seed: int, part: str, stream: int) -> np.random.Generator:
    """An independent generator per (seed, part, stream): the SeedSequence spawn mechanism, so
    "train" and "val" never share a draw, and a single and a pair stream never correlate."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PARTS.index(part), stream)))


def _sample_kind(rng: np.random.Generator, n: int, S: int, classes: np.ndarray | None = None) -> _Objects:
    """Colour, shape, size and jittered RGB for n objects (centres are filled in by the caller)."""
    if classes is None:
        classes = rng.integers(0, len(CLASSNAMES), size=n)
    large = rng.random(n) < 0.5
    lo = np.where(large, _SIZE_RANGES[1][0], _SIZE_RANGES[0][0])
    hi = np.where(large, _SIZE_RANGES[1][1], _SIZE_RANGES[0][1])
    r = (lo + (hi - lo) * rng.random(n)) * S
    base = np.array(list(COLORS.values()), dtype=np.float32)[classes // len(SHAPES)]
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=(n, 3))
    rgb = np.clip(base + jitter, 0, 255).astype(np.float32)
    zeros = np.zeros(n, dtype=np.float32)
    return _Objects(
        classes // len(SHAPES), classes % len(SHAPES), large, r.astype(np.float32), zeros, zeros.copy(), rgb
    )


def _reach(obj: _Objects, S: int) -> np.ndarray:
    """(B, 4) reach of each object (left, right, up, down) as fractions of S."""
    return _REACH[obj.shape] * (obj.r / S)[:, None]


def _in_band(
    rng: np.random.Generator, band: np.ndarray, reach_lo: np.ndarray, reach_hi: np.ndarray
) -> np.ndarray:
    """(B,) centre coordinates (fractions of S) inside band 0/1/2 (low/middle/high); the outer edges
    of the low and high bands are where the object, reaching reach_lo / reach_hi, meets the margin."""
    fit_lo, fit_hi = _MARGIN + reach_lo, 1.0 - _MARGIN - reach_hi
    lo = np.select([band == 0, band == 1], [fit_lo, _BANDS[1][0]], _BANDS[2][0])
    hi = np.select([band == 0, band == 1], [_BANDS[0][1], _BANDS[1][1]], fit_hi)
    return lo + (hi - lo) * rng.random(len(band))


def _sample_single(rng: np.random.Generator, n: int, S: int) -> _Objects:
    obj = _sample_kind(rng, n, S)
    reach = _reach(obj, S)
    # One of 9 zones (3 columns x 3 rows), uniformly: every position word is equally common.
    obj.cx = (_in_band(rng, rng.integers(0, 3, size=n), reach[:, 0], reach[:, 1]) * S).astype(np.float32)
    obj.cy = (_in_band(rng, rng.integers(0, 3, size=n), reach[:, 2], reach[:, 3]) * S).astype(np.float32)
    return obj


def _sample_pair(rng: np.random.Generator, n: int, S: int) -> tuple[_Objects, _Objects, np.ndarray]:
    """Two objects per image, a before b along the relation axis (a is left of / above b).

    Returns (a, b, vertical) with vertical (n,) bool: True for above/below, False for left/right.
    The two differ in colour or shape (never the same class), so every caption names each one.
    """
    ca = rng.integers(0, len(CLASSNAMES), size=n)
    cb = (ca + rng.integers(1, len(CLASSNAMES), size=n)) % len(CLASSNAMES)
    a, b = _sample_kind(rng, n, S, ca), _sample_kind(rng, n, S, cb)
    vertical = rng.random(n) < 0.5
    # Reorder reaches to (along-, along+, across-, across+) of each image's relation axis.
    order = np.where(vertical[:, None], [2, 3, 0, 1], [0, 1, 2, 3])
    ea, eb = np.take_along_axis(_reach(a, S), order, 1), np.take_along_axis(_reach(b, S), order, 1)
    # Along the axis: margin, a, gap, b, margin; the leftover slack is split at random into three
    # pieces (before a, between, after b). The size ranges keep slack >= 0.028 for any two shapes.
    slack = 1.0 - 2 * _MARGIN - ea[:, 0] - ea[:, 1] - eb[:, 0] - eb[:, 1] - _PAIR_GAP
    cuts = np.sort(rng.random((n, 2)), axis=1) * slack[:, None]
    pa = _MARGIN + ea[:, 0] + cuts[:, 0]
    pb = pa + ea[:, 1] + _PAIR_GAP + (cuts[:, 1] - cuts[:, 0]) + eb[:, 0]
    # Across the axis: free, but the offset stays below 0.6x the along-axis distance, so the
    # relation is the obvious reading of the picture (clipping toward a then into frame keeps it so).
    lo_a, hi_a = _MARGIN + ea[:, 2], 1.0 - _MARGIN - ea[:, 3]
    lo_b, hi_b = _MARGIN + eb[:, 2], 1.0 - _MARGIN - eb[:, 3]
    qa = lo_a + (hi_a - lo_a) * rng.random(n)
    qb = lo_b + (hi_b - lo_b) * rng.random(n)
    lim = 0.6 * (pb - pa)
    qb = np.clip(qa + np.clip(qb - qa, -lim, lim), lo_b, hi_b)
    a.cx, a.cy = (
        (np.where(vertical, qa, pa) * S).astype(np.float32),
        (np.where(vertical, pa, qa) * S).astype(np.float32),
    )
    b.cx, b.cy = (
        (np.where(vertical, qb, pb) * S).astype(np.float32),
        (np.where(vertical, pb, qb) * S).astype(np.float32),
    )
    return a, b, vertical


def _grid_sizes(obj: _Objects, grid: int) -> np.ndarray:
    """Fixed radii on a grid: a small object fills one cell, a large one a 2x2 block of cells."""
    return np.where(obj.large, _GRID_LARGE * grid, _GRID_SMALL * grid).astype(np.float32)


def _grid_coords(large: bool, S: int, grid: int) -> np.ndarray:
    """Allowed centre coordinates (px): cell centres for small objects, inner cell corners for large."""
    cells = S // grid
    return np.arange(1, cells) * float(grid) if large else (np.arange(cells) + 0.5) * grid


def _sample_single_grid(rng: np.random.Generator, n: int, S: int, grid: int) -> _Objects:
    obj = _sample_kind(rng, n, S)
    obj.r = _grid_sizes(obj, grid)
    for axis in ("cx", "cy"):
        small, large = _grid_coords(False, S, grid), _grid_coords(True, S, grid)
        pick_s = small[rng.integers(0, len(small), size=n)]
        pick_l = large[rng.integers(0, len(large), size=n)]
        setattr(obj, axis, np.where(obj.large, pick_l, pick_s).astype(np.float32))
    return obj


def _sample_pair_grid(rng: np.random.Generator, n: int, S: int, grid: int):
    """Pairs on the grid: a before b along the relation axis with at least one free cell between
    their extents, and a cross-axis offset below 0.6x the along-axis distance (as off the grid)."""
    ca = rng.integers(0, len(CLASSNAMES), size=n)
    cb = (ca + rng.integers(1, len(CLASSNAMES), size=n)) % len(CLASSNAMES)
    a, b = _sample_kind(rng, n, S, ca), _sample_kind(rng, n, S, cb)
    a.r, b.r = _grid_sizes(a, grid), _grid_sizes(b, grid)
    vertical = rng.random(n) < 0.5
    along = np.zeros((2, n), np.float32)
    across = np.zeros((2, n), np.float32)
    for i in range(n):
        ext_a = grid * (1.0 if a.large[i] else 0.5)  # half-extent of the object's cell block
        ext_b = grid * (1.0 if b.large[i] else 0.5)
        ca_, cb_ = _grid_coords(bool(a.large[i]), S, grid), _grid_coords(bool(b.large[i]), S, grid)
        # all (pa, pb) with b's block starting at least one cell after a's block ends
        pa, pb = np.meshgrid(ca_, cb_, indexing="ij")
        ok = np.argwhere(pb - ext_b >= pa + ext_a + grid)
        j, k = ok[rng.integers(0, len(ok))]
        along[:, i] = ca_[j], cb_[k]
        lim = 0.6 * (along[1, i] - along[0, i])
        qa = ca_[rng.integers(0, len(ca_))]
        cands = cb_[np.abs(cb_ - qa) <= lim]
        across[:, i] = qa, cands[rng.integers(0, len(cands))]
    a.cx, a.cy = np.where(vertical, across[0], along[0]), np.where(vertical, along[0], across[0])
    b.cx, b.cy = np.where(vertical, across[1], along[1]), np.where(vertical, along[1], across[1])
    for o in (a, b):
        o.cx, o.cy = o.cx.astype(np.float32), o.cy.astype(np.float32)
    return a, b, vertical


# ----------------------------------------------------------------------------- rendering

_S3 = np.float32(np.sqrt(3) / 2)


def _sdf(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) of shape `shape` centred at the origin.

    dx: (B, 1, S) column offsets, dy: (B, S, 1) row offsets, r: (B, 1, 1); returns (B, S, S).
    Intersections use max and unions min of half-plane / box distances: exact on the edges, which
    is all the one-pixel anti-aliasing ramp needs.
    """
    name = SHAPES[shape]
    if name == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if name == "triangle":
        # Equilateral, pointing up, circumradius 1.2 r, centroid at the centre (so the position words
        # and the visual centre agree). Outward edge normals: down, up-left, up-right; inradius 0.6 r.
        adx = np.abs(dx)  # symmetric about the vertical axis: the two slanted edges fold into one
        return np.maximum(dy, _S3 * adx - 0.5 * dy) - 0.6 * r
    if name == "cross":
        # Union of a horizontal and a vertical bar, arm half-length r, half-thickness 0.38 r.
        adx, ady, t = np.abs(dx), np.abs(dy), 0.38 * r
        return np.minimum(np.maximum(adx - r, ady - t), np.maximum(adx - t, ady - r))
    raise ValueError(name)


def _coverage(obj: _Objects, grid: np.ndarray) -> np.ndarray:
    """(B, S, S) float32 in [0, 1]: how much of each pixel the object covers."""
    B, S = len(obj.r), len(grid)
    sd = np.empty((B, S, S), dtype=np.float32)
    # Group by shape so each image evaluates only its own distance function.
    for k in range(len(SHAPES)):
        sel = np.flatnonzero(obj.shape == k)
        if sel.size:
            dx = grid[None, None, :] - obj.cx[sel, None, None]  # (b, 1, S)
            dy = grid[None, :, None] - obj.cy[sel, None, None]  # (b, S, 1)
            sd[sel] = _sdf(k, dx, dy, obj.r[sel, None, None])
    # Coverage ramps from 1 to 0 across the one pixel around the edge: cheap anti-aliasing.
    return np.clip(np.subtract(0.5, sd, out=sd), 0.0, 1.0, out=sd)


def _render(bg: np.ndarray, layers: list[_Objects], rng: np.random.Generator, out: np.ndarray) -> None:
    """Composite the objects of `layers` over grey levels `bg` (B,) into `out` (B, S, S, 3) uint8.

    The objects never overlap (pairs keep a gap wider than the anti-aliasing ramp), so each adds
    alpha * (rgb - bg) to the background. Work goes one colour plane at a time: (B, S, S) arrays
    with contiguous rows are several times faster in numpy than broadcasting over a last axis of 3.
    """
    B, S = out.shape[:2]
    grid = np.arange(S, dtype=np.float32) + 0.5  # pixel centres
    alphas = [_coverage(obj, grid) for obj in layers]
    # Background plus uniform luminance noise shared by the three channels; it lies on the objects
    # too, so it is no cue to where they are. The + 0.5 rounds to nearest in the truncating cast.
    base = rng.random((B, S, S), dtype=np.float32)
    base *= 2 * _NOISE
    base += (bg + (0.5 - _NOISE))[:, None, None]
    plane, tmp = np.empty_like(base), np.empty_like(base)
    for c in range(3):
        plane[:] = base
        for obj, alpha in zip(layers, alphas, strict=True):
            plane += np.multiply(alpha, (obj.rgb[:, c] - bg)[:, None, None], out=tmp)
        out[..., c] = np.clip(plane, 0, 255, out=plane)  # strided store, cast to uint8


def _backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Half dark grey (25..70), half light grey (165..215): colour, not brightness, names a class."""
    dark = rng.random(n) < 0.5
    return np.where(dark, rng.uniform(25, 70, n), rng.uniform(165, 215, n)).astype(np.float32)


def _render_all(rng: np.random.Generator, layers: list[_Objects], S: int) -> np.ndarray:
    n = len(layers[0].r)
    bg = _backgrounds(rng, n)
    out = np.empty((n, S, S, 3), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (S * S))
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        _render(bg[sl], [o.take(sl) for o in layers], rng, out[sl])
    return out


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


def _single_paraphrases(rng: np.random.Generator, obj: _Objects, S: int, k: int) -> list[list[str]]:
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


def _pair_paraphrases(
    rng: np.random.Generator, a: _Objects, b: _Objects, vertical: np.ndarray, k: int
) -> list[list[str]]:
    n = len(a.r)
    picks = _pick_templates(rng, n, len(_PAIR_PARAPHRASES), k)
    synonym = rng.integers(0, 2, size=(n, k, 2))  # per caption and object: "large" or "big"
    colors, out = list(COLORS), []

    def describe(o: _Objects, i: int, syn: int) -> str:
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


def _single_captions(rng: np.random.Generator, obj: _Objects, S: int) -> list[list[str]]:
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


def _pair_captions(
    rng: np.random.Generator, a: _Objects, b: _Objects, vertical: np.ndarray
) -> list[list[str]]:
    n = len(a.r)
    picks = _pick_templates(rng, n, len(_PAIR_TEMPLATES))
    # Per caption and per object: whether the size word is said, and which synonym.
    say_size = rng.random((n, N_CAPTIONS, 2)) < 0.5
    synonym = rng.integers(0, 2, size=(n, N_CAPTIONS, 2))
    colors, out = list(COLORS), []

    def describe(o: _Objects, i: int, j: int, k: int) -> str:
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


# ----------------------------------------------------------------------------- public API


def _generate_single(
    n: int, S: int, seed: int, part: str, grid: int = 0, paraphrases: int = 1
) -> SyntheticData:
    rng = _rng(seed, part, 0)
    obj = _sample_single_grid(rng, n, S, grid) if grid else _sample_single(rng, n, S)
    images = _render_all(rng, [obj], S)
    labels = (obj.color * len(SHAPES) + obj.shape).astype(np.int32)
    # Captions are drawn last from the stream, so the pixels never depend on `paraphrases`.
    if paraphrases > 1:
        captions = _single_paraphrases(rng, obj, S, paraphrases)
    else:
        captions = _single_captions(rng, obj, S)
    return SyntheticData(images, captions, labels)


def _generate_pair(
    n: int, S: int, seed: int, part: str, grid: int = 0, paraphrases: int = 1
) -> SyntheticData:
    rng = _rng(seed, part, 1)
    a, b, vertical = _sample_pair_grid(rng, n, S, grid) if grid else _sample_pair(rng, n, S)
    images = _render_all(rng, [a, b], S)
    if paraphrases > 1:
        captions = _pair_paraphrases(rng, a, b, vertical, paraphrases)
    else:
        captions = _pair_captions(rng, a, b, vertical)
    return SyntheticData(images, captions, np.full(n, -1, dtype=np.int32))


def generate(
    n: int,
    image_size: int = 64,
    seed: int = 0,
    part: str = "train",
    split: str = "single",
    grid: int = 0,
    paraphrases: int = 1,
) -> SyntheticData:
    """Render n captioned images of coloured shapes.

    n:          number of images.
    image_size: side S of the square images (>= 16; 32 and up keeps small shapes recognizable).
    seed:       base seed (>= 0). Same arguments give bit-identical images and captions.
    part:       "train", "val" or "test": each part has its own derived seed, so parts never share
                images. Evaluate zero-shot on part="val", split="single".
    split:      "single" (one object, labelled), "pair" (two objects and their relation, label -1),
                or "mixed" (every 4th image is a pair: 75% single / 25% pair).
    grid:       0 places objects freely; g > 0 (a ViT's patch size) snaps them to a g-pixel grid with
                fixed sizes (one cell small, 2x2 cells large), which small ViTs learn much faster.
    paraphrases: 1 gives the N_CAPTIONS captions of varying detail; k in [2, MAX_PARAPHRASES] gives
                k complete paraphrases per image instead (same facts, different templates and word
                order). The images are the same for any value.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if n < 0 or image_size < 16 or seed < 0:
        raise ValueError(f"need n >= 0, image_size >= 16, seed >= 0; got {n}, {image_size}, {seed}")
    if grid < 0 or (grid and image_size // grid < 5):
        raise ValueError(f"grid must be 0 or leave at least 5 cells per side; got {grid} at {image_size}px")
    if not isinstance(paraphrases, (int, np.integer)) or not 1 <= paraphrases <= MAX_PARAPHRASES:
        raise ValueError(
            f"paraphrases (data.builtin_paraphrases) must be an int in [1, {MAX_PARAPHRASES}], "
            f"got {paraphrases!r}"
        )
    if split == "single":
        return _generate_single(n, image_size, seed, part, grid, paraphrases)
    if split == "pair":
        return _generate_pair(n, image_size, seed, part, grid, paraphrases)
    # mixed: the single and pair streams are generated whole, then interleaved by index.
    is_pair = np.arange(n) % 4 == 3
    single = _generate_single(int((~is_pair).sum()), image_size, seed, part, grid, paraphrases)
    pair = _generate_pair(int(is_pair.sum()), image_size, seed, part, grid, paraphrases)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    images[~is_pair], images[is_pair] = single.images, pair.images
    labels = np.full(n, -1, dtype=np.int32)
    labels[~is_pair] = single.labels
    it_single, it_pair = iter(single.captions), iter(pair.captions)
    captions = [next(it_pair) if p else next(it_single) for p in is_pair]
    return SyntheticData(images, captions, labels)


# ----------------------------------------------------------------------------- export


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as an RGB PNG with the standard library: lossless, and the
    export needs no imaging package."""
    h, w, _ = image.shape
    # Every scanline is prefixed by its filter type, 0 (none).
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 = RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _save_image(image: np.ndarray, path: Path) -> None:
    if path.suffix == ".png":
        path.write_bytes(_png_bytes(image))
    else:  # JPEG needs an encoder; Pillow is a project dependency but only this path imports it
        from PIL import Image

        Image.fromarray(image).save(path, quality=95)


def write_dataset(
    out_dir: str | Path,
    n: int,
    image_size: int = 64,
    seed: int = 0,
    split: str = "single",
    fmt: str = "csv",
    part: str = "train",
    image_format: str = "png",
) -> Path:
    """Generate a dataset and write it to disk in one of the layouts users bring their own data in.

    fmt="csv":    out_dir/images/000000.png ... and out_dir/captions.csv with columns image,caption
                  (image paths relative to the CSV; one row per image, its first caption).
                  Returns the CSV path.
    fmt="folder": out_dir/000000.png with out_dir/000000.txt beside it, one caption per line (all
                  N_CAPTIONS). Returns out_dir.
    image_format: "png" (lossless, standard library) or "jpg" (needs Pillow).
    """
    if fmt not in ("csv", "folder"):
        raise ValueError(f"fmt must be 'csv' or 'folder', got {fmt!r}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    data = generate(n, image_size=image_size, seed=seed, part=part, split=split)
    out = Path(out_dir)
    image_dir = out / "images" if fmt == "csv" else out
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caps) in enumerate(zip(data.images, data.captions, strict=True)):
        name = f"{i:06d}.{image_format}"
        _save_image(image, image_dir / name)
        if fmt == "folder":
            (image_dir / f"{i:06d}.txt").write_text("\n".join(caps) + "\n")
        else:
            rows.append((f"images/{name}", caps[0]))
    if fmt == "folder":
        return out
    csv_path = out / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m mlx_clip.synthetic", description="Write the built-in shapes dataset to disk."
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--split", choices=SPLITS, default="single")
    p.add_argument("--part", choices=PARTS, default="train")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", dest="fmt", choices=("csv", "folder"), default="csv")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    args = p.parse_args(argv)
    path = write_dataset(
        args.out, args.n, args.image_size, args.seed, args.split, args.fmt, args.part, args.image_format
    )
    print(f"wrote {args.n} {args.split} images ({args.part}) to {path}")
    return path


if __name__ == "__main__":
    main()
