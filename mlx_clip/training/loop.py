"""The training loop: set-up, the step loop and finish, around one Run object.

    train(cfg, out)  ->  claim OUT (run_dir.py: one process, one run per directory)
                     ->  setup(): data, what changed since a resumed checkpoint (resume.py),
                         the eval sets (eval.sets), model + optimizer + compiled step (build.py),
                         run state
                     ->  run_steps(): step, log, evaluate and checkpoint on schedule
                     ->  finish(): final evaluation, checkpoint, curves, summary.json

Under mlx.launch every rank runs this; rank 0 alone reads and writes `out` (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import Config, config_to_yaml
from ..data import checks
from ..data.run_data import RunData, build_run_data, fingerprints
from ..evaluation.spec import lower_is_better
from ..models import streams
from ..models.locate import resolve_init
from ..models.model import LOGIT_SCALE_MAX
from ..models.weights import load_init_weights
from ..schema import parse_yaml
from . import checkpoint as ckpt_io
from . import run_dir
from .autobatch import find_batch_size
from .build import Training, build_training
from .distill import Teacher, load_teacher
from .distributed import World, init_world, pack_dir, unpack_dir
from .evaluate import evaluate, evaluate_eval_sets, load_eval_sets, pick_best_metric
from .logging import Logger, Throughput, memory_mb, write_curves, write_eval_sets, write_summary
from .optim_rules import lr_at
from .resume import check_config, check_data, check_init_preprocessing, continue_position, restore
from .state import RunState, config_hash, new_run_id


class OutOfMemoryError(RuntimeError):
    """An allocation failed in a training step; the message says what to change."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: training stopped, the last good checkpoint kept."""


@dataclass
class Run:
    """A training run in progress: what setup() made, shared by the step loop and finish()."""

    cfg: Config
    out: Path
    world: World
    data: RunData
    training: Training
    state: RunState
    config_yaml: str
    logger: Logger | None  # rank 0 only
    skip_log: checks.SkipLog | None  # own data only
    started: float
    eval_sets: list  # eval.sets read once (evaluation/suite.LoadedSet); rank 0 only
    teacher: Teacher | None = None  # loss.distill: the teacher's rows per training sample

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def train(
    cfg: Config, out: Path, resume: bool = False, stop_after: int | None = None, resume_changed: bool = False
) -> dict:
    """Train per `cfg` into `out`; returns the final evaluation metrics and run summary.
    `resume_changed`: resume even if data, batch size, model or loss changed (resume.py)."""
    n_streams = streams.resolve(cfg.train.streams)  # once per run, passed down as a number
    # Before anything is evaluated: BLAS threads and MLX's evaluation width (streams.py).
    streams.setup_process(n_streams, cfg.train.grad_checkpointing, cfg.train.deterministic)
    world = init_world(cfg.train.dist_timeout, cfg.train.dist_bucket_mb)  # a world of one: no-ops
    with run_dir.claim(out, resume, world):  # refused, or OUT locked until the run ends
        run = setup(cfg, out, world, resume, n_streams, resume_changed)
        skipped = run_steps(run, stop_after)
        return world.on_main(lambda: finish(run, skipped), "evaluating and saving the final checkpoint")


# ---------------------------------------------------------------------------
# Set-up


def setup(cfg: Config, out: Path, world: World, resume: bool, n_streams: int, resume_changed: bool) -> Run:
    """Everything before the first step: data, model, optimizer, compiled step, restored state.
    Resuming, OUT's own files are rewritten only once the checkpoint has been restored."""
    skip_log = open_skip_log(cfg, out, world, resume)
    if cfg.data.batch_size == "auto":
        batch = resolve_auto_batch(cfg, world, out / "checkpoints", resume, n_streams)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
    started = time.perf_counter()
    config_yaml = config_to_yaml(cfg)
    data, resume_dir, init_weights = load_data(cfg, out, world, resume, skip_log, config_yaml, resume_changed)
    world.check_same({"config": config_hash(config_yaml), "training samples": str(data.train.num_samples)})
    print(f"data: {data.describe()} ({time.perf_counter() - started:.1f}s)", flush=True)
    for source in data.sources:  # a mixture: samples, skipped, weight and expected share of each
        print(f"  {source.describe()}", flush=True)
    eval_sets = []  # rank 0 evaluates alone; a bad set stops every rank here, before step 1
    world.on_main(lambda: eval_sets.extend(load_eval_sets(cfg, skip_log)), "reading the eval sets")
    if world.size > 1:
        per_rank = cfg.data.batch_size // world.size
        print(f"data parallel: {world.size} ranks x {per_rank} = global batch {cfg.data.batch_size}")
    if len(data.train) == 0:
        raise ValueError(
            f"the training set has fewer samples than one global batch ({cfg.data.batch_size}); "
            "lower data.batch_size or add data"
        )
    state = RunState(
        seed=cfg.train.seed,
        world_size=world.size,
        config_hash=config_hash(config_yaml),
        batch_size=cfg.data.batch_size,
        run_id=new_run_id(),
        data=fingerprints(cfg, data) if world.is_main else {},
    )
    world.on_main(lambda: check_data(resume_dir, state.data, resume_changed), "checking the data")

    def prepare(model, optimizer):  # weights and position before the step is compiled
        restored = world.on_main(lambda: restore(resume_dir, model, optimizer, world), "restoring")
        if restored is not None:
            continue_position(state, restored, len(data.train))
        elif init_weights is not None and model.lora is None:  # (a LoRA base loads in build_training)
            load_init_weights(model, init_weights)
            print(f"initialised from {init_weights}", flush=True)
        if world.size > 1:  # every rank starts from rank 0's weights and optimizer state
            # (a LoRA base is read from the same file by every rank: only what trains is sent)
            sent = model.parameters() if model.lora is None else model.trainable_parameters()
            model.update(world.broadcast_tree(sent))
            optimizer.state = world.broadcast_tree(optimizer.state)
        # Batches are a pure function of (seed, epoch, index) (data/pipeline.py) and the compiled
        # step draws no random numbers, so resuming is exact; anything random later is keyed on
        # (seed, step).
        mx.random.seed(cfg.train.seed * 1_000_003 + state.step)

    teacher = load_teacher(cfg, data.train, world.size)
    if teacher is not None:
        print(f"distilling from {teacher.source}, teacher logit scale {teacher.scale:.4g}", flush=True)
    scale = teacher.scale if teacher is not None else None
    training = build_training(cfg, world, n_streams, cfg.model_config(), prepare, teacher_scale=scale)
    if training.ema is not None:  # the resumed run's EMA (rank 0 reads it; every rank gets it)
        world.on_main(lambda: resume_dir and ckpt_io.load_ema(resume_dir, training.ema), "restoring the EMA")
        if world.size > 1:
            training.ema.state.update(tree_flatten(world.broadcast_tree(training.ema.tree())))
    training.temperature.load_state_dict(state.temperature)
    report_locked(training)
    if world.is_main:  # restored: from here on the run is this config's
        (out / "config.yaml").write_text(config_yaml)
        if skip_log is not None:
            skip_log.release()
    logger = (
        Logger(out, cfg.train.steps, cfg.train.progress, cfg.train.tensorboard) if world.is_main else None
    )
    return Run(
        cfg, out, world, data, training, state, config_yaml, logger, skip_log, started, eval_sets, teacher
    )


def open_skip_log(cfg: Config, out: Path, world: World, resume: bool) -> checks.SkipLog | None:
    """Own data: every skipped item goes to OUT/skipped.jsonl (rank 0; other ranks to a temp file).
    Resuming, the lines are held in memory until the checkpoint is restored (setup releases
    them), so a refused resume leaves the run's skipped.jsonl as it was."""
    if cfg.data.train == "builtin" and not cfg.data.val and not cfg.eval.sets:
        return None
    path = out / "skipped.jsonl" if world.is_main else Path(tempfile.mkdtemp()) / "skipped.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return checks.SkipLog(path, hold=resume and world.is_main)


def load_data(
    cfg: Config, out: Path, world: World, resume: bool, skip_log, config_yaml: str, resume_changed: bool
) -> tuple:
    """(the run's data, the checkpoint to resume or None, initial weights or None). Rank 0 reads the
    disk and trains or loads the tokenizer; the other ranks build the same data with its tokenizer.
    Resuming, a refused config change stops here, before the data is read (resume.py)."""
    mcfg = cfg.model_config()
    found = {}

    def on_main():
        found["resume"] = ckpt_io.find_resumable(out / "checkpoints") if resume else None
        check_config(found["resume"], config_yaml, resume_changed)
        found["init"], init_tokenizer = resolve_init(cfg.model.init_from)
        check_init_preprocessing(cfg, found["init"])
        tokenizer_dir = found["resume"] or init_tokenizer
        found["data"] = build_run_data(cfg, mcfg, tokenizer_dir, world.rank, world.size, skip_log=skip_log)
        return pack_dir(found["data"].tokenizer.save) if world.size > 1 else None

    tokenizer_files = world.on_main(on_main, "loading the data")
    if not world.is_main:  # the same data, sharded for this rank, with rank 0's tokenizer
        with unpack_dir(tokenizer_files) as tokenizer_dir:
            data = build_run_data(cfg, mcfg, tokenizer_dir, world.rank, world.size, skip_log=skip_log)
        return data, None, None
    return found["data"], found["resume"], found["init"]


def report_locked(training: Training) -> None:
    model = training.model
    if model.lora is not None:  # (a quantized base packs its weights: count what trains)
        n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        print(f"LoRA on {model.lora.path}: {n / 1e6:.3f}M trainable parameters", flush=True)
    elif training.locked:
        locked = set(training.locked)
        n = sum(v.size for k, v in tree_flatten(model.parameters()) if k in locked)
        print(f"locked {len(locked)} tensors ({n / 1e6:.2f}M parameters)", flush=True)


def resolve_auto_batch(cfg: Config, world: World, ckpt_root: Path, resume: bool, n_streams: int) -> int:
    """data.batch_size auto -> a number: the resumed run's own, else the largest that fits (rank 0
    measures, every rank gets its answer)."""

    def find() -> int:
        previous = ckpt_io.find_resumable(ckpt_root) if resume else None
        if previous is not None:
            size = parse_yaml((previous / "config.yaml").read_text())["data"]["batch_size"]
            print(f"batch_size auto: {size}, as in {previous}", flush=True)
            return int(size)
        cap = cfg.data.builtin_train_size if cfg.data.train == "builtin" else None
        return find_batch_size(cfg, world.size, max_batch=cap, n_streams=n_streams)

    return world.on_main(find, "finding the largest batch that fits")


# ---------------------------------------------------------------------------
# The step loop


def run_steps(run: Run, stop_after: int | None) -> int:
    """Train until train.steps, or `stop_after` more steps, or Ctrl-C; returns the skipped steps."""
    cfg, state, world = run.cfg, run.state, run.world
    stop_at = min(cfg.train.steps, state.step + stop_after) if stop_after else cfg.train.steps
    meter = Throughput(state.step)
    interrupted = []  # Ctrl-C (single process): finish the step in flight, save, exit cleanly
    previous_handler = None
    if world.size == 1 and threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    bad_streak = skipped = 0
    try:
        while state.step < stop_at:
            if world.is_main and state.batch_in_epoch == 0:
                log_mixture(run)
            loader = train_loader(run)
            for batch in loader.epoch(state.epoch, start_batch=state.batch_in_epoch):
                loss, grad_norm, tau, distill = train_step(run, batch)
                state.advance(len(run.data.train))
                meter.add(len(batch["tokens"]) * world.size)  # the global batch
                if math.isfinite(loss.item()) and math.isfinite(grad_norm.item()):
                    bad_streak = 0
                else:  # the compiled step already left weights and optimizer state untouched
                    bad_streak, skipped = bad_streak + 1, skipped + 1
                    report_bad_step(run, bad_streak)
                if world.is_main and (state.step % cfg.train.log_every == 0 or state.step == stop_at):
                    log_progress(run, meter, stop_at, loss, grad_norm, tau, distill)
                evaluate_and_save_on_schedule(run, stop_at)
                if interrupted:
                    stop_at = state.step
                    run.logger.message(
                        f"interrupted at step {state.step}: saving a checkpoint (continue with --resume)"
                    )
                if state.step >= stop_at or run.data.train_at(state.step) is not loader:
                    break  # done, or data.resolution_schedule switches size: the same position, resized
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return skipped


def train_loader(run: Run):
    """The train Loader of the next step (data.resolution_schedule: at its size); a new size is
    logged. Each size traces its own compiled step on first use (mx.compile keeps one trace per
    input shape), so switching back and forth compiles nothing twice."""
    step, schedule = run.state.step, run.data.resolution
    loader = run.data.train_at(step)
    starts = [start for start, _ in schedule.phases] if run.cfg.data.resolution_schedule else []
    if run.world.is_main and step in starts:
        size = loader.image_size
        run.logger.log({"event": "resolution", "step": step, "image_size": size})
        run.logger.message(f"step {step + 1}: training at {size} px (data.resolution_schedule)")
    return loader


def train_step(run: Run, batch: dict) -> tuple:
    """One optimizer step on `batch`: (loss, grad_norm, the temperature it used (rank 0), the
    distillation term (loss.distill) or None)."""
    training, step = run.training, run.state.step
    model, temperature = training.model, training.temperature
    if not temperature.learnable:
        model.logit_scale = mx.array(temperature.logit_scale_param(step), mx.float32)
    scale_used = model.logit_scale  # (arrays are immutable: the step assigns a new one)
    lora = run.cfg.finetune.lora
    if lora.enabled and lora.dropout > 0:  # LoRA dropout keyed on (seed, step): resume stays exact
        mx.random.seed(run.cfg.train.seed * 1_000_003 + step)
    with run.world.guard(f"training step {step + 1}"), out_of_memory_hint(run.cfg):
        teacher = run.teacher.batch_rows(batch) if run.teacher is not None else ()
        images, tokens = mx.array(batch["images"]), mx.array(batch["tokens"])
        loss, grad_norm, *distill = training.run_step(images, tokens, step, teacher)
        mx.eval(training.state, loss, grad_norm, *distill)  # (the guard bounds waits on the other ranks)
    distill = distill[0] if distill else None
    if not run.world.is_main:
        return loss, grad_norm, None, distill
    tau = math.exp(-min(scale_used.item(), LOGIT_SCALE_MAX))
    run.logger.log({"event": "temperature", "step": step + 1, "temperature": tau})
    return loss, grad_norm, tau, distill


def report_bad_step(run: Run, bad_streak: int) -> None:
    step = run.state.step
    if run.world.is_main:
        reason = "non-finite loss, gradient or weights"
        run.logger.log({"event": "skip", "step": step, "epoch": run.state.epoch, "reason": reason})
        run.logger.message(f"step {step}: non-finite loss, gradient or updated weights, update skipped")
    if bad_streak >= run.cfg.train.max_bad_steps:
        raise NonFiniteError(
            f"{bad_streak} consecutive steps with a non-finite loss, gradient or updated weights (last: step "
            f"{step}); stopped without saving, so the last good checkpoint in {run.ckpt_root} "
            "is kept. Lower optim.lr (or raise optim.warmup_steps), keep the temperature "
            "clamped (logit scale <= 100), and train in float32."
        )


def log_mixture(run: Run) -> None:
    """A mixture, as an epoch starts: how many of its draws each source gives (metrics.jsonl and
    the console), once per epoch."""
    counts = run.data.train.source_counts(run.state.epoch)
    if counts is None:
        return
    drawn = {s.name: int(c) for s, c in zip(run.data.sources, counts, strict=True)}
    run.logger.log({"event": "mixture", "step": run.state.step, "epoch": run.state.epoch, "drawn": drawn})
    shown = ", ".join(f"{name} {c}" for name, c in drawn.items())
    run.logger.message(f"epoch {run.state.epoch}: draws per source: {shown}")


def log_progress(
    run: Run, meter: Throughput, stop_at: int, loss, grad_norm, tau: float, distill=None
) -> None:
    step, cfg = run.state.step, run.cfg
    img_s, eta = meter.read(step, stop_at)
    lr = lr_at(step - 1, cfg.optim, cfg.train.steps)
    record = {
        "event": "train",
        "step": step,
        "epoch": run.state.epoch,
        "loss": loss.item(),
        "lr": lr,
        "img_per_s": img_s,
        "grad_norm": grad_norm.item(),
        "logit_scale": math.exp(run.training.model.logit_scale.item()),
        "temperature": tau,
    }
    if distill is not None:  # loss.distill: the unweighted distillation term (loss includes it)
        record["distill_loss"] = distill.item()
    run.logger.log(record)
    run.logger.progress_line(step, run.state.epoch, record["loss"], lr, img_s, eta, memory_mb())


def evaluate_and_save_on_schedule(run: Run, stop_at: int) -> None:
    """eval.every / train.save_every: rank 0 evaluates and saves, the others wait for it."""
    cfg, step, world = run.cfg, run.state.step, run.world
    evaluate_now = cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps
    save_now = cfg.train.save_every and step % cfg.train.save_every == 0 and step < stop_at
    metrics = run_eval(run) if evaluate_now and world.is_main else None
    if save_now and world.is_main:
        save(run, metrics)
    if evaluate_now or save_now:
        world.barrier(f"waiting for rank 0 to evaluate / save at step {step}")
    if evaluate_now and world.size > 1 and cfg.loss.temperature.schedule == "adaptive":
        temperature = run.training.temperature
        temperature.load_state_dict(world.broadcast_object(temperature.state_dict()))


@contextlib.contextmanager
def out_of_memory_hint(cfg: Config):
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not any(w in str(e).lower() for w in _OOM_WORDS):
            raise
        raise OutOfMemoryError(
            f"out of memory in a training step ({e}). Use a smaller data.batch_size (now "
            f"{cfg.data.batch_size}), gradient checkpointing or gradient accumulation, or a smaller "
            "model.image_size / architecture."
        ) from e


# Words of the allocation failures MLX raises (Metal/CUDA malloc, CPU std::bad_alloc -> MemoryError).
_OOM_WORDS = ("malloc", "allocate", "out of memory", "resource limit", "bad_alloc")


# ---------------------------------------------------------------------------
# Evaluation, checkpoints and the end of the run (rank 0)


def run_eval(run: Run) -> dict:
    """The run's held-out metrics, then the eval sets' "NAME/metric" scalars, as one eval record
    (their per-set details: OUT/eval_sets.json)."""
    started = time.perf_counter()
    ema = run.training.ema if run.cfg.eval.use_ema else None
    run.training.model.eval()  # LoRA dropout off while evaluating
    try:
        with ema.swapped_in(run.training.model) if ema else contextlib.nullcontext():  # eval.use_ema
            metrics = evaluate(run.training.model, run.data, run.cfg)
            if run.eval_sets:
                scalars, details = evaluate_eval_sets(run.training.model, run.data, run.eval_sets, run.cfg)
                metrics.update(scalars)
                write_eval_sets(run.out, run.state.step, scalars, details, run.logger.message)
    finally:
        run.training.model.train()
    # when it began on the run's clock (summary.json's `seconds`) and how long it took: training
    # time to an accuracy is elapsed_s less the earlier evaluations' eval_s (benchmarks/time_to_accuracy.py)
    timing = {"elapsed_s": round(started - run.started, 3), "eval_s": round(time.perf_counter() - started, 3)}
    run.logger.log({"event": "eval", "step": run.state.step, "epoch": run.state.epoch, **metrics, **timing})
    temperature = run.training.temperature
    if temperature.observe(metrics.get("val_loss", math.nan)):
        run.logger.message(f"val loss plateaued: temperature lowered to {temperature.tau:.4g}")
    shown = {k: round(v, 4) for k, v in metrics.items() if "R@5" not in k and "R@10" not in k}
    run.logger.message(f"eval @ {run.state.step} ({timing['eval_s']:.1f}s): {json.dumps(shown)}")
    return metrics


def save(run: Run, metrics: dict | None) -> Path:
    """A checkpoint of the current step (with `metrics` when it was just evaluated); keeps the best
    one and the last train.keep_last."""
    state, training = run.state, run.training
    metrics = metrics or {}
    metric = pick_best_metric(run.cfg, metrics)
    state.observe(metric, metrics, f"step_{state.step}", lower=metric is not None and lower_is_better(metric))
    state.temperature = training.temperature.state_dict()
    path = ckpt_io.save_checkpoint(
        run.ckpt_root,
        training.model,
        training.optimizer,
        run.data.tokenizer,
        run.config_yaml,
        state,
        ema=training.ema,
    )
    keep = {state.best["checkpoint"]} if state.best["checkpoint"] else set()
    ckpt_io.prune_checkpoints(run.ckpt_root, run.cfg.train.keep_last, keep, run_id=state.run_id)
    return path


def finish(run: Run, skipped_steps: int) -> dict:
    """Rank 0: the final evaluation (when the run is complete) and checkpoint, curves.png and
    summary.json; the other ranks wait for its summary."""
    metrics = run_eval(run) if run.state.step >= run.cfg.train.steps else {}
    final = save(run, metrics or None)
    write_curves(run.out, run.logger.message)
    run.logger.close()
    elapsed = time.perf_counter() - run.started
    summary = {"step": run.state.step, "seconds": round(elapsed, 1), "checkpoint": str(final), **metrics}
    if skipped_steps:
        summary["skipped_steps"] = skipped_steps
    if run.skip_log is not None:
        skips = run.skip_log.summary()
        run.skip_log.close()
        if skips.get("skipped"):
            summary["skipped"] = skips
            print(f"skipped {skips['skipped']} bad items ({skips.get('by_reason')}); see {run.skip_log.path}")
    write_summary(run.out / "summary.json", summary, final)
    return summary
