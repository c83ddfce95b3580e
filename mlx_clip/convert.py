"""`python -m mlx_clip.convert --from hf|open_clip SRC --out DIR`: import a foreign checkpoint.

A thin CLI over mlx_clip/interop/ (hf.py, open_clip.py), where every layout and key change lives.
"""

from __future__ import annotations

import argparse
import sys

USAGE = """Convert a Hugging Face or open_clip CLIP / SigLIP checkpoint into an mlx_clip checkpoint directory
(model.safetensors, config.yaml and the tokenizer files where the source has a tokenizer), which
`--model.init_from DIR`, `python -m mlx_clip.eval --checkpoint DIR` and `mlx_clip.export` read.

  hf         SRC is a transformers CLIPModel or SiglipModel directory: config.json +
             model.safetensors (or pytorch_model.bin, read with torch.load(weights_only=True)); the
             tokenizer: vocab.json + merges.txt, tokenizer.json or spiece.model
  open_clip  SRC is a directory with open_clip_config.json + open_clip_model.safetensors (or
             open_clip_pytorch_model.bin), or a state dict file (.safetensors/.bin/.pt) with --arch
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_clip.convert",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="source", required=True, choices=("hf", "open_clip"))
    parser.add_argument("src", help="source directory or weights file")
    parser.add_argument("--out", required=True, help="mlx_clip checkpoint directory to write")
    parser.add_argument(
        "--arch",
        help="open_clip only: an open_clip model name (ViT-B-32-quickgelu), a model_cfg .json file or "
        "an mlx_clip architecture; required for a plain state dict, overrides open_clip_config.json",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT, an earlier output, as a whole (atomically)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.arch and args.source != "open_clip":
        parser.error("--arch applies to --from open_clip only")

    # The converters import MLX (and torch for .bin files) only when the command runs.
    try:
        if args.source == "hf":
            from .interop.hf import import_hf  # noqa: PLC0415

            notes = import_hf(args.src, args.out, force=args.force)
        else:
            from .interop.open_clip import import_open_clip  # noqa: PLC0415

            notes = import_open_clip(args.src, args.out, arch=args.arch, force=args.force)
    except (ValueError, OSError) as e:  # WeightError, ConfigError, missing / unreadable files
        sys.exit(f"error: {e}")
    for note in notes:
        print(note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
