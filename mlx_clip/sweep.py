"""`python -m mlx_clip.sweep --config base.yaml --space space.yaml --trials N [--study NAME]
[--storage sqlite:///runs/sweeps.db] [--workers K] [--metric M] [--trial-steps S] [--trial-seconds T]
[--pruner median|hyperband|none] [--resume] [--report]`

Hyperparameter search with Optuna (TPE, seeded; median or Hyperband pruning on each trial's
evaluations). Each trial is a normal run directory runs/<study>/trial_<n>/; at the end: the table
of trials, runs/<study>/best.yaml and runs/<study>/plots/*.png. The library is mlx_clip/tuning/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .run_args import positive_int


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_clip.sweep", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", help="base run config (YAML); default: built-in defaults")
    p.add_argument("--space", help="search space (YAML): {config.key: {type: float|int|categorical, ...}}")
    p.add_argument("--trials", type=positive_int, help="finish this many trials (interrupted ones are rerun)")
    p.add_argument("--study", help="study name (default: sweep-<timestamp>)")
    p.add_argument("--storage", default="sqlite:///runs/sweeps.db", help="Optuna storage URL")
    p.add_argument("--workers", type=positive_int, default=1, help="trials run at the same time")
    p.add_argument("--out", help="where trial_<n>/, best.yaml and plots/ go (default: runs/<study>)")
    p.add_argument(
        "--metric", help="objective: an eval metric or NAME/metric (default: eval.best, else zeroshot_top1)"
    )
    p.add_argument("--trial-steps", type=positive_int, help="train.steps of each trial")
    p.add_argument(
        "--trial-seconds", type=float, help="stop a trial after this long; its value is its last evaluation"
    )
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    p.add_argument(
        "--pruner-warmup", type=int, default=0, help="median: no pruning before this training step"
    )
    p.add_argument(
        "--pruner-startup", type=int, default=2, help="median: finished trials before pruning starts"
    )
    p.add_argument("--resume", action="store_true", help="continue the study --study in --storage")
    p.add_argument("--report", action="store_true", help="only write the table, best.yaml and plots")
    args = p.parse_args(argv)
    if (args.resume or args.report) and not args.study:
        p.error("--resume and --report need --study NAME")
    if not (args.resume or args.report) and not (args.space and args.trials):
        p.error("a new sweep needs --space FILE and --trials N")
    if args.resume and not args.trials:
        p.error("--resume needs --trials N (the total to reach)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import optuna  # (after the arguments: --help works without the sweep extra)

    from .config import load_config
    from .schema import ConfigError
    from .tuning.report import write_report
    from .tuning.space import SpaceError
    from .tuning.study import Settings, SweepError, fail_interrupted, open_study, run_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    name = args.study or time.strftime("sweep-%Y%m%d-%H%M%S")
    settings = None
    try:
        if not (args.resume or args.report):
            metric = args.metric or default_metric(load_config(args.config, log=None))
            settings = Settings(
                config=str(absolute(args.config)) if args.config else None,
                space=str(absolute(args.space)),
                metric=metric,
                out=str(absolute(args.out or f"runs/{name}")),
                trial_steps=args.trial_steps,
                trial_seconds=args.trial_seconds,
                seed=args.seed,
                pruner=args.pruner,
                pruner_warmup=args.pruner_warmup,
                pruner_startup=args.pruner_startup,
            )
        study = open_study(args.storage, name, settings, resume=args.resume or args.report)
        if args.resume:
            for number in fail_interrupted(study):
                print(f"trial {number}: interrupted by a killed sweep; failed, its values queued again")
        if not args.report:
            print(f"study {name} in {args.storage}", flush=True)
            run_sweep(study, args.trials, args.workers)
    except (SweepError, SpaceError, ConfigError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: continue with --study {name} --resume --trials {args.trials}")
    write_report(study)


def default_metric(cfg) -> str:
    return cfg.eval.best if cfg.eval.best != "auto" else "zeroshot_top1"


def absolute(path: str) -> Path:
    return Path(path).resolve()  # the study keeps its paths: --resume may run from elsewhere


if __name__ == "__main__":
    main()
