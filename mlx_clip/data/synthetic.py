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

`write_dataset` (and `python -m mlx_clip.data.synthetic --out DIR --n 1000`) exports images + captions to
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
from .synthetic_captions import (
    MAX_PARAPHRASES,
    pair_captions,
    pair_paraphrases,
    single_captions,
    single_paraphrases,
)
from .synthetic_scene import (
    PARTS,
    SHAPES,
    part_rng,
    render_all,
    sample_pair,
    sample_pair_grid,
    sample_single,
    sample_single_grid,
)

SPLITS = typing.get_args(BuiltinSplit)


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


# ----------------------------------------------------------------------------- public API


def _generate_single(
    n: int, S: int, seed: int, part: str, grid: int = 0, paraphrases: int = 1
) -> SyntheticData:
    rng = part_rng(seed, part, 0)
    obj = sample_single_grid(rng, n, S, grid) if grid else sample_single(rng, n, S)
    images = render_all(rng, [obj], S)
    labels = (obj.color * len(SHAPES) + obj.shape).astype(np.int32)
    # Captions are drawn last from the stream, so the pixels never depend on `paraphrases`.
    if paraphrases > 1:
        captions = single_paraphrases(rng, obj, S, paraphrases)
    else:
        captions = single_captions(rng, obj, S)
    return SyntheticData(images, captions, labels)


def _generate_pair(
    n: int, S: int, seed: int, part: str, grid: int = 0, paraphrases: int = 1
) -> SyntheticData:
    rng = part_rng(seed, part, 1)
    a, b, vertical = sample_pair_grid(rng, n, S, grid) if grid else sample_pair(rng, n, S)
    images = render_all(rng, [a, b], S)
    if paraphrases > 1:
        captions = pair_paraphrases(rng, a, b, vertical, paraphrases)
    else:
        captions = pair_captions(rng, a, b, vertical)
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
        prog="python -m mlx_clip.data.synthetic", description="Write the built-in shapes dataset to disk."
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
