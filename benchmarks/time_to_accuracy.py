"""Time to zero-shot accuracy: the default run trained by mlx_clip and by torch_ref.train, from one init.

    python -m benchmarks.time_to_accuracy [--steps 450] [--eval-every 25] [--target 0.9]
        [--backends mlx,torch_ref] [--workdir DIR] [--out FILE] [--timeout S] [--KEY.SUBKEY VALUE ...]

Both trainers run the same config (the defaults: `tiny` on the built-in data; --KEY.SUBKEY VALUE
overrides it for both, as on the trainers' own CLI), each in its own subprocess, one after the other:

    python -m mlx_clip.train  --out DIR/mlx       --steps N --eval.every K --model.init_from INIT ...
    python -m torch_ref.train --out DIR/torch_ref --steps N --eval.every K --model.init_from INIT ...

Same init: INIT is create_model(config, seed=train.seed) saved once by this script, the very weights
mlx_clip.train would start from on its own (so the mlx run is the default run, evaluated more often).
Same tokenizer and batches: both trainers build them with mlx_clip.data.run_data from the same config.

Every evaluation record of metrics.jsonl carries `elapsed_s` (seconds on the run's clock when it
began: summary.json's `seconds`, from set-up, data included) and `eval_s` (its own duration).
Training time at an evaluation = elapsed_s less the earlier evaluations' eval_s. Per trainer the JSON
keeps every evaluation (step, train_s, zero-shot top-1), the first reaching --target (step and
train_s; null if never), the final top-1, and the total time with and without evaluation, on the
run's clock and as the process's wall time (interpreter start and imports included). "others' CPU"
is the share of the machine other processes used while the trainer ran (common.contention).

The JSON goes to benchmarks/results/tta-<host>-<UTC date and time>.json (or --out); markdown tables are
printed. The run directories stay in --workdir (default runs/tta-<UTC date and time>).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlx_clip.run_args import dotted_overrides

from .common import (
    REPO_ROOT,
    RESULTS_DIR,
    contention,
    cpu_snapshot,
    machine_info,
    record_header,
    write_record,
)

SCHEMA = "mlx_clip.time_to_accuracy/1"
TRAINERS = {"mlx": "mlx_clip.train", "torch_ref": "torch_ref.train"}  # backend -> module run with -m
METRIC = "zeroshot_top1"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the benchmark's own arguments, the config overrides as `--KEY.SUBKEY VALUE` words)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.time_to_accuracy", description=__doc__.split("\n")[0]
    )
    p.add_argument("--steps", type=int, default=450, help="training steps (default 450, the default run's)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations (default 25)")
    p.add_argument("--target", type=float, default=0.9, help="zero-shot top-1 to reach (default 0.9)")
    p.add_argument(
        "--backends", default="mlx,torch_ref", help=f"comma-separated subset of {','.join(TRAINERS)}"
    )
    p.add_argument("--workdir", type=Path, default=None, help="run directories (default runs/tta-<time>)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per trainer (default 3600)")
    args, rest = p.parse_known_args(argv)
    if args.steps < 1 or args.eval_every < 1 or not 0 < args.target <= 1:
        p.error(f"--steps and --eval-every must be >= 1 and --target in (0, 1]; got {args.steps}, "
                f"{args.eval_every}, {args.target}")  # fmt: skip
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in TRAINERS]
    if unknown or not args.backends:
        p.error(f"--backends: unknown {unknown}; choose from {', '.join(TRAINERS)}")
    taken = {"train.steps": "--steps", "eval.every": "--eval-every"}
    overrides = dotted_overrides(p, rest)  # refuses anything that is not --section.key VALUE
    for key, _ in overrides:
        if key in taken:
            p.error(f"--{key}: set it with this script's {taken[key]}")
    return args, [word for key, value in overrides for word in (f"--{key}", value)]


def write_init(overrides: list[str], path: Path) -> dict:
    """The config's initial weights (create_model with train.seed, as mlx_clip.train builds them),
    saved to `path` for both trainers; a model.init_from among the overrides is used as it is."""
    from mlx_clip import create_model, save_weights
    from mlx_clip.config import load_config

    cfg = load_config(None, dotted_overrides(argparse.ArgumentParser(), overrides))
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
    else:  # (in a folder without a tokenizer: both trainers build the config's own tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(create_model(cfg.model_config(), seed=cfg.train.seed), path)
    weights = path if path.is_file() else path / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"init_from": str(path), "sha256": sha, "seed": cfg.train.seed, "arch": cfg.model.arch}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timeline(records: list[dict]) -> list[dict]:
    """One point per eval record: step, training seconds so far (evaluation left out), top-1."""
    points, evaluating = [], 0.0
    for r in records:
        if r.get("event") != "eval":
            continue
        if "elapsed_s" not in r:
            raise ValueError(
                f"the eval record at step {r.get('step')} has no elapsed_s: metrics.jsonl was written by "
                "a trainer older than this benchmark; train again with this checkout"
            )
        train_s = round(r["elapsed_s"] - evaluating, 3)
        points.append({"step": r["step"], "train_s": train_s, "eval_s": r["eval_s"], METRIC: r.get(METRIC)})
        evaluating += r["eval_s"]
    return points


def first_reaching(points: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target` (its step and training seconds), or None."""
    for p in points:
        if p[METRIC] is not None and p[METRIC] >= target:
            return {"step": p["step"], "train_s": p["train_s"]}
    return None


def summarize(backend: str, out: Path, wall_s: float, target: float) -> dict:
    """A finished trainer's record from its metrics.jsonl and summary.json."""
    points = timeline(read_jsonl(out / "metrics.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    eval_s = sum(p["eval_s"] for p in points)
    return {
        "evals": points,
        "target_reached": first_reaching(points, target),
        "final_top1": summary.get(METRIC),
        "final_top5": summary.get("zeroshot_top5"),
        "steps": summary["step"],
        "device": summary.get("device", "cpu"),  # torch_ref names its device; mlx_clip here runs on the CPU
        "run_s": summary["seconds"],  # the trainer's own clock: set-up to summary, evaluations included
        "eval_total_s": round(eval_s, 3),
        "run_without_eval_s": round(summary["seconds"] - eval_s, 3),
        "process_wall_s": round(wall_s, 3),  # interpreter start and imports included
        "process_wall_without_eval_s": round(wall_s - eval_s, 3),
    }


def run_trainer(backend: str, argv: list[str], out: Path, target: float, timeout: float) -> dict:
    """One trainer in its own process; its record, or one with `error` if it failed."""
    cmd = [sys.executable, "-m", TRAINERS[backend], "--out", str(out), *argv]
    record = {"backend": backend, "command": " ".join(cmd[1:]), "run_dir": str(out)}
    record["load_avg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"[{backend}] {record['command']}", file=sys.stderr, flush=True)
    before, started = cpu_snapshot(children=True), time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "error": f"timed out after {timeout:.0f} s"}
    wall_s = time.perf_counter() - started
    record["contention"] = contention(before, cpu_snapshot(children=True))
    if proc.returncode != 0 or not (out / "summary.json").is_file():
        return {**record, "error": f"{TRAINERS[backend]} exited with code {proc.returncode}; see above"}
    return {**record, **summarize(backend, out, wall_s, target)}


def compare(results: list[dict]) -> dict:
    """mlx against torch_ref: who reached the target first, and the ratios of the times."""
    by = {r["backend"]: r for r in results if "error" not in r}
    if not {"mlx", "torch_ref"} <= by.keys():
        return {}
    m, t = by["mlx"], by["torch_ref"]
    reached = {b: r["target_reached"]["train_s"] for b, r in by.items() if r["target_reached"]}
    out = {
        "first_to_target": min(reached, key=reached.get) if reached else None,
        "mlx_run_without_eval_le_torch_ref": m["run_without_eval_s"] <= t["run_without_eval_s"],
        "run_without_eval_ratio_torch_ref_over_mlx": round(
            t["run_without_eval_s"] / m["run_without_eval_s"], 3
        ),
    }
    if len(reached) == 2:
        out["time_to_target_ratio_torch_ref_over_mlx"] = round(reached["torch_ref"] / reached["mlx"], 3)
    return out


def _s(x) -> str:
    return "-" if x is None else f"{x:,.1f}"


def markdown_tables(doc: dict) -> str:
    s, results = doc["settings"], [r for r in doc["results"] if "error" not in r]
    target = f"{s['target']:.0%}"
    head = ["trainer", "device", f"step at {target}", f"train s to {target}", "final top-1"]
    head += ["train s (no eval)", "process wall s (no eval)", "process wall s", "others' CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        hit = r["target_reached"] or {}
        share = r["contention"]["others_share"] if r.get("contention") else None
        lines.append("| " + " | ".join([
            r["backend"], r["device"], str(hit.get("step", "not reached")), _s(hit.get("train_s")),
            f"{r['final_top1']:.3f}", _s(r["run_without_eval_s"]), _s(r["process_wall_without_eval_s"]),
            _s(r["process_wall_s"]), "-" if share is None else f"{100 * share:.0f}%",
        ]) + " |")  # fmt: skip
    # the curves side by side: training seconds and top-1 at every evaluation
    curve_head = ["step"] + [f"{r['backend']} {c}" for r in results for c in ("train s", "top-1")]
    lines += ["", "| " + " | ".join(curve_head) + " |", "|" + "---|" * len(curve_head)]
    at = [{p["step"]: p for p in r["evals"]} for r in results]
    for step in sorted({p["step"] for r in results for p in r["evals"]}):
        cells = [str(step)]
        for points in at:
            p = points.get(step)
            cells += [_s(p["train_s"]), f"{p[METRIC]:.3f}"] if p else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime())
    workdir = args.workdir or REPO_ROOT / "runs" / f"tta-{stamp}"
    taken = [workdir / b for b in args.backends if (workdir / b).exists()]
    if taken:
        sys.exit(f"error: {taken[0]} exists: pass a new --workdir (the trainers refuse a used run directory)")
    init = write_init(overrides, workdir / "init" / "model.safetensors")
    common = ["--steps", str(args.steps), "--eval.every", str(args.eval_every), "--train.progress", "false",
              "--model.init_from", init["init_from"], *overrides]  # fmt: skip
    settings = {k: getattr(args, k) for k in ("steps", "eval_every", "target", "backends")}
    settings.update(overrides=overrides, init=init, workdir=str(workdir))
    doc = {**record_header(SCHEMA), "settings": settings, "results": []}
    for backend in args.backends:  # one after the other: no trainer shares the CPU with the other
        doc["results"].append(run_trainer(backend, common, workdir / backend, args.target, args.timeout))
    doc["comparison"] = compare(doc["results"])
    host = machine_info()["host"].split(".")[0]
    out = args.out or RESULTS_DIR / f"tta-{host}-{stamp}.json"
    write_record(doc, out, markdown_tables(doc), json.dumps(doc["comparison"]))
    return doc


if __name__ == "__main__":
    main()
