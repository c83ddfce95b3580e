"""`python -m mlx_clip.export --checkpoint DIR --to hf|open_clip|torch_ref --out OUT`

Writes an mlx_clip checkpoint (a step_N directory, a checkpoints/ root or a run directory: its
latest checkpoint) in another framework's format:

  hf         config.json, model.safetensors, preprocessor_config.json and the tokenizer files:
             transformers.AutoModel / AutoTokenizer.from_pretrained(OUT), as CLIPModel for a
             CLIP-shaped model, as SiglipModel (logit_bias kept) for a SigLIP-shaped one. Not for a
             CLIP-shaped model with a logit_bias (CLIPModel has no bias parameter) or a mix of the two
  open_clip  open_clip_config.json + open_clip_model.safetensors: open_clip.create_model("local-dir:OUT")
             (see mlx_clip/interop/open_clip.py for the full recipe); carries a SigLIP logit_bias
  torch_ref  model.safetensors (the canonical file, copied), model.yaml, config.yaml and the tokenizer:
             torch_ref.load_weights(torch_ref.create_model("OUT/model.yaml"), "OUT/model.safetensors");
             model.yaml keeps init_logit_scale / init_logit_bias, so a SigLIP model has its logit_bias

--ema exports the EMA weights a run with train.ema_decay saved (ema.safetensors) instead of the
trained ones (model.safetensors).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml


def export_torch_ref(
    checkpoint: str | Path, out: str | Path, force: bool = False, ema: bool = False
) -> list[str]:
    """torch_ref reads canonical safetensors as they are: copy the file, write the architecture."""
    from .interop.files import read_checkpoint, staged_output  # noqa: PLC0415
    from .models.locate import checkpoint_weights  # noqa: PLC0415
    from .schema import to_dict  # noqa: PLC0415

    ckpt, cfg, _, tok = read_checkpoint(checkpoint, ema)  # validates config and weights
    with staged_output(out, force) as tmp:
        shutil.copyfile(checkpoint_weights(ckpt, ema), tmp / "model.safetensors")
        (tmp / "model.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if (ckpt / "config.yaml").is_file():
            shutil.copyfile(ckpt / "config.yaml", tmp / "config.yaml")
        if tok is not None:
            tok.save(tmp)
    return [f"from {ckpt}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_clip.export",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="step_N directory, checkpoints/ or run directory")
    parser.add_argument("--to", required=True, choices=("hf", "open_clip", "torch_ref"))
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT, an earlier output, as a whole (atomically)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checkpoint's checksums (state.json)"
    )
    parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights (ema.safetensors; train.ema_decay)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    # MLX loads only when the command runs (--help stays instant).
    try:
        if not args.no_verify:
            from .models.locate import resolve_checkpoint, verify_files  # noqa: PLC0415

            verify_files(resolve_checkpoint(args.checkpoint), hint="; --no-verify skips this check")
        if args.to == "hf":
            from .interop.hf import export_hf as run  # noqa: PLC0415
        elif args.to == "open_clip":
            from .interop.open_clip import export_open_clip as run  # noqa: PLC0415
        else:
            run = export_torch_ref
        notes = run(args.checkpoint, args.out, force=args.force, ema=args.ema)
    except (ValueError, OSError) as e:  # WeightError, ConfigError, missing / unreadable files
        sys.exit(f"error: {e}")
    for note in notes:
        print(note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
