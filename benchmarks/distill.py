"""Distillation on the built-in data: does a student trained with loss.distill reach a higher
zero-shot top-1 after N steps than the same student without it?

    python -m benchmarks.distill [--teacher CKPT | --teacher-steps 300] [--steps 150] [--seed 0]
        [--weight 1.0] [--temperature T] [--out DIR] [--student.KEY VALUE ...]

1. the teacher: --teacher CKPT, or the default run (`tiny`, built-in data) trained --teacher-steps;
2. `python -m mlx_clip.embed` of the students' built-in training data with it;
3. two students from the same seed for --steps, with and without loss.distill (weight, temperature);
   --student.KEY VALUE is a config override for both (e.g. --student.model.vision_layers 2);
4. prints (and writes to benchmarks/results/) one JSON record: zero-shot top-1 / top-5 on the
   built-in held-out images of the teacher and both students, and the wall time of every stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import RESULTS_DIR, record_header


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher checkpoint (default: train the default run)")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="student steps")
    p.add_argument("--seed", type=int, default=0, help="the students' train.seed")
    p.add_argument("--weight", type=float, default=1.0, help="loss.distill.weight")
    p.add_argument("--temperature", type=float, help="loss.distill.temperature (default: the teacher's)")
    p.add_argument("--out", default="runs/bench-distill", help="working directory")
    args, rest = p.parse_known_args(argv)
    student = []
    for i in range(0, len(rest), 2):  # --student.section.key VALUE
        if not rest[i].startswith("--student.") or i + 1 >= len(rest):
            p.error(
                f"unrecognized argument {rest[i]!r} (student overrides look like --student.optim.lr 3e-4)"
            )
        student += ["--" + rest[i][len("--student.") :], rest[i + 1]]
    return args, student


def _train(out: Path, *argv: str) -> tuple[dict, float]:
    from mlx_clip.train import main as train_main

    started = time.perf_counter()
    summary = train_main(["--out", str(out), "--eval.every", "0", "--train.progress", "false", *argv])
    return summary, time.perf_counter() - started


def _scores(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "val_loss")}


def main(argv=None) -> dict:
    args, student = parse_args(argv)
    from mlx_clip.config import load_config
    from mlx_clip.embedding import embed
    from mlx_clip.run_args import dotted_overrides

    out = Path(args.out)
    record = record_header("distill")
    record["args"] = {**vars(args), "student": student}
    teacher = args.teacher
    if teacher is None:
        summary, seconds = _train(out / "teacher", "--steps", str(args.teacher_steps))
        teacher = str(out / "teacher")
        record["teacher"] = {"steps": args.teacher_steps, "seconds": round(seconds, 1), **_scores(summary)}
    common = ["--steps", str(args.steps), "--train.seed", str(args.seed), *student]
    cfg = load_config(None, dotted_overrides(argparse.ArgumentParser(), student))
    started = time.perf_counter()
    index = embed(teacher, cfg, out / "embeddings")
    record["embed"] = {"seconds": round(time.perf_counter() - started, 1), "samples": index["samples"]}
    record["embed"]["teacher_logit_scale"] = index["logit_scale"]
    distill = [
        "--loss.distill.embeddings",
        str(out / "embeddings"),
        "--loss.distill.weight",
        str(args.weight),
    ]
    if args.temperature:
        distill += ["--loss.distill.temperature", str(args.temperature)]
    for name, extra in (("baseline", []), ("distilled", distill)):
        summary, seconds = _train(out / name, *common, *extra)
        record[name] = {"steps": args.steps, "seconds": round(seconds, 1), **_scores(summary)}
    record["gain_top1"] = record["distilled"]["zeroshot_top1"] - record["baseline"]["zeroshot_top1"]
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"distill-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
