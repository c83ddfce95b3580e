"""`python -m mlx_clip.embed --checkpoint TEACHER --data SRC --out DIR [--config FILE]
[--KEY.SUBKEY VALUE ...]`

Writes a teacher's L2-normalised embeddings of a training source, for distillation: one image row
per sample and one text row per caption (every caption), as DIR/embeddings-NNNNN.safetensors
shards plus DIR/index.json (teacher, embed dim, logit scale, source, counts; the format:
mlx_clip/data/embedding_store.py). Then train with `--loss.distill.embeddings DIR`.

SRC is read as `data.train` is (same syntax and readers; --data.image_key etc. apply). `builtin`
is the built-in dataset that the run's --config / overrides generate (size, split, image size),
so give the embedding the same --config and data/model overrides as the training run.
TEACHER is any checkpoint mlx_clip.load takes (ours, converted HF/open_clip, LoRA; --ema: its EMA).
"""

from __future__ import annotations

import argparse
import json
import sys

from .run_args import dotted_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    p = argparse.ArgumentParser(prog="python -m mlx_clip.embed", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="the teacher: step_N directory or run directory")
    p.add_argument("--data", required=True, help="the training source (data.train syntax, or builtin)")
    p.add_argument("--out", required=True, help="output directory (index.json + shards)")
    p.add_argument("--config", help="the training run's recipe (YAML), for builtin and the data keys")
    p.add_argument("--ema", action="store_true", help="the teacher's EMA weights (ema.safetensors)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    p.add_argument("--batch-size", type=int, default=128, help="images and texts per encoder call")
    p.add_argument("--shard-samples", type=int, default=4096, help="samples per shard")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums (state.json)")
    args, rest = p.parse_known_args(argv)
    if args.batch_size < 1 or args.shard_samples < 1:
        p.error("--batch-size and --shard-samples must be >= 1")
    return args, [*dotted_overrides(p, rest), ("data.train", args.data)]


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from .config import load_config
    from .data.embedding_store import StoreError
    from .data.samples import DataError
    from .schema import ConfigError

    try:
        cfg = load_config(args.config, overrides)
        from .embedding import embed

        kw = dict(ema=args.ema, verify=not args.no_verify, dtype=args.dtype, batch_size=args.batch_size)
        index = embed(args.checkpoint, cfg, args.out, shard_samples=args.shard_samples, **kw)
    except (OSError, ConfigError, DataError, StoreError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(index))
    return index


if __name__ == "__main__":
    main()
