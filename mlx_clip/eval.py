"""`python -m mlx_clip.eval --checkpoint CKPT [--zeroshot NAME=PATH] [--retrieval NAME=PATH]
[--linear-probe NAME=TRAIN,TEST] [--templates openai|short|dataset|FILE] [--compare CKPT2] [--out FILE]`

Evaluates a checkpoint (a step_N directory, or a run directory: its latest checkpoint) on named
sets, each option repeatable: zero-shot classification (an ImageFolder, CLIP_benchmark shards or
a labelled CSV/JSONL), retrieval (a Karpathy JSON or any caption source) and linear probes. It
prints a table and writes eval.json (scalars and per-class details) and a confusion_NAME.png per
zero-shot set beside it. --compare CKPT2 evaluates a second checkpoint on the same sets (read once)
and adds its column and the difference B-A: a fine-tuned model next to its starting point shows
gain and forgetting. --quantize 4|8 [--group-size 64] evaluates the checkpoints with their linear
layers quantized (models/quantize.py). Without sets, it evaluates on the held-out split of the
checkpoint's own config (or on --data SRC) and prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SET_KINDS = ("zeroshot", "retrieval", "linear_probe")  # the options --zeroshot, --retrieval, --linear-probe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_clip.eval", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="step_N directory or run directory")
    sets = dict(action="append", default=[])
    p.add_argument("--zeroshot", **sets, metavar="NAME=PATH", help="zero-shot classification set; repeatable")
    p.add_argument("--retrieval", **sets, metavar="NAME=PATH", help="image-text retrieval set; repeatable")
    p.add_argument("--linear-probe", **sets, metavar="NAME=TRAIN,TEST", help="linear probe; repeatable")
    p.add_argument(
        "--templates",
        default="openai",
        help="zero-shot prompts: openai (80) | short (7) | dataset (its own) | FILE",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images and texts per encoder call")
    p.add_argument("--compare", metavar="CKPT2", help="also evaluate CKPT2 and print B-A")
    p.add_argument("--data", help="without sets: evaluation source; default: the run's val split")
    p.add_argument("--out", help="where to write the metrics JSON (default: CHECKPOINT/eval.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums (state.json)")
    p.add_argument("--quantize", type=int, metavar="BITS", help="quantize the linear layers to 4 or 8 bits")
    p.add_argument("--group-size", type=int, default=64, help="inputs per quantization group (32, 64, 128)")
    p.add_argument(
        "--ema",
        action="store_true",
        help="the EMA weights (ema.safetensors; train.ema_decay) of every checkpoint",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    texts = {kind: getattr(args, kind) for kind in SET_KINDS}
    if not any(texts.values()):
        if args.compare:
            sys.exit("error: --compare needs at least one --zeroshot, --retrieval or --linear-probe set")
        return _own_val(args)
    if args.data:
        sys.exit(
            "error: --data is for the run's own val split; give a caption source as --retrieval NAME=PATH"
        )
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size must be at least 1, got {args.batch_size}")
    return _named_sets(args, texts)


def _named_sets(args, texts: dict[str, list[str]]) -> dict:
    from .data.samples import DataError
    from .data.transforms import ImagePreprocess
    from .evaluation import report
    from .evaluation.suite import evaluate_sets, load_sets, parse_spec
    from .inference import load
    from .models.locate import resolve_checkpoint
    from .models.quantize import quantization
    from .models.streams import Encoders

    runs = []  # (checkpoint, model, tokenizer) of A, then B
    try:
        specs = [parse_spec(kind, t, args.templates) for kind, ts in texts.items() for t in ts]
        for path in [args.checkpoint] + ([args.compare] if args.compare else []):
            ckpt = resolve_checkpoint(path)
            model, tokenizer, _ = load(
                ckpt,
                verify=not args.no_verify,
                quantize=args.quantize,
                group_size=args.group_size,
                ema=args.ema,
            )
            runs.append((ckpt, model, tokenizer))
        loaded = load_sets(specs, runs[0][1].config.image_size)  # read once, for both checkpoints
        results = []
        for ckpt, model, tokenizer in runs:
            scalars, details = evaluate_sets(
                loaded,
                encode_image=Encoders.of(model).image,
                encode_text=Encoders.of(model).text,
                tokenize=tokenizer,
                batch_size=args.batch_size,
                image_size=model.config.image_size,
                preprocess=ImagePreprocess.of(model.config),
            )
            quantized = {"quantization": quantization(model)} if args.quantize is not None else {}
            results.append({"checkpoint": str(ckpt), **quantized, "metrics": scalars, "details": details})
    except (DataError, ValueError, FileNotFoundError, OSError) as e:  # ValueError: a bad spec or weights
        sys.exit(f"error: {e}")

    out = Path(args.out) if args.out else runs[0][0] / _default_out(args)
    result = results[0]
    if len(results) == 2:
        a, b = results[0]["metrics"], results[1]["metrics"]
        result = {**results[0], "compare": results[1], "difference": report.difference(a, b)}
        print(f"A: {results[0]['checkpoint']}\nB: {results[1]['checkpoint']}")
        print(report.table({"A": a, "B": b}, diff=True))
    else:
        print(report.table({"value": result["metrics"]}))
    try:
        report.write_json(out, result)
        pngs = report.write_confusions(out.parent, results[0]["details"])
        if len(results) == 2:
            pngs += report.write_confusions(out.parent, results[1]["details"], suffix="_B")
    except OSError as e:
        sys.exit(f"error: could not write {out} or its confusion PNGs ({e}); the table is printed above")
    print(f"wrote {out}" + "".join(f", {p.name}" for p in pngs))
    return result


def _own_val(args) -> dict:
    """The checkpoint on the held-out split of its own config (or --data), as JSON."""
    from .config import load_config
    from .data.run_data import build_run_data
    from .data.samples import DataError
    from .inference import load
    from .models.locate import resolve_checkpoint, verify_files
    from .models.quantize import quantization
    from .schema import ConfigError
    from .training.evaluate import evaluate

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        if not args.no_verify:
            verify_files(ckpt, hint="; --no-verify skips this check")
    except (FileNotFoundError, ValueError) as e:  # ValueError: WeightError, a damaged file
        sys.exit(f"error: {e}")
    # Evaluate on SRC in full: it becomes the held-out set, nothing of it is trained on.
    overrides = [("data.val", args.data)] if args.data else []
    try:
        cfg = load_config(ckpt / "config.yaml", overrides, log=None)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    mcfg = cfg.model_config()
    try:
        # mlx_clip.load: a LoRA checkpoint's base + adapters, the EMA weights, the quantization
        model, _, _ = load(
            ckpt, verify=False, quantize=args.quantize, group_size=args.group_size, ema=args.ema
        )
        data = build_run_data(cfg, mcfg, tokenizer_dir=ckpt, with_train=False)
        quantized = {"quantization": quantization(model)} if args.quantize is not None else {}
        metrics = {"checkpoint": str(ckpt), **quantized, **evaluate(model, data)}
    except (DataError, ValueError, OSError) as e:  # bad data (a worker's error too), or weights
        sys.exit(f"error: {e}")
    out = Path(args.out) if args.out else ckpt / _default_out(args)
    try:
        out.write_text(json.dumps(metrics, indent=1))
    except OSError as e:
        print(json.dumps(metrics, indent=1))
        sys.exit(f"error: could not write {out} ({e}); the metrics are printed above")
    print(json.dumps(metrics, indent=1))
    return metrics


def _default_out(args) -> str:
    return "eval_ema.json" if args.ema else "eval.json"


if __name__ == "__main__":
    main()
