"""Training-step time at lower image sizes than the model's (data.resolution_schedule), in one process.

    python -m benchmarks.resolution_step [--arch vit_b16] [--batch 32] [--sizes 112,224] [--steps 3]
                                         [--rounds 2] [--out FILE]

One build_training (the step a run trains, MLX on this machine's default device), then per round
every size in turn: one untimed step (the first at a size traces its compiled step), then --steps
timed ones, each evaluated as the training loop does. Rounds interleave the sizes, so on a shared
machine their ratio is fairer than their absolute times; the JSON keeps every step's time, the
table the median per size and its ratio to the native size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mlx_clip.models.config import model_config

from .common import RESULTS_DIR, contention, cpu_snapshot, record_header, synthetic_batch, write_record


def time_sizes(arch: str, batch: int, sizes: list[int], steps: int, rounds: int) -> dict:
    import mlx.core as mx  # after mlx_clip (imported above): OpenBLAS is bound first

    from mlx_clip.config import Config
    from mlx_clip.models import streams
    from mlx_clip.training.build import build_training

    cfg = model_config(arch)
    run = Config()
    run.train.deterministic = False  # as benchmarks/train_throughput.py: BLAS on every thread
    n_streams = streams.resolve("auto")
    streams.setup_process(n_streams, run.train.grad_checkpointing, run.train.deterministic)
    training = build_training(run, n_streams=n_streams, mcfg=cfg)
    images_np, tokens_np = synthetic_batch(cfg, batch)
    tokens = mx.array(tokens_np)
    times: dict[int, list[float]] = {s: [] for s in sizes}
    before = cpu_snapshot()
    for _ in range(rounds):
        for size in sizes:
            # the native batch's top-left corner: only the shape matters for the time
            images = mx.array(images_np[:, :size, :size])
            for i in range(steps + 1):
                t = time.perf_counter()
                mx.eval(training.state, *training.run_step(images, tokens, i))
                if i:  # the first is untimed: it traces the compiled step in the first round
                    times[size].append(time.perf_counter() - t)
    return {"native": cfg.image_size, "streams": n_streams, "times": times,
            "contention": contention(before, cpu_snapshot())}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sizes", default="112,224", help="comma-separated image sizes (the native one last)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per size and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    record = {**record_header("resolution_step/1"), "arch": args.arch, "batch": args.batch}
    record.update(time_sizes(args.arch, args.batch, sizes, args.steps, args.rounds))
    native = statistics.median(record["times"][record["native"]]) if record["native"] in sizes else None
    print(f"| {args.arch} batch {args.batch} | size | median step (s) | vs native |\n|---|---|---|---|")
    for size in sizes:
        med = statistics.median(record["times"][size])
        ratio = f"{med / native:.2f}" if native else "-"
        print(f"| | {size} px | {med:.2f} | {ratio} |")
    out = args.out or RESULTS_DIR / f"resolution-{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_record(record, out)
    return record


if __name__ == "__main__":
    main()
