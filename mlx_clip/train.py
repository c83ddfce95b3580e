"""`python -m mlx_clip.train [--config FILE] [--out DIR] [--steps N] [--resume] [--KEY.SUBKEY VALUE ...]`

With no arguments: trains `tiny` on the built-in shapes dataset into runs/<timestamp>/.
Dotted keys override the YAML, e.g. `--optim.lr 3e-4 --data.batch_size 64`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import load_config
from .schema import ConfigError

USAGE = __doc__.splitlines()[0].strip("`")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_clip.train",
        description="Train CLIP with MLX. Any config key can be set as --section.key VALUE.",
    )
    parser.add_argument("--config", help="run recipe (YAML); default: built-in defaults")
    parser.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--steps", type=int, help="same as --train.steps")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    parser.add_argument(
        "--stop-after", type=int, help="stop (with a checkpoint) after this many steps in this call"
    )
    args, rest = parser.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg:
            parser.error(f"unrecognized argument {arg!r} (config overrides look like --optim.lr 3e-4)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                parser.error(f"{arg} needs a value")
            key, value = arg[2:], rest[i + 1]
            i += 2
        overrides.append((key, value))
    if args.steps is not None:
        overrides.append(("train.steps", str(args.steps)))
    return args, overrides


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.resume and not args.out:
        sys.exit("error: --resume needs --out DIR (the run directory to continue)")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    config_path = args.config
    if args.resume and not config_path and (out / "config.yaml").is_file():
        config_path = out / "config.yaml"  # continue with the run's own resolved config
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    from .data.readers import DataError
    from .interop.layouts import WeightError
    from .training.checkpoint import CheckpointWriteError
    from .training.loop import (
        NonFiniteError,
        OutOfMemoryError,
        train,
    )  # imports MLX; after the config is known to be valid

    print(f"run directory: {out}", flush=True)
    try:
        summary = train(cfg, out, resume=args.resume, stop_after=args.stop_after)
    except (
        DataError,
        WeightError,
        FileNotFoundError,
        NonFiniteError,
        CheckpointWriteError,
        OutOfMemoryError,
    ) as e:
        # Bad input: one clear line naming the file or key, no traceback.
        sys.exit(f"error: {e}")
    shown = {k: v for k, v in summary.items() if not k.endswith(("R@5", "R@10"))}
    print(json.dumps(shown, indent=1))
    if "zeroshot_top1" in summary:
        print(f"zero-shot top-1 on held-out images: {100 * summary['zeroshot_top1']:.1f}%")
    return summary


if __name__ == "__main__":
    main()
