"""`python -m mlx_clip.predict --checkpoint DIR (--images ... --labels ... | --index FOLDER --query ...)`

Zero-shot classification of images against text labels, or text search over a folder of images.

  zero-shot  --images A.jpg B.png --labels cat "a dog" "a red car." [--templates default|none|builtin|T ...]
             prints each image's labels by probability. A CLIP model (softmax loss): the softmax over
             the labels of logit_scale x cosine, an image's probabilities summing to 100%. A SigLIP
             model (loss.type siglip, which has a logit_bias): each label's own sigmoid(logit_scale x
             cosine + logit_bias), independent of the other labels, so they need not sum to 100% (no
             label may fit, or several). A bare class name ("cat") is ensembled over CLIP-style prompt
             templates, a label with its own article ("a dog") takes the templates' article, and a
             sentence ("a red car.") is used as it is;
             `--templates none` uses every label as it is, `builtin` the built-in dataset's templates,
             and any other values are templates with a "{}" for the label.
  search     --index FOLDER --query "a red circle" ["a blue square" ...] ranks the images below FOLDER
             (recursive; jpg, png, webp, bmp, gif, tif) by cosine similarity to each query. Image
             embeddings are cached in FOLDER/.mlx_clip_index/ (or --cache DIR), per model, and
             refreshed incrementally: only new or changed files are embedded.

`--quantize 4|8` (with `--group-size`, default 64) quantizes the model's linear layers after
loading: less memory, slightly different embeddings, cached apart from the float model's.

`--json` prints the results as one JSON object instead of tables ("probability": "softmax" or
"sigmoid" says which of the two the probabilities are). Unreadable images are an error in
zero-shot mode and skipped with a warning in search mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

TEMPLATE_HELP = "'default' (CLIP-style), 'none' (labels as they are), 'builtin' (shapes dataset) or templates"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlx_clip.predict",
        description=__doc__.split("\n\n")[1],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="step_N directory, checkpoints/ or run directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--images", nargs="+", metavar="PATH", help="images to classify (zero-shot)")
    mode.add_argument("--index", metavar="FOLDER", help="folder of images to search")
    p.add_argument("--labels", nargs="+", help="class names or prompts (zero-shot)")
    p.add_argument("--templates", nargs="+", default=["default"], help=TEMPLATE_HELP)
    p.add_argument("--query", nargs="+", help="one or more search texts (search)")
    p.add_argument("--cache", metavar="DIR", help="search index location (default: FOLDER/.mlx_clip_index)")
    p.add_argument("--top", type=int, help="results shown per image / query (default 5 / 10)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums (state.json)")
    p.add_argument("--quantize", type=int, metavar="BITS", help="quantize the linear layers to 4 or 8 bits")
    p.add_argument("--group-size", type=int, default=64, help="inputs per quantization group (32, 64, 128)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.images and not args.labels:
        p.error("--images needs --labels")
    if args.index and not args.query:
        p.error("--index needs --query")
    if args.labels and len(set(args.labels)) != len(args.labels):
        p.error("--labels has duplicates")
    if args.top is not None and args.top < 1 or args.batch_size < 1:
        p.error("--top and --batch-size must be >= 1")
    try:
        args.templates = resolve_templates(args.templates)
    except ValueError as e:
        p.error(str(e))
    return args


def resolve_templates(spec: list[str]) -> tuple[str, ...]:
    from .inference import DEFAULT_TEMPLATES

    if spec == ["default"]:
        return DEFAULT_TEMPLATES
    if spec == ["none"]:
        return ()
    if spec == ["builtin"]:
        from .data.synthetic_captions import TEMPLATES

        return tuple(TEMPLATES)
    bad = [t for t in spec if "{}" not in t]
    if bad:
        raise ValueError(f"--templates: {bad[0]!r} has no '{{}}' for the label ({TEMPLATE_HELP})")
    return tuple(spec)


def zero_shot(args, model, tokenizer, preprocess) -> dict:
    from .inference import encode_images, probability_kind, prompts_for, zero_shot_probs

    top = args.top or 5
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
    feats = encode_images(model, preprocess, args.images, args.batch_size)
    probs = zero_shot_probs(model, tokenizer, feats, args.labels, args.templates)
    results = []
    for path, row in zip(args.images, probs, strict=True):
        order = sorted(range(len(args.labels)), key=lambda j: -row[j])
        results.append(
            {
                "image": path,
                "probs": {label: float(p) for label, p in zip(args.labels, row, strict=True)},
                "top": [{"label": args.labels[j], "prob": float(row[j])} for j in order[:top]],
            }
        )
    prompts = {label: prompts_for(label, args.templates) for label in args.labels}
    return {
        "mode": "zero_shot",
        "probability": probability_kind(model),
        "templates": list(args.templates),
        "prompts": prompts,
        "results": results,
    }


def search(args, model, tokenizer, preprocess, ckpt: Path) -> dict:
    from .inference import encode_texts, index_folder
    from .models.locate import model_sha256

    digest = model_sha256(ckpt, verified=not args.no_verify)  # load() has just checked it, unless told not to
    index = index_folder(model, preprocess, args.index, digest, args.cache, args.batch_size)
    queries = []
    for query, text in zip(args.query, encode_texts(model, tokenizer, args.query), strict=True):
        hits = index.search(text, args.top or 10)
        queries.append(
            {"query": query, "results": [{"path": str(index.root / p), "score": s} for p, s in hits]}
        )
    return {
        "mode": "search",
        "folder": str(index.root),
        "images": len(index.paths),
        "index": {
            "cache": str(index.cache_file) if index.cache_file else None,
            "embedded": index.embedded,
            "reused": index.reused,
            "removed": index.removed,
            "skipped": [str(index.root / p) for p in index.skipped],
        },
        "queries": queries,
    }


def print_zero_shot(out: dict) -> None:
    for r in out["results"]:
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['prob']:6.2f}%  {t['label']}")


def print_search(out: dict) -> None:
    ix = out["index"]
    print(
        f"{out['images']} images in {out['folder']} ({ix['embedded']} embedded, {ix['reused']} reused, "
        f"{ix['removed']} removed, {len(ix['skipped'])} skipped)"
    )
    for q in out["queries"]:
        print(f"\nquery: {q['query']}")
        if not q["results"]:
            print("  (no images)")
        for rank, r in enumerate(q["results"], 1):
            print(f"  {rank:3d}  {r['score']:+.4f}  {r['path']}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from .data.samples import DataError
    from .inference import load
    from .models.locate import resolve_checkpoint
    from .schema import ConfigError

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # "warning: <path>: ..." lines, not Python locations
        try:
            ckpt = resolve_checkpoint(args.checkpoint)
            model, tokenizer, preprocess = load(
                ckpt, verify=not args.no_verify, quantize=args.quantize, group_size=args.group_size
            )
            if args.images:
                out = zero_shot(args, model, tokenizer, preprocess)
            else:
                out = search(args, model, tokenizer, preprocess, ckpt)
        except (OSError, DataError, ConfigError, ValueError) as e:
            sys.exit(f"error: {e}")
    from .models.quantize import quantization

    out = {"checkpoint": str(ckpt), "quantization": quantization(model), **out}
    if args.json:
        print(json.dumps(out, indent=1))
    elif args.images:
        print_zero_shot(out)
    else:
        print_search(out)
    return out


if __name__ == "__main__":
    main()
