"""The built-in dataset's scenes: the shape and colour vocabulary, where objects go, and the
vectorized numpy renderer (see synthetic.py for the dataset as a whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARTS = ("train", "val", "test")  # each part of the dataset draws from its own seed
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


@dataclass
class Objects:
    """Parameters of one object per image, all arrays of length B; positions and r in pixels."""

    color: np.ndarray  # (B,) int, index into COLORS
    shape: np.ndarray  # (B,) int, index into SHAPES
    large: np.ndarray  # (B,) bool
    r: np.ndarray  # (B,) float32
    cx: np.ndarray  # (B,) float32, column of the centre
    cy: np.ndarray  # (B,) float32, row of the centre
    rgb: np.ndarray  # (B, 3) float32, jittered colour

    def take(self, idx: slice) -> Objects:
        return Objects(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


# ----------------------------------------------------------------------------- sampling


def part_rng(seed: int, part: str, stream: int) -> np.random.Generator:
    """An independent generator per (seed, part, stream): the SeedSequence spawn mechanism, so
    "train" and "val" never share a draw, and a single and a pair stream never correlate."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PARTS.index(part), stream)))


def _sample_kind(rng: np.random.Generator, n: int, S: int, classes: np.ndarray | None = None) -> Objects:
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
    return Objects(
        classes // len(SHAPES), classes % len(SHAPES), large, r.astype(np.float32), zeros, zeros.copy(), rgb
    )


def _reach(obj: Objects, S: int) -> np.ndarray:
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


def sample_single(rng: np.random.Generator, n: int, S: int) -> Objects:
    obj = _sample_kind(rng, n, S)
    reach = _reach(obj, S)
    # One of 9 zones (3 columns x 3 rows), uniformly: every position word is equally common.
    obj.cx = (_in_band(rng, rng.integers(0, 3, size=n), reach[:, 0], reach[:, 1]) * S).astype(np.float32)
    obj.cy = (_in_band(rng, rng.integers(0, 3, size=n), reach[:, 2], reach[:, 3]) * S).astype(np.float32)
    return obj


def sample_pair(rng: np.random.Generator, n: int, S: int) -> tuple[Objects, Objects, np.ndarray]:
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


def _grid_sizes(obj: Objects, grid: int) -> np.ndarray:
    """Fixed radii on a grid: a small object fills one cell, a large one a 2x2 block of cells."""
    return np.where(obj.large, _GRID_LARGE * grid, _GRID_SMALL * grid).astype(np.float32)


def _grid_coords(large: bool, S: int, grid: int) -> np.ndarray:
    """Allowed centre coordinates (px): cell centres for small objects, inner cell corners for large."""
    cells = S // grid
    return np.arange(1, cells) * float(grid) if large else (np.arange(cells) + 0.5) * grid


def sample_single_grid(rng: np.random.Generator, n: int, S: int, grid: int) -> Objects:
    obj = _sample_kind(rng, n, S)
    obj.r = _grid_sizes(obj, grid)
    for axis in ("cx", "cy"):
        small, large = _grid_coords(False, S, grid), _grid_coords(True, S, grid)
        pick_s = small[rng.integers(0, len(small), size=n)]
        pick_l = large[rng.integers(0, len(large), size=n)]
        setattr(obj, axis, np.where(obj.large, pick_l, pick_s).astype(np.float32))
    return obj


def sample_pair_grid(rng: np.random.Generator, n: int, S: int, grid: int):
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


def _coverage(obj: Objects, grid: np.ndarray) -> np.ndarray:
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


def _render(bg: np.ndarray, layers: list[Objects], rng: np.random.Generator, out: np.ndarray) -> None:
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


def render_all(rng: np.random.Generator, layers: list[Objects], S: int) -> np.ndarray:
    n = len(layers[0].r)
    bg = _backgrounds(rng, n)
    out = np.empty((n, S, S, 3), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (S * S))
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        _render(bg[sl], [o.take(sl) for o in layers], rng, out[sl])
    return out
