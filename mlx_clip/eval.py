"""`python -m mlx_clip.eval --checkpoint DIR [--data SRC] [--out FILE]`

Evaluates any checkpoint (a step_N directory, or a run directory: its latest checkpoint) on
the held-out split of its own config, or on SRC, and prints the metrics as JSON. They are
also written to DIR/eval.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config
from .schema import ConfigError


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mlx_clip.eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True, help="step_N directory or run directory")
    parser.add_argument(
        "--data", help="evaluation source (csv/json/folder/tar); default: the run's val split"
    )
    parser.add_argument("--out", help="where to write the metrics JSON (default: CHECKPOINT/eval.json)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checkpoint's checksums (state.json)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from .data.run_data import build_run_data
    from .models.locate import resolve_checkpoint, verify_files
    from .models.model import create_model
    from .models.weights import load_weights
    from .training.evaluate import evaluate

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        if not args.no_verify:
            verify_files(ckpt, hint="; --no-verify skips this check")
    except (FileNotFoundError, ValueError) as e:  # ValueError: WeightError, a damaged file
        sys.exit(f"error: {e}")
    overrides = []
    if args.data:
        # Evaluate on SRC in full: it becomes the held-out set, nothing of it is trained on.
        overrides.append(("data.val", args.data))
    try:
        cfg = load_config(ckpt / "config.yaml", overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    mcfg = cfg.model_config()
    data = build_run_data(cfg, mcfg, tokenizer_dir=ckpt, with_train=False)
    model = create_model(mcfg, seed=None)
    try:
        load_weights(model, ckpt / "model.safetensors")
    except (ValueError, OSError) as e:  # WeightError: a key, shape or dtype that does not fit
        sys.exit(f"error: {e}")
    metrics = {"checkpoint": str(ckpt), **evaluate(model, data)}
    out = Path(args.out) if args.out else ckpt / "eval.json"
    try:
        out.write_text(json.dumps(metrics, indent=1))
    except OSError as e:
        print(json.dumps(metrics, indent=1))
        sys.exit(f"error: could not write {out} ({e}); the metrics are printed above")
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
