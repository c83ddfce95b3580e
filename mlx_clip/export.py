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
  mlx_clip   (with --merge) a plain mlx_clip checkpoint: model.safetensors, config.yaml, tokenizer

--merge takes a LoRA run's checkpoint (adapters + a reference to its base): it loads the base
(checked against its sha256), folds the adapters into its weights (a QLoRA base is dequantized
first) and exports the merged model like any checkpoint.

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


def merge_checkpoint(
    checkpoint: str | Path, out: str | Path, force: bool = False, ema: bool = False
) -> list[str]:
    """A LoRA checkpoint (`ema`: its EMA adapters) -> a plain mlx_clip checkpoint at OUT, the adapters
    folded into the base."""
    import dataclasses  # noqa: PLC0415

    from .config import config_to_yaml, load_config  # noqa: PLC0415
    from .interop.files import staged_output  # noqa: PLC0415
    from .models.adapters import load_model  # noqa: PLC0415
    from .models.locate import checkpoint_weights, resolve_checkpoint  # noqa: PLC0415
    from .models.lora import merge_lora  # noqa: PLC0415
    from .models.lora_config import FinetuneConfig  # noqa: PLC0415
    from .models.weights import save_weights  # noqa: PLC0415
    from .text.tokenizer import CONFIG_FILE  # noqa: PLC0415
    from .text.vocab import load_saved  # noqa: PLC0415

    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config(ckpt / "config.yaml", log=None)
    model = load_model(cfg.model_config(), checkpoint_weights(ckpt, ema))
    if model.lora is None:
        raise ValueError(f"{ckpt} is not a LoRA checkpoint (no adapters to merge): export it without --merge")
    base = model.lora.path
    notes = merge_lora(model)
    with staged_output(out, force) as tmp:
        save_weights(model, tmp / "model.safetensors")
        plain = dataclasses.replace(cfg, finetune=FinetuneConfig())  # the merged model is a plain CLIP
        (tmp / "config.yaml").write_text(config_to_yaml(plain))
        if (ckpt / CONFIG_FILE).is_file():
            load_saved(ckpt).save(tmp)
    return [f"from {ckpt} on base {base}", *notes]


def export(
    checkpoint: str, to: str, out: str, force: bool = False, merge: bool = False, ema: bool = False
) -> list[str]:
    """One export (`ema`: the EMA weights); with `merge` the LoRA checkpoint is merged first (into OUT
    itself for mlx_clip)."""
    import tempfile  # noqa: PLC0415

    from .models.adapters import lora_reference  # noqa: PLC0415
    from .models.locate import resolve_checkpoint  # noqa: PLC0415

    if not merge:
        if to == "mlx_clip":
            raise ValueError("--to mlx_clip writes a merged LoRA checkpoint: add --merge")
        if lora_reference(resolve_checkpoint(checkpoint) / "model.safetensors") is not None:
            raise ValueError(
                f"{checkpoint} is a LoRA checkpoint (adapters only): add --merge to fold them into the base"
            )
    if to == "mlx_clip":
        return merge_checkpoint(checkpoint, out, force, ema)
    if to == "hf":
        from .interop.hf import export_hf as run  # noqa: PLC0415
    elif to == "open_clip":
        from .interop.open_clip import export_open_clip as run  # noqa: PLC0415
    else:
        run = export_torch_ref
    if not merge:
        return run(checkpoint, out, force=force, ema=ema)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        notes = merge_checkpoint(checkpoint, merged, ema=ema)
        return notes + [n for n in run(merged, out, force=force) if str(merged) not in n]  # not the temp dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_clip.export",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="step_N directory, checkpoints/ or run directory")
    parser.add_argument("--to", required=True, choices=("hf", "open_clip", "torch_ref", "mlx_clip"))
    parser.add_argument(
        "--merge", action="store_true", help="a LoRA checkpoint: fold the adapters into the base"
    )
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
        notes = export(args.checkpoint, args.to, args.out, force=args.force, merge=args.merge, ema=args.ema)
    except (ValueError, OSError) as e:  # WeightError, ConfigError, missing / unreadable files
        sys.exit(f"error: {e}")
    for note in notes:
        print(note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
