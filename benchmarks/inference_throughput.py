"""Embedding throughput at inference: images/s and texts/s of mlx_clip and open_clip, same architecture.

    python -m benchmarks.inference_throughput [--arch vit_b32] [--batch 64] [--images 256] [--texts 256]
                                              [--rounds 3] [--backends mlx,open_clip] [--out FILE]

Both models are built from the same ModelConfig at random init (open_clip's CLIP through
mlx_clip.interop.open_clip.open_clip_cfg) and run in float32 on the CPU, each backend in its own
subprocess, one after the other (the open_clip one without MLX's OpenBLAS). Per backend, in order:

- image_model: one preprocessed float32 batch of --batch images through the image tower to unit
  vectors, as numpy (mlx_clip: models.streams.Encoders, the call inside inference.encode_images; open_clip:
  encode_image(normalize=True) under torch.inference_mode); 2 warm-up calls, then --rounds timed;
- text_model: the same with --batch token rows through the text tower;
- image_decode: --images JPEG files (640 x 480, written once by the parent), --batch at a time, read,
  decoded, preprocessed and encoded (mlx_clip: inference.encode_images, the path `predict --index`
  embeds new files with; open_clip: PIL + its own image_transform for the model's preprocessing);
- text_tokenize: --texts prompts (ImageNet class names in CLIP's templates), --batch at a time,
  tokenized and encoded (mlx_clip: inference.encode_texts, the label path of `predict`; open_clip:
  open_clip.tokenize + encode_text);
- index_folder (mlx_clip only): the whole `predict --index` embedding of the folder into an empty
  cache (scan, decode, encode, cache write), once.

Each row reports the median seconds per batch and items/s = batch / median (index_folder: images / its
time); "others' CPU" is the share other processes used while the backend ran (common.contention).
The JSON goes to benchmarks/results/inference-<host>-<UTC date and time>.json (or --out); a markdown
table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# Importing mlx_clip (any submodule) loads OpenBLAS for MLX on Linux, before anything imports mlx.core.
from mlx_clip.models.config import model_config
from mlx_clip.schema import to_dict

from .common import (
    RESULTS_DIR,
    contention,
    cpu_snapshot,
    machine_info,
    record_header,
    run_in_worker,
    write_record,
)

SCHEMA = "mlx_clip.inference_throughput/1"
BACKENDS = ("mlx", "open_clip")
ROWS = ("image_model", "text_model", "image_decode", "text_tokenize", "index_folder")
WARMUP = 2
OPENAI_VOCAB = 49408  # the text_tokenize rows' tokenizer: OpenAI's CLIP BPE in both backends


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n 640 x 480 JPEGs (smooth colour fields with noise, photo-like sizes to decode), sorted."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        field = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        pixels = 127.5 * (field + 1) + rng.normal(0, 8, field.shape)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def prompts(n: int) -> list[str]:
    """n label prompts: ImageNet class names in CLIP's templates (inference.prompts_for), in order."""
    from mlx_clip.evaluation.templates import load_classnames
    from mlx_clip.inference import DEFAULT_TEMPLATES, prompts_for

    out = [p for name in load_classnames("imagenet") for p in prompts_for(name, DEFAULT_TEMPLATES)]
    return out[:n]


def timed(fn, calls: list, warmup: int = 0) -> dict:
    """fn(x) for every x in calls (the first `warmup` untimed); median seconds per timed call."""
    times = []
    for i, x in enumerate(calls):
        t = time.perf_counter()
        fn(x)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"times_s": times, "median_s": statistics.median(times)}


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _mlx_rows(spec: dict, cfg, images: np.ndarray, tokens: np.ndarray, paths: list, texts: list) -> dict:
    from mlx_clip import create_model
    from mlx_clip.data.transforms import ImagePreprocess
    from mlx_clip.inference import Preprocess, encode_images, encode_texts, index_folder
    from mlx_clip.models.streams import Encoders
    from mlx_clip.text.vocab import openai_tokenizer

    model = create_model(cfg, seed=0)
    model.eval()
    encoders = Encoders.of(model)  # what encode_images / encode_texts call: one shard per core, compiled
    preprocess = Preprocess(cfg.image_size, settings=ImagePreprocess.of(cfg))  # as mlx_clip.load builds it
    tokenizer = openai_tokenizer()  # open_clip.tokenize's vocabulary (main() checks the model's)
    tokenizer.context_length = cfg.context_length
    batch, rounds = spec["batch"], [None] * (WARMUP + spec["rounds"])
    rows = {
        "image_model": timed(lambda _: encoders.image(images), rounds, WARMUP),
        "text_model": timed(lambda _: encoders.text(tokens), rounds, WARMUP),
        "image_decode": timed(lambda ps: encode_images(model, preprocess, ps, batch), chunks(paths, batch)),
        "text_tokenize": timed(lambda ts: encode_texts(model, tokenizer, ts, batch), chunks(texts, batch)),
    }
    with tempfile.TemporaryDirectory() as cache:  # empty: every image is embedded
        t = time.perf_counter()
        index = index_folder(model, preprocess, paths[0].parent, "0" * 64, cache, batch)
        rows["index_folder"] = {"times_s": [time.perf_counter() - t], "images": len(index.paths)}
    return rows


def _open_clip_rows(
    spec: dict, cfg, images: np.ndarray, tokens: np.ndarray, paths: list, texts: list
) -> dict:
    import open_clip
    import torch
    from PIL import Image

    from mlx_clip.interop.open_clip import open_clip_cfg

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**open_clip_cfg(cfg)).eval()
    preprocess = open_clip.transform.image_transform(
        cfg.image_size, is_train=False, mean=tuple(cfg.image_mean), std=tuple(cfg.image_std),
        resize_mode=cfg.resize_mode, interpolation=cfg.interpolation,
    )  # fmt: skip
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    t = torch.from_numpy(tokens).long()
    rounds = [None] * (WARMUP + spec["rounds"])

    def decode(ps):
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in ps])
        return model.encode_image(pixels, normalize=True).numpy()

    def tokenize(ts):
        return model.encode_text(open_clip.tokenize(ts, cfg.context_length), normalize=True).numpy()

    with torch.inference_mode():
        return {
            "image_model": timed(lambda _: model.encode_image(x, normalize=True).numpy(), rounds, WARMUP),
            "text_model": timed(lambda _: model.encode_text(t, normalize=True).numpy(), rounds, WARMUP),
            "image_decode": timed(decode, chunks(paths, spec["batch"])),
            "text_tokenize": timed(tokenize, chunks(texts, spec["batch"])),
            "threads": torch.get_num_threads(),
        }


def run_worker(spec: dict) -> dict:
    """One backend's rows in this process; `error` instead of numbers on failure."""
    from .common import synthetic_batch

    out = {"backend": spec["backend"], "load_avg_at_start": list(os.getloadavg())}
    try:
        cfg = model_config(spec["arch"])
        images, tokens = synthetic_batch(cfg, spec["batch"], seed=0)
        paths = sorted(Path(spec["image_dir"]).glob("*.jpg"))
        worker = _mlx_rows if spec["backend"] == "mlx" else _open_clip_rows
        before = cpu_snapshot()
        rows = worker(spec, cfg, images, tokens, paths, prompts(spec["texts"]))
        out["contention"] = contention(before, cpu_snapshot())
        out["threads"] = rows.pop("threads", None)
        for name, row in rows.items():
            per_call = spec["batch"] if name in ("image_model", "text_model") else None
            if name == "index_folder":
                row["per_s"] = row["images"] / row["times_s"][0]
            else:  # the median batch; a last partial batch counts its own size
                sizes = [spec["batch"]] * len(row["times_s"]) if per_call else _sizes(spec, name)
                rates = [n / s for n, s in zip(sizes, row["times_s"], strict=True)]
                row["per_s"] = statistics.median(rates)
        out["rows"] = rows
    except Exception as e:  # recorded, so that one broken backend does not hide the other
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _sizes(spec: dict, row: str) -> list[int]:
    n = spec["images"] if row == "image_decode" else spec["texts"]
    return [len(c) for c in chunks(list(range(n)), spec["batch"])]


def run_backend(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    if spec["backend"] != "mlx":
        env["MLX_CLIP_BLAS"] = "none"  # keep OpenBLAS out of torch's process
    print(f"[{spec['backend']}] starting worker", file=sys.stderr, flush=True)
    return run_in_worker("benchmarks.inference_throughput", spec, {"backend": spec["backend"]}, timeout, env)


def markdown_table(doc: dict) -> str:
    s = doc["settings"]
    ok = {r["backend"]: r for r in doc["results"] if "error" not in r}
    names = [b for b in s["backends"] if b in ok]
    head = ["path", *(f"{b} /s" for b in names)]
    if {"mlx", "open_clip"} <= ok.keys():
        head.append("mlx / open_clip")
    lines = [f"{s['arch']}, batch {s['batch']}, float32, CPU", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for row in ROWS:
        rates = [ok[b]["rows"].get(row, {}).get("per_s") for b in names]
        cells = [row, *("-" if x is None else f"{x:,.1f}" for x in rates)]
        if len(head) > len(cells):
            m, o = rates[names.index("mlx")], rates[names.index("open_clip")]
            cells.append("-" if m is None or o is None else f"{m / o:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    share = [
        f"{b} {100 * ok[b]['contention']['others_share']:.0f}%" for b in names if ok[b].get("contention")
    ]
    lines.append(f"\nothers' CPU while running: {', '.join(share) or '-'}")
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"{r['backend']}: error: {r['error']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.inference_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", default="vit_b32", help="architecture name or model YAML (default vit_b32)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=256, help="JPEG files for image_decode (default 256)")
    p.add_argument("--texts", type=int, default=256, help="prompts for text_tokenize (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="timed batches of the *_model rows (default 3)")
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per backend (default 1800)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch, args.images, args.texts, args.rounds) < 1:
        p.error("--batch, --images, --texts and --rounds must be >= 1")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        p.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:  # internal: one backend, in this (fresh) process
        spec = json.loads(args.worker.read_text())
        Path(spec["result_path"]).write_text(json.dumps(run_worker(spec)))
        return {}
    cfg = model_config(args.arch)  # fails fast, before any worker starts
    if cfg.vocab_size != OPENAI_VOCAB:
        sys.exit(
            f"error: --arch {args.arch} has vocab_size {cfg.vocab_size}; both backends tokenize with the "
            f"OpenAI CLIP tokenizer ({OPENAI_VOCAB} tokens): pick an architecture that uses it (vit_b32, ...)"
        )
    settings = {k: getattr(args, k) for k in ("arch", "batch", "images", "texts", "rounds", "backends")}
    doc = {**record_header(SCHEMA), "settings": {**settings, "warmup": WARMUP, "model": to_dict(cfg)}}
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "images", args.images)
        spec = {k: v for k, v in settings.items() if k != "backends"}
        spec["image_dir"] = str(Path(tmp) / "images")
        doc["results"] = [run_backend({**spec, "backend": b}, args.timeout) for b in args.backends]
    stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime())
    out = args.out or RESULTS_DIR / f"inference-{machine_info()['host'].split('.')[0]}-{stamp}.json"
    write_record(doc, out, markdown_table(doc))
    return doc


if __name__ == "__main__":
    main()
