"""Data-pipeline throughput (decode + resize + augment, images/s) next to what a training step consumes.

    python -m benchmarks.data_throughput [--arch vit_b32] [--batch 32] [--images 512] [--workers 0,2]
                                         [--results RESULTS.json] [--sections jpeg,tar,default-run]
                                         [--row-group 100] [--parquet-cache-mb MB]

- jpeg / tar / parquet / hf: --images JPEGs of --image-size pixels (default 500x375, smooth shapes,
  quality 90) are written into a temporary folder (with captions.txt), into 4 WebDataset shards,
  into 2 Parquet files (image bytes inline, --row-group rows per row group; 100 is what `datasets`
  writes for image data) and into a `datasets` save_to_disk folder (an Image feature; hf:DIR), read with
  mlx_clip.data.readers.read_samples and batched by mlx_clip.data.pipeline.Loader exactly as a run does (PIL
  decode, random resized crop to the model size with the run's default augmentation, normalise),
  with each --workers count, timed over the whole epoch (start-up included). Tokenisation is left
  out: the numbers are the image path only.
- The training step's rate for the same arch and batch comes from the mlx-cpu row of a
  train_throughput JSON (--results), else from a short measured MLX step in a subprocess.
- default-run: the default `python -m mlx_clip.train` configuration (tiny, built-in data in memory,
  batch 64, data.num_workers workers, 1 OpenBLAS thread as train.deterministic sets): its loader
  alone, the compiled step on a fixed batch, and the step fed by the loader in the same process,
  as the training loop does (on a small CPU the workers and the step share the cores, which only
  this last measurement shows).

Writes benchmarks/results/<host>-<UTC date and time>-data.json (or --out) and prints tables.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import mlx_clip  # noqa: F401  (OpenBLAS before mlx.core, see mlx_clip/_blas.py)
from mlx_clip.config import Config
from mlx_clip.data.pipeline import Loader
from mlx_clip.data.readers import read_samples
from mlx_clip.models.config import model_config
from mlx_clip.schema import to_dict

from .common import contention, cpu_snapshot, record_header, write_record
from .train_throughput import default_out, run_backend

SCHEMA = "mlx_clip.data_throughput/1"
FILE_SOURCES = ("jpeg", "tar", "parquet", "hf")
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


# ---------------------------------------------------------------------------
# Test images, made on the fly


def make_jpeg(rng: np.random.Generator, width: int, height: int) -> tuple[bytes, str]:
    """A photo-like JPEG (smooth background, a few shapes, mild noise) and a caption for it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / width * rng.uniform(0.3, 1) + yy / height * rng.uniform(0.3, 1))[..., None] / 2  # (H, W, 1)
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (height, width, 3))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        w, h = rng.uniform(20, width / 2), rng.uniform(20, height / 2)
        box = [x0, y0, min(width, x0 + w), min(height, y0 + h)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), f"a photo of a {colour} thing with some shapes"


def write_sources(
    root: Path, n: int, width: int, height: int, shards: int = 4, kinds=("jpeg", "tar"), row_group: int = 100
) -> dict[str, str]:
    """n JPEGs as a folder with captions.txt and as WebDataset shards (and, as `kinds` asks, as
    Parquet files and a `datasets` folder); returns {kind: source path}."""
    rng = np.random.default_rng(0)
    folder = root / "jpeg"
    folder.mkdir(parents=True)
    items = [make_jpeg(rng, width, height) for _ in range(n)]
    lines = []
    for i, (data, caption) in enumerate(items):
        (folder / f"{i:06d}.jpg").write_bytes(data)
        lines.append(f"{i:06d}.jpg\t{caption}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(s, n, shards):
                data, caption = items[i]
                for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    sources = {"jpeg": str(folder), "tar": str(root / f"shard-{{000..{shards - 1:03d}}}.tar")}
    if "parquet" in kinds:
        sources["parquet"] = write_parquet(root / "parquet", items, row_group)
    if "hf" in kinds:
        sources["hf"] = write_hf(root / "hf", items)
    return sources


def write_parquet(folder: Path, items: list[tuple[bytes, str]], row_group: int, files: int = 2) -> str:
    """items as `files` Parquet files with the image bytes inline ("image", "caption")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    for f in range(files):
        part = items[f::files]
        table = pa.table({"image": [d for d, _ in part], "caption": [c for _, c in part]})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=row_group)
    return str(folder)


def write_hf(folder: Path, items: list[tuple[bytes, str]]) -> str:
    """items as a `datasets` save_to_disk folder with an Image feature; the source is hf:DIR."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": d, "path": None} for d, _ in items], "caption": [c for _, c in items]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return f"hf:{folder}"


# ---------------------------------------------------------------------------
# Measurements


def loader_rate(loader: Loader, max_batches: int | None = None) -> dict:
    """Images/s over one epoch of `loader`, from creating the iterator to the last batch.

    Start-up is included on purpose: timing only after a first batch would let the prefetching
    workers prepare the next ones for free, and overstate the rate of a short epoch.
    """
    n, t0, first = 0, time.perf_counter(), None
    for k, batch in enumerate(loader.epoch(0)):
        n += len(batch["images"])
        first = first or time.perf_counter() - t0
        if max_batches and k + 1 >= max_batches:
            break
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "first_batch_s": first}


def step_rate_from(results: Path, arch: str, batch: int) -> dict | None:
    doc = json.loads(results.read_text())
    s = doc["settings"]
    if (s["arch"], s["batch"]) != (arch, batch):
        raise SystemExit(f"error: {results} is for {s['arch']} batch {s['batch']}, not {arch} batch {batch}")
    for r in doc["results"]:
        if r["backend"] == "mlx-cpu" and "error" not in r:
            return {"images_per_s": r["images_per_s"], "source": f"{results} (mlx-cpu)"}
    return None


def measure_step_rate(arch: str, batch: int) -> dict:
    spec = dict(arch=arch, batch=batch, warmup=2, steps=5, gemm_size=256, gemm_reps=1, seed=0)
    r = run_backend({**spec, "backend": "mlx-cpu"}, timeout=1800)
    if "error" in r:
        raise SystemExit(f"error: measuring the MLX step failed: {r['error']}")
    return {"images_per_s": r["images_per_s"], "source": "measured now: mlx-cpu, 2 warm-up + 5 steps"}


def default_run_check(steps: int, warmup: int = 3) -> dict:
    """The default run's loader alone, its step on a fixed batch, and its step fed by the loader."""
    import mlx.core as mx

    from mlx_clip.data.run_data import build_run_data
    from mlx_clip.models import streams
    from mlx_clip.training.build import build_training

    cfg = Config()
    B = cfg.data.batch_size
    n_streams = streams.resolve(cfg.train.streams)
    streams.setup_process(n_streams, cfg.train.grad_checkpointing, cfg.train.deterministic)  # as a run
    # Only the epoch length changes (enough batches for the measurement): per-batch work is the same.
    cfg.data.builtin_train_size = B * (2 * (warmup + steps) + 4)
    cfg.data.builtin_val_size = B
    mcfg = cfg.model_config()
    data = build_run_data(cfg, mcfg)
    loader = data.train
    alone = loader_rate(loader)

    training = build_training(cfg, n_streams=n_streams, mcfg=mcfg)  # the default run's own step
    step_fn, state = training.step, training.state

    def step(batch):
        loss, grad_norm = step_fn(mx.array(batch["images"]), mx.array(batch["tokens"]))
        mx.eval(state, loss, grad_norm)

    def timed(batches) -> list[float]:
        times = []
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            step(batch)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            if len(times) == steps:
                break
        return times

    fixed = next(loader.epoch(0))
    snap = cpu_snapshot()
    t_fixed = timed(fixed for _ in range(warmup + steps))
    load_fixed, snap = contention(snap, cpu_snapshot()), cpu_snapshot()
    # Fed: time from asking the loader for a batch to the end of its step, as the training loop sees it.
    it, t_fed = loader.epoch(1), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step(next(it))
        if i >= warmup:
            t_fed.append(time.perf_counter() - t0)
    load_fed = contention(snap, cpu_snapshot())
    fixed_rate, fed_rate = B / statistics.median(t_fixed), B / statistics.median(t_fed)
    return {
        "arch": cfg.model.arch,
        "batch": B,
        "num_workers": cfg.data.num_workers,
        "prefetch": cfg.data.prefetch,
        "blas_threads": 1 if cfg.train.deterministic else "default",
        "loader_images_per_s": alone["images_per_s"],
        "step_fixed_batch_images_per_s": fixed_rate,
        "step_fed_by_loader_images_per_s": fed_rate,
        "fed_over_fixed": fed_rate / fixed_rate,
        # CPU used by other processes meanwhile (common.contention); the loader's own worker
        # threads count as this process, not as others
        "contention_fixed": load_fixed,
        "contention_fed": load_fed,
        "steps": steps,
        "warmup": warmup,
    }


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.data_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", default="vit_b32", help="architecture name or model YAML (default vit_b32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="JPEGs to write (default 512)")
    p.add_argument("--image-size", default="500x375", help="WIDTHxHEIGHT of the JPEGs (default 500x375)")
    p.add_argument("--workers", default=f"0,{Config().data.num_workers}", help="loader worker counts")
    p.add_argument("--results", type=Path, default=None, help="train_throughput JSON with an mlx-cpu row")
    p.add_argument("--sections", default="jpeg,tar,default-run", help="jpeg, tar, parquet, hf, default-run")
    p.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group (default 100)")
    p.add_argument(
        "--parquet-cache-mb",
        type=float,
        default=None,
        help="row-group cache of data/columnar.py (default: its CACHE_BYTES); 0 keeps only the latest "
        "group, so a shuffled epoch reads a row group per image, as on data far larger than the cache",
    )
    p.add_argument("--default-run-steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {*FILE_SOURCES, "default-run"}
    if unknown:
        raise SystemExit(
            f"error: unknown section(s) {sorted(unknown)} ({', '.join(FILE_SOURCES)}, default-run)"
        )
    cfg = model_config(args.arch)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    d = Config().data
    augment = dict(scale=tuple(d.crop_scale), color_jitter=d.color_jitter, hflip=d.hflip)  # as run_data
    doc = {
        **record_header(SCHEMA),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("results", "out")},
            "model": to_dict(cfg),
            "augment": augment,
        },
        "pipeline": [],
    }
    file_sections = [s for s in sections if s in FILE_SOURCES]
    if args.parquet_cache_mb is not None:
        from mlx_clip.data import columnar

        columnar.CACHE_BYTES = int(args.parquet_cache_mb * 2**20)
    if file_sections:
        if args.results:
            step = step_rate_from(args.results, args.arch, args.batch)
        else:
            step = measure_step_rate(args.arch, args.batch)
        doc["training_step"] = {"arch": args.arch, "batch": args.batch, **step}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            sources = write_sources(
                Path(tmp), args.images, width, height, kinds=file_sections, row_group=args.row_group
            )
            print(
                f"wrote {args.images} {width}x{height} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True
            )
            for kind in file_sections:
                samples = read_samples(sources[kind])
                for w in (int(x) for x in args.workers.split(",")):
                    loader = Loader(
                        samples, args.batch, cfg.image_size, train=True, num_workers=w, augment=augment
                    )
                    r = loader_rate(loader)
                    doc["pipeline"].append({"source": kind, "workers": w, **r})
                    print(f"{kind}, {w} workers: {r['images_per_s']:.1f} images/s", flush=True)
    if "default-run" in sections:
        doc["default_run"] = default_run_check(args.default_run_steps)
    stamped = default_out()
    out = args.out or stamped.with_name(stamped.stem + "-data.json")
    write_record(doc, out, markdown(doc))
    return doc


def _share(c: dict | None) -> str:
    return "-" if c is None else f"{100 * c['others_share']:.0f}%"


def markdown(doc: dict) -> str:
    lines = []
    if doc["pipeline"]:
        step = doc["training_step"]
        S = doc["settings"]["model"]["image_size"]
        lines += [
            f"Decode + random resized crop to {S} px + normalise, batch {step['batch']} "
            f"(training step: {step['images_per_s']:.1f} images/s, {step['source']})",
            "",
            "| source | workers | images/s | x training step |",
            "|---|---|---|---|",
        ]
        for r in doc["pipeline"]:
            ratio = r["images_per_s"] / step["images_per_s"]
            lines.append(f"| {r['source']} | {r['workers']} | {r['images_per_s']:,.1f} | {ratio:,.1f} |")
    if "default_run" in doc:
        r = doc["default_run"]
        lines += [
            "",
            f"Default run ({r['arch']}, built-in data, batch {r['batch']}, {r['num_workers']} workers):",
            "",
            "| loader alone | step, fixed batch | step fed by the loader | fed / fixed | others' CPU |",
            "|---|---|---|---|---|",
            f"| {r['loader_images_per_s']:,.0f} img/s | {r['step_fixed_batch_images_per_s']:,.0f} img/s "
            f"| {r['step_fed_by_loader_images_per_s']:,.0f} img/s | {r['fed_over_fixed']:.2f} "
            f"| {_share(r['contention_fixed'])} / {_share(r['contention_fed'])} |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
