"""Quantized inference against float32: accuracy, image-embedding speed and memory.

    python -m benchmarks.quantized [--checkpoint RUN] [--train-out DIR] [--bits 8,4] [--group-size 64]
                                   [--batch 64] [--repeats 5] [--arch NAME] [--out FILE]

With --checkpoint (a run directory or step_N/), or else the default run (`python -m mlx_clip.train`,
trained into --train-out unless a checkpoint is already there), each variant (fp32, then every
--bits) is loaded by mlx_clip.load(quantize=...) and measured:

- accuracy: the run's own evaluation (mlx_clip.training.evaluate.evaluate on the held-out split of
  the checkpoint's config: zero-shot top-1, retrieval R@1), and the change from fp32 in points;
- memory: bytes of the model's parameters (quantized weights with their scales and offsets); what
  loading left in MLX's active memory ("resident"); and the peak of one encode_image call on a
  synthetic batch (benchmarks.common): resident plus what the call allocated at most;
- speed: images per second of model.encode_image on that batch, uncompiled as predict runs it: the
  median of --repeats timed calls, the variants taking turns (a busy machine slows them alike).

--arch NAME measures a random-init architecture instead (speed and memory only: no accuracy).
MLX_CLIP_KERNELS=native times MLX's own quantized matmul instead of the CPU's dequantize + BLAS
path (mlx_clip/models/kernels.py).
The JSON goes to benchmarks/results/<host>-quantized-<UTC date and time>.json (or --out); a
markdown table is printed.
"""

from __future__ import annotations

import argparse
import gc
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Importing mlx_clip (any submodule) loads OpenBLAS for MLX on Linux, before anything imports mlx.core.
import mlx_clip

from .common import REPO_ROOT, RESULTS_DIR, record_header, synthetic_batch, write_record

SCHEMA = "mlx_clip.quantized/1"
ACCURACY = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")


def default_checkpoint(train_out: Path) -> Path:
    """The default run's latest checkpoint, trained into train_out first if it has none."""
    if not (train_out / "checkpoints").is_dir():
        print(f"training the default run into {train_out} (a few minutes)", flush=True)
        cmd = [sys.executable, "-m", "mlx_clip.train", "--out", str(train_out)]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return train_out


def measure(load_variant, bits, data, images) -> tuple[dict, object]:
    """One variant: load it (quantize=bits, None for fp32), then its memory and accuracy; returns
    (row, model). The models of earlier variants stay loaded (for the interleaved timing), so the
    memory is counted from MLX's active memory just before this one is loaded."""
    import mlx.core as mx

    from mlx_clip.models.quantize import parameter_bytes, quantization
    from mlx_clip.training.evaluate import evaluate

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    model = load_variant(bits)
    resident = mx.get_active_memory() - before
    mx.eval(model.encode_image(images))  # warm-up, then one call's peak above the resident arrays
    before_call = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model.encode_image(images))
    row = {
        "variant": quantization(model) or "fp32",
        "parameter_bytes": parameter_bytes(model),
        "resident_bytes": resident,
        "peak_bytes": resident + mx.get_peak_memory() - before_call,
    }
    if data is not None:
        metrics = evaluate(model, data)
        row["accuracy"] = {k: metrics[k] for k in ACCURACY if k in metrics}
    return row, model


def time_interleaved(rows: list[dict], models: list, images, repeats: int) -> None:
    """rows[i]["speed"]: images per second of models[i].encode_image, the median of `repeats` calls
    taken in turn with the other variants', so that a busy machine slows them all alike."""
    import mlx.core as mx

    times = [[] for _ in models]
    for _ in range(repeats):
        for model, t in zip(models, times, strict=True):
            start = time.perf_counter()
            mx.eval(model.encode_image(images))
            t.append(time.perf_counter() - start)
    for row, t in zip(rows, times, strict=True):
        median = statistics.median(t)
        row["speed"] = {"img_per_s": images.shape[0] / median, "median_s": median, "times_s": t}


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = "| variant | parameters (MB) | vs fp32 | img/s | vs fp32 | peak (MB) |"
    cols = [k for k in ACCURACY if k in base.get("accuracy", {})]
    head += "".join(f" {k} | change (points) |" for k in cols)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s, b = r["speed"], base["speed"]
        line = (
            f"| {r['variant']} | {r['parameter_bytes'] / 1e6:.2f} | "
            f"{r['parameter_bytes'] / base['parameter_bytes']:.2f}x | {s['img_per_s']:.0f} | "
            f"{s['img_per_s'] / b['img_per_s']:.2f}x | {r['peak_bytes'] / 1e6:.1f} |"
        )
        for k in cols:
            v, v0 = r["accuracy"][k], base["accuracy"][k]
            line += f" {100 * v:.1f}% | {100 * (v - v0):+.1f} |"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="run directory or step_N/ (default: the default run)")
    p.add_argument("--train-out", type=Path, default=Path("/tmp/mlx_clip_default_run"))
    p.add_argument("--bits", default="8,4", help="comma-separated bit widths after fp32")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="images per timed encode_image call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--arch", help="a random-init architecture instead of a checkpoint (no accuracy)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import mlx.core as mx

    args = parse_args(sys.argv[1:] if argv is None else argv)
    bits = [None] + [int(b) for b in args.bits.split(",") if b]
    from mlx_clip.models.kernels import use_fast_kernels

    doc = {**record_header(SCHEMA), "group_size": args.group_size, "batch": args.batch}
    doc["fast_kernels"] = use_fast_kernels()  # the CPU's dequantize + BLAS path (MLX_CLIP_KERNELS)
    if args.arch:
        from mlx_clip.models.config import model_config
        from mlx_clip.models.model import create_model
        from mlx_clip.models.quantize import quantize_model

        def load_variant(b):
            model = create_model(args.arch, seed=0)
            return model if b is None else quantize_model(model, b, args.group_size)

        data, doc["arch"], mcfg = None, args.arch, model_config(args.arch)
    else:
        from mlx_clip.config import load_config
        from mlx_clip.data.run_data import build_run_data
        from mlx_clip.models.locate import resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint or default_checkpoint(args.train_out))
        cfg = load_config(ckpt / "config.yaml", log=None)
        mcfg = cfg.model_config()
        data = build_run_data(cfg, mcfg, tokenizer_dir=ckpt, with_train=False)
        doc["checkpoint"] = str(ckpt)

        def load_variant(b):
            return mlx_clip.load(ckpt, quantize=b, group_size=args.group_size)[0]

    images = mx.array(synthetic_batch(mcfg, args.batch)[0])  # (B, S, S, 3)
    rows, models = [], []
    for b in bits:
        row, model = measure(load_variant, b, data, images)
        rows.append(row)
        models.append(model)
    time_interleaved(rows, models, images, args.repeats)
    doc["rows"] = rows
    print(table(doc["rows"]))
    stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime())
    out = args.out or RESULTS_DIR / f"{socket.gethostname()}-quantized-{stamp}.json"
    write_record(doc, out)
    return doc


if __name__ == "__main__":
    main()
