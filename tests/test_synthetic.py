"""The built-in dataset: deterministic, disjoint parts, and captions that tell the truth about pixels.

The pixel checks find objects from the images alone (pixels far from the background colour), so
they test the rendering against the captions rather than the generator against itself.
"""

import csv
import hashlib
import json
import re

import numpy as np
import pytest

from mlx_clip.data import synthetic
from mlx_clip.data.synthetic import generate, write_dataset
from mlx_clip.data.synthetic_captions import MAX_PARAPHRASES, N_CAPTIONS, TEMPLATES
from mlx_clip.data.synthetic_scene import CLASSNAMES, COLORS, SHAPES

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
RELATIONS = ("left of", "right of", "above", "below")


def object_mask(image: np.ndarray) -> np.ndarray:
    """(S, S) bool: pixels clearly unlike the background, read from the top-left corner."""
    diff = np.abs(image.astype(np.int16) - image[0, 0].astype(np.int16)).max(-1)
    return diff > 50


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a mask, in pixel units with pixel centres at +0.5 (the generator's convention)."""
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def nearest_color(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and the distance to it, for (..., 3) pixels."""
    d = np.linalg.norm(pixels[..., None, :].astype(np.float32) - PALETTE, axis=-1)  # (..., 6)
    return d.argmin(-1), d.min(-1)


def read_image(path) -> np.ndarray:
    """Decode with an independent reader: Pillow if installed, else mlx-data (stb_image)."""
    try:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:
        dx = pytest.importorskip("mlx.data")
        return dx.buffer_from_vector([{"file": str(path).encode()}]).load_image("file")[0]["file"]


# Every property below must hold with free placement, on an 8-pixel grid, and for the complete
# paraphrases of `paraphrases=3` (data.builtin_paraphrases: 3).
VARIANTS = dict(params=[(0, 1), (8, 1), (8, 3)], ids=["free", "grid8", "grid8-paraphrases3"])


@pytest.fixture(scope="module", **VARIANTS)
def single(request):
    grid, k = request.param
    return generate(240, image_size=64, seed=3, part="val", split="single", grid=grid, paraphrases=k)


@pytest.fixture(scope="module", **VARIANTS)
def pair(request):
    grid, k = request.param
    return generate(160, image_size=64, seed=3, part="val", split="pair", grid=grid, paraphrases=k)


def test_grid_objects_sit_on_cells():
    """On a grid, a small object stays inside one cell and a large one inside a 2x2 block."""
    g = 8
    data = generate(120, image_size=48, seed=1, split="single", grid=g)
    for image in data.images:
        ys, xs = np.nonzero(object_mask(image))
        large = len(xs) > g * g  # a small object covers at most ~0.7 of a cell
        cells = 2 if large else 1
        assert xs.max() // g - xs.min() // g < cells and ys.max() // g - ys.min() // g < cells + (
            1 if large else 0
        )
    with pytest.raises(ValueError, match="grid"):
        generate(2, image_size=32, grid=8)


def test_vocabulary():
    assert len(COLORS) == 6 and len(SHAPES) == 4
    assert len(CLASSNAMES) == len(set(CLASSNAMES)) == 24
    assert 1 / len(CLASSNAMES) <= 0.05  # zero-shot chance
    # labels index CLASSNAMES as colour_idx * n_shapes + shape_idx
    assert CLASSNAMES[2 * len(SHAPES) + 1] == f"{list(COLORS)[2]} {SHAPES[1]}"
    assert len(TEMPLATES) >= 3 and all(t.count("{}") == 1 for t in TEMPLATES)


@pytest.mark.parametrize("split", ["single", "pair", "mixed"])
@pytest.mark.parametrize("size", [32, 48])
def test_shapes_and_dtypes(split, size):
    d = generate(9, image_size=size, seed=1, split=split)
    assert d.images.shape == (9, size, size, 3) and d.images.dtype == np.uint8
    assert d.labels.shape == (9,) and d.labels.dtype == np.int32
    assert len(d) == len(d.captions) == 9
    for caps in d.captions:
        assert len(caps) == N_CAPTIONS == len(set(caps)) and all(isinstance(c, str) and c for c in caps)
    # Images are not blank: each has object pixels and a background.
    assert all(0 < object_mask(im).mean() < 0.5 for im in d.images)


def test_large_image_size():
    d = generate(2, image_size=224, seed=0)
    assert d.images.shape == (2, 224, 224, 3)
    x, y = centroid(object_mask(d.images[0]))
    assert nearest_color(d.images[0, int(y), int(x)])[0] == d.labels[0] // len(SHAPES)


@pytest.mark.parametrize("split", ["single", "pair", "mixed"])
def test_deterministic(split):
    a = generate(24, seed=7, split=split)
    b = generate(24, seed=7, split=split)
    c = generate(24, seed=8, split=split)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions


def test_train_val_disjoint():
    train = generate(400, seed=0, part="train")
    val = generate(400, seed=0, part="val")
    seen = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in seen for im in val.images)
    # ...and held-out covers every class, so zero-shot accuracy is over all 24.
    assert set(val.labels.tolist()) == set(range(24))


def test_single_captions_name_the_label(single):
    for label, caps in zip(single.labels, single.captions, strict=True):
        color, shape = CLASSNAMES[label].split()
        for cap in caps:
            words = re.findall(r"[a-z]+", cap)
            assert color in words and shape in words, cap
            # no other colour or shape is mentioned
            assert not (set(words) & (set(COLORS) | set(SHAPES))) - {color, shape}, cap


def test_prompts_are_in_distribution(single):
    if len(single.captions[0]) != N_CAPTIONS:
        pytest.skip("complete paraphrases always say size and position; the plain prompt is not one")
    # The plainest prompt, "a {classname}.", is itself one of the caption phrasings.
    captions = {c for caps in single.captions for c in caps}
    assert sum(TEMPLATES[0].format(name) in captions for name in CLASSNAMES) >= 20


def test_object_centre_has_the_named_colour(single):
    for image, label in zip(single.images[:40], single.labels[:40], strict=True):
        x, y = centroid(object_mask(image))
        idx, dist = nearest_color(image[int(y), int(x)])
        assert idx == label // len(SHAPES) and dist < 40, (CLASSNAMES[label], image[int(y), int(x)])


def test_position_words_are_true(single):
    S = single.images.shape[1]
    checked = 0
    for image, caps in zip(single.images, single.captions, strict=True):
        x, y = np.array(centroid(object_mask(image))) / S
        for cap in caps:
            words = set(re.findall(r"[a-z]+", cap))
            if not words & {"left", "right", "top", "bottom", "center"}:
                continue
            checked += 1
            assert ("left" in words) == (x < 0.4) and ("right" in words) == (x > 0.6), (cap, x)
            assert ("top" in words) == (y < 0.4) and ("bottom" in words) == (y > 0.6), (cap, y)
            assert ("center" in words) == (0.4 <= x <= 0.6 and 0.4 <= y <= 0.6), (cap, x, y)
    assert checked > len(single)  # most images carry several positional captions


def test_size_words_are_true(single):
    # Per shape, every object called small is smaller (in pixels) than every object called large.
    areas = {(s, w): [] for s in SHAPES for w in ("small", "large")}
    for image, label, caps in zip(single.images, single.labels, single.captions, strict=True):
        words = set(re.findall(r"[a-z]+", " ".join(caps)))
        size = "small" if "small" in words else "large" if words & {"large", "big"} else None
        assert not ({"small"} <= words and words & {"large", "big"})
        if size:
            areas[(SHAPES[label % len(SHAPES)], size)].append(object_mask(image).sum())
    for shape in SHAPES:
        small, large = areas[(shape, "small")], areas[(shape, "large")]
        assert small and large and max(small) < min(large), shape


def test_pair_captions(pair):
    assert (pair.labels == -1).all()
    for caps in pair.captions:
        for cap in caps:
            words = re.findall(r"[a-z]+", cap)
            assert sum(w in COLORS for w in words) == 2 and sum(w in SHAPES for w in words) == 2, cap
            assert sum(r in cap for r in RELATIONS) == 1, cap


def test_pair_relations_are_true(pair):
    checked = 0
    for image, caps in zip(pair.images, pair.captions, strict=True):
        idx, dist = nearest_color(image)
        solid = object_mask(image) & (dist < 45)  # object pixels away from anti-aliased edges
        for cap in caps:
            first, second = [w for w in re.findall(r"[a-z]+", cap) if w in COLORS]
            if first == second:
                continue  # same colour, different shape: not separable by colour alone
            (x1, y1), (x2, y2) = (centroid(solid & (idx == list(COLORS).index(c))) for c in (first, second))
            relation = next(r for r in RELATIONS if r in cap)
            ok = {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]
            assert ok, (cap, (x1, y1), (x2, y2))
            checked += 1
    assert checked > len(pair)


def test_mixed_interleaves_single_and_pair():
    d = generate(16, seed=2, split="mixed")
    is_pair = np.arange(16) % 4 == 3
    assert (d.labels[is_pair] == -1).all() and (d.labels[~is_pair] >= 0).all()
    for p, caps in zip(is_pair, d.captions, strict=True):
        assert all(any(r in c for r in RELATIONS) == p for c in caps)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate(2, split="triple")
    with pytest.raises(ValueError, match="part"):
        generate(2, part="dev")


def test_write_dataset_csv(tmp_path):
    path = write_dataset(tmp_path / "ds", n=5, image_size=32, seed=4, split="pair")
    data = generate(5, image_size=32, seed=4, split="pair")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and list(rows[0]) == ["image", "caption"]
    for i, row in enumerate(rows):
        image_path = path.parent / row["image"]
        assert image_path.is_file()
        assert np.array_equal(read_image(image_path), data.images[i])  # PNG is lossless
        assert row["caption"] == data.captions[i][0]


def test_write_dataset_folder(tmp_path):
    out = write_dataset(tmp_path / "ds", n=3, seed=4, fmt="folder")
    data = generate(3, seed=4)
    images = sorted(out.glob("*.png"))
    assert len(images) == 3
    for i, image_path in enumerate(images):
        assert np.array_equal(read_image(image_path), data.images[i])
        assert image_path.with_suffix(".txt").read_text().splitlines() == data.captions[i]


def test_cli(tmp_path, capsys):
    path = synthetic.main(["--out", str(tmp_path / "cli"), "--n", "4", "--image-size", "32", "--part", "val"])
    assert path.name == "captions.csv" and len(path.read_text().splitlines()) == 1 + 4
    assert "wrote 4" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# paraphrases (data.builtin_paraphrases)


def digest(d) -> str:
    h = hashlib.sha256(d.images.tobytes())
    h.update(json.dumps(d.captions).encode())
    h.update(d.labels.tobytes())
    return h.hexdigest()[:16]


# Captured from the generator before `paraphrases` existed: the default data must not change.
BEFORE = [
    (dict(n=64, image_size=32, seed=3, part="train", split="mixed", grid=0), "bfbb8cb48071de6a"),
    (dict(n=40, image_size=48, seed=0, part="val", split="single", grid=8), "1a115a81db8289ae"),
    (dict(n=24, image_size=64, seed=1, part="train", split="pair", grid=8), "2ba941675b34aafc"),
]


@pytest.mark.parametrize("kwargs,expected", BEFORE, ids=["mixed", "single-grid", "pair-grid"])
def test_default_data_is_unchanged(kwargs, expected):
    assert digest(generate(**kwargs)) == expected
    assert digest(generate(**kwargs, paraphrases=1)) == expected


def facts(caption: str) -> list[str]:
    """What a caption states, minus the word order: objects, sizes and positions (not the
    relation word, which a converse phrasing swaps)."""
    words = re.findall(r"[a-z]+", caption.replace("big", "large"))
    keep = set(COLORS) | set(SHAPES) | {"small", "large", "left", "right", "top", "bottom", "center"}
    if any(r in caption for r in RELATIONS):
        keep -= {"left", "right"}
    return sorted(w for w in words if w in keep)


def skeleton(caption: str) -> str:
    """A caption with its facts blanked: "a small red circle on the left." -> "a Z C S POS."."""
    c = re.sub(r"\b(in|on|at) the (top |bottom )?(left|right|top|bottom|center)\b", "POS", caption)
    c = re.sub(r"\b(left of|right of|above|below)\b", "REL", c)
    c = re.sub(rf"\b({'|'.join(COLORS)})\b", "C", c)
    c = re.sub(rf"\b({'|'.join(SHAPES)})\b", "S", c)
    return re.sub(r"\b(small|large|big)\b", "Z", c)


@pytest.mark.parametrize("split", ["single", "pair"])
def test_paraphrases_are_distinct_and_state_the_same_facts(split):
    k = 3
    d = generate(200, image_size=32, seed=5, split=split, paraphrases=k)
    assert np.array_equal(d.images, generate(200, image_size=32, seed=5, split=split).images)
    assert d.captions == generate(200, image_size=32, seed=5, split=split, paraphrases=k).captions
    templates = set()
    for caps in d.captions:
        assert len(caps) == len(set(caps)) == k
        assert len({tuple(facts(c)) for c in caps}) == 1, caps  # same objects, sizes, places
        n_objects = 1 if split == "single" else 2
        stated = facts(caps[0])
        assert sum(w in COLORS for w in stated) == sum(w in SHAPES for w in stated) == n_objects
        assert sum(w in ("small", "large") for w in stated) == n_objects, caps  # every size is said
        templates.update(skeleton(c) for c in caps)
    assert len(templates) >= 5, templates  # many phrasings, not one template with different words


def test_paraphrase_bounds():
    assert (
        len(generate(3, image_size=32, split="mixed", paraphrases=MAX_PARAPHRASES).captions[0])
        == MAX_PARAPHRASES
    )
    for bad in (0, MAX_PARAPHRASES + 1):
        with pytest.raises(ValueError, match="paraphrases"):
            generate(2, image_size=32, paraphrases=bad)
