"""The arguments of a training run's CLI, framework-free: `python -m mlx_clip.train` and
`python -m torch_ref.train` take the same ones.

    [--config FILE] [--out DIR] [--steps N] [--resume [--resume-changed]] [--stop-after K]
    [--KEY.SUBKEY VALUE ...]
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 step, got {value}")
    return value


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
        "--resume-changed",
        action="store_true",
        help="with --resume: accept changed data, batch size, model or loss settings, which --resume "
        "refuses because the result can no longer match an uninterrupted run; training continues from "
        "the same sample position (epoch and sample index) with the new settings",
    )
    parser.add_argument(
        "--stop-after",
        type=positive_int,
        help="stop (with a checkpoint) after this many steps in this call",
    )
    args, rest = parser.parse_known_args(argv)
    if args.resume_changed and not args.resume:
        parser.error("--resume-changed only applies to --resume (add --resume)")
    overrides = dotted_overrides(parser, rest)
    if args.steps is not None:
        overrides.append(("train.steps", str(args.steps)))
    return args, overrides


def dotted_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> list[tuple[str, str]]:
    """`--section.key VALUE` / `--section.key=VALUE` arguments -> [(dotted key, value)]."""
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
    return overrides
