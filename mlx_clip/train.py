"""`python -m mlx_clip.train [--config FILE] [--out DIR] [--steps N] [--resume [--resume-changed]]
[--stop-after K] [--KEY.SUBKEY VALUE ...]`

With no arguments: trains `tiny` on the built-in shapes dataset into runs/<timestamp>/.
Dotted keys override the YAML, e.g. `--optim.lr 3e-4 --data.batch_size 64`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .config import load_config
from .run_args import parse_args
from .schema import ConfigError


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

    from .data.samples import DataError
    from .interop.layouts import WeightError
    from .training.checkpoint import CheckpointWriteError
    from .training.logging import RunWriteError
    from .training.loop import (
        NonFiniteError,
        OutOfMemoryError,
        train,
    )  # imports MLX; after the config is known to be valid
    from .training.resume import ResumeError
    from .training.run_dir import RunDirError

    print(f"run directory: {out}", flush=True)
    try:
        summary = train(
            cfg, out, resume=args.resume, stop_after=args.stop_after, resume_changed=args.resume_changed
        )
    except (
        ConfigError,  # a value only checkable with the data, e.g. model.vocab_size for a trained tokenizer
        DataError,
        WeightError,
        FileNotFoundError,
        NonFiniteError,
        CheckpointWriteError,
        RunWriteError,
        OutOfMemoryError,
        ResumeError,
        RunDirError,
    ) as e:
        # Bad input: one clear line naming the file or key, no traceback.
        sys.exit(f"error: {e}")
    shown = {k: v for k, v in summary.items() if not k.endswith(("R@5", "R@10"))}
    print(json.dumps(shown, indent=1))
    if "zeroshot_top1" in summary:
        top1 = summary["zeroshot_top1"]
        text = "NaN (the model's embeddings are not finite)" if math.isnan(top1) else f"{100 * top1:.1f}%"
        print(f"zero-shot top-1 on held-out images: {text}")
    return summary


if __name__ == "__main__":
    main()
