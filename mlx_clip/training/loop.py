"""The training loop: compiled step, periodic evaluation, logging and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten

from .. import _blas
from ..config import Config, config_to_yaml
from ..data import checks as validate
from ..data.run_data import RunData, build_run_data
from ..evaluation.metrics import evaluate_run
from ..models.model import CLIP, LOGIT_SCALE_MAX, create_model, encode_pair
from ..models.weights import load_init_weights
from . import checkpoint as ckpt_io
from . import streams
from .autobatch import find_batch_size
from .distributed import World, init_world, pack_dir, unpack_dir
from .loss import contrastive_loss
from .optim import build_optimizer, lock_parameters, lr_at
from .streams import Shards, Spread
from .temperature import Temperature

# ---------------------------------------------------------------------------
# Evaluation


def evaluate(model: CLIP, data: RunData, cfg: Config | None = None) -> dict:
    """Zero-shot and retrieval metrics of `model` on the run's held-out sets, and with `cfg` the
    training loss on the val set (`val_loss`)."""
    metrics = evaluate_run(
        data,
        encode_image=lambda images: np.array(model.encode_image(mx.array(images))),
        encode_text=lambda tokens: np.array(model.encode_text(mx.array(tokens))),
    )
    if cfg is not None and "val" in data.evals:
        metrics["val_loss"] = val_loss(model, data, cfg)
    return metrics


def val_loss(model: CLIP, data: RunData, cfg: Config) -> float:
    """The training objective on the val set, in float32 at the current temperature."""
    _, features_loss = make_loss_parts(cfg)  # one process: rank 0 evaluates alone
    losses = [
        (features_loss(model, *encode_pair(model, mx.array(images), mx.array(tokens))).item(), len(tokens))
        for images, tokens in val_pairs(data)
    ]
    return float(np.average([x for x, _ in losses], weights=[n for _, n in losses])) if losses else math.nan


def val_pairs(data: RunData):
    """(images, tokens) numpy batches of the val set (256 pairs, each image with its first caption);
    the val loss is their size-weighted mean loss. Shared with torch_ref.train."""
    ev = data.evals["val"]
    for batch in ev.loader.epoch(0):
        if len(batch["index"]) >= 2:  # a contrastive loss needs negatives
            yield batch["images"], data.tokenize([ev.captions[i][0] for i in batch["index"].tolist()])


def pick_best_metric(cfg: Config, metrics: dict) -> str | None:
    if cfg.train.best_metric != "auto":
        return cfg.train.best_metric
    for name in ("zeroshot_top1", "i2t_R@1"):
        if name in metrics:
            return name
    return None


# ---------------------------------------------------------------------------
# Logging


@dataclass
class Logger:
    out: Path
    total_steps: int
    progress: bool
    tensorboard: object = None

    def __post_init__(self):
        self.file = open(self.out / "metrics.jsonl", "a")
        self.tty = self.progress and sys.stdout.isatty()
        self.history: list[dict] = []

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k not in ("event", "step") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def progress_line(self, step: int, loss: float, lr: float, img_s: float, eta_s: float, mem_mb: float):
        if not self.progress:
            return
        width = 24
        done = int(width * step / self.total_steps)
        bar = "#" * done + "-" * (width - done)
        eta = time.strftime("%M:%S", time.gmtime(eta_s)) if eta_s < 3600 else f"{eta_s / 3600:.1f}h"
        line = (
            f"[{bar}] step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
            f"{img_s:.0f} img/s ETA {eta} mem {mem_mb:.0f} MB"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.tty:
            print()
        print(text, flush=True)

    def close(self):
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def memory_mb() -> float:
    """MLX's active memory where it counts it (Metal/CUDA/CPU), else the process peak RSS."""
    try:
        active = mx.get_active_memory()
        if active:
            return active / 2**20
    except AttributeError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["event"] == "train"]
    evals = [r for r in history if r["event"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax1.set(xlabel="step", ylabel="train loss", title="loss")
    for key in ("zeroshot_top1", "i2t_R@1", "t2i_R@1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax2.set(xlabel="step", ylabel="accuracy", title="held-out", ylim=(0, 1))
    if evals:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def open_tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        try:
            from tensorboardX import SummaryWriter
        except Exception:
            raise RuntimeError(
                "train.tensorboard=true needs the `tensorboard` package (with torch) or `tensorboardX`; "
                "pip install tensorboardX"
            ) from None
    return SummaryWriter(str(out / "tensorboard"))


# ---------------------------------------------------------------------------
# Training


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def compute_dtype(cfg: Config):
    """The towers' compute dtype: None (float32) or mx.bfloat16 (mixed precision)."""
    return mx.bfloat16 if cfg.train.precision == "bfloat16" else None


def set_blas_threads(cfg: Config) -> None:
    """One OpenBLAS thread when the run is deterministic (multi-threaded OpenBLAS is not
    bit-reproducible, see _blas.set_threads) or runs several streams (streams.py: the cores are
    already shared out, one GEMM per stream); else OpenBLAS's own default. Also widens MLX's
    evaluation for several streams (streams.widen_evaluation): call it before evaluating anything."""
    n = streams.resolve(cfg.train.streams)
    streams.widen_evaluation(n, cfg.train.grad_checkpointing)
    if cfg.train.deterministic or n > 1:
        _blas.set_threads(1)


def make_loss_parts(cfg: Config, world: World | None = None):
    """The two halves of a training loss, kept apart so gradient caching (accum.py) can cut between them.

    encode(model, images, tokens) -> (image_features, text_features): float32, L2-normalised, in
        the configured precision.
    features_loss(model, image_features, text_features) -> this rank's loss, from the model's logit
        scale (clamped at 100) and bias; data parallel, the features are gathered over the ranks
        inside (with gradients) and the mean over ranks of the value is the global-batch loss.
    """
    dtype = compute_dtype(cfg)
    group = world.group if world is not None and world.size > 1 else None
    shards = Shards(streams.resolve(cfg.train.streams))

    def encode(model, images, tokens):  # shard by shard, each on its own stream (streams.py)
        return shards.map(lambda i, t: encode_pair(model, i, t, dtype), images, tokens)

    def features_loss(model, image_features, text_features):
        scale = mx.exp(mx.minimum(model.logit_scale, LOGIT_SCALE_MAX))
        bias = getattr(model, "logit_bias", None)
        return contrastive_loss(cfg.loss, image_features, text_features, scale, bias, group)

    return encode, features_loss


def make_grad_fn(model: CLIP, cfg: Config, world: World | None = None):
    """(images, tokens) -> (loss, gradients) of the trainable parameters.

    Data parallel (world.size > 1): the loss sees the global batch through gathered features and
    the returned loss and gradients are the means over the ranks, i.e. the single-process ones
    for the concatenated batch (docs/distributed.md).
    """
    encode, features_loss = make_loss_parts(cfg, world)
    grad_fn = nn.value_and_grad(model, lambda m, images, tokens: features_loss(m, *encode(m, images, tokens)))
    mean_over_ranks = make_rank_mean(world)

    def loss_and_grads(images, tokens):
        return mean_over_ranks(*grad_fn(model, images, tokens))

    return loss_and_grads


def make_rank_mean(world: World | None):
    """(loss, grads) of this rank -> their means over the ranks (identity for one process)."""
    if world is None or world.size == 1:
        return lambda loss, grads: (loss, grads)

    def mean(loss, grads):
        return mx.distributed.all_sum(loss, group=world.group) / world.size, world.average_gradients(grads)

    return mean


class OutOfMemoryError(RuntimeError):
    """An allocation failed in a training step; the message says what to change."""


# Words of the allocation failures MLX raises (Metal/CUDA malloc, CPU std::bad_alloc -> MemoryError).
_OOM_WORDS = ("malloc", "allocate", "out of memory", "resource limit", "bad_alloc")


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


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: training stopped, the last good checkpoint kept."""


def make_update(model: CLIP, optimizer: optim.Optimizer, cfg: Config):
    """(loss, grads) -> (loss, grad_norm): clip, then update weights and optimizer state unless
    the loss or the gradient is not finite. Traceable: it runs inside the compiled step.

    Per-tensor work runs on the train.streams streams (streams.Spread), as the towers do.
    """
    max_norm = cfg.optim.grad_clip
    spread = Spread(streams.resolve(cfg.train.streams))
    spread.spread_optimizer(optimizer)

    def update(loss, grads):
        leaves = _leaves(spread.map(lambda g: mx.sum(g * g), grads))
        grad_norm = mx.sqrt(sum(leaves[1:], leaves[0]))
        if max_norm > 0:  # as mlx.optimizers.clip_grad_norm
            scale = mx.minimum(max_norm / (grad_norm + 1e-6), 1.0)
            grads = spread.map(lambda g: g * scale, grads)
        # A non-finite loss or gradient skips the update: every parameter and optimizer value
        # keeps its old array (the old ones are live inputs anyway, so this costs no memory).
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm)
        old_params, old_opt = model.trainable_parameters(), _snapshot(optimizer.state)
        optimizer.update(model, grads)
        # CLIP clamps the temperature so the logit scale never exceeds 100.
        model.logit_scale = mx.clip(model.logit_scale, 0.0, LOGIT_SCALE_MAX)
        keep = partial(_keep_if, ok)
        model.update(spread.map(keep, model.trainable_parameters(), old_params))
        _select_in_place(optimizer.state, old_opt, lambda new, old: spread.run(keep, new, old))
        return loss, grad_norm  # the host tells a skipped step by a non-finite loss or norm

    return update


def _keep_if(ok, new, old):
    return mx.where(ok, new, old)


def make_step(model: CLIP, optimizer: optim.Optimizer, cfg: Config, world: World | None = None):
    """One training step over the model, optimizer and random state: step(images, tokens) ->
    (loss, grad_norm), and the state arrays to evaluate after it.

    Data parallel: the gradients are averaged over the ranks before clipping. With
    optim.accum_steps > 1 the step caches features micro-batch by micro-batch (accum.py).
    """
    if cfg.optim.accum_steps > 1:
        from .accum import make_accum_step

        encode, features_loss = make_loss_parts(cfg, world)
        finish = make_update(model, optimizer, cfg)
        return make_accum_step(
            model, optimizer, cfg.optim.accum_steps, encode, features_loss, make_rank_mean(world), finish
        )
    loss_and_grads = make_grad_fn(model, cfg, world)
    update = make_update(model, optimizer, cfg)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(images, tokens):
        return update(*loss_and_grads(images, tokens))

    return step, state


def _snapshot(tree):
    """The same nesting of dicts/lists, holding the current arrays (arrays are immutable)."""
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_snapshot(v) for v in tree]
    return tree


def _select_in_place(tree, old, select):
    """tree[...] = select(tree[...], old[...]) for every array, mutating tree's containers in
    place (mx.compile tracks the optimizer's own dicts, not new ones)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _select_in_place(v, old[k], select)
        elif isinstance(v, mx.array):
            tree[k] = select(v, old[k])


def _leaves(tree):
    return [v for _, v in tree_flatten(tree)]


def resolve_auto_batch(cfg: Config, world: World, ckpt_root: Path, resume: bool) -> int:
    """data.batch_size auto -> a number: the resumed run's own, else the largest that fits (rank 0
    measures, every rank gets its answer)."""

    def find() -> int:
        previous = ckpt_io.find_resumable(ckpt_root) if resume else None
        if previous is not None:
            size = yaml.safe_load((previous / "config.yaml").read_text())["data"]["batch_size"]
            print(f"batch_size auto: {size}, as in {previous}", flush=True)
            return int(size)
        cap = cfg.data.builtin_train_size if cfg.data.train == "builtin" else None
        return find_batch_size(cfg, world.size, max_batch=cap)

    return world.on_main(find, "finding the largest batch that fits")


def train(cfg: Config, out: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train per `cfg` into `out`; returns the final evaluation metrics.

    Under mlx.launch every rank runs this; rank 0 alone reads and writes `out` (docs/distributed.md).
    """
    set_blas_threads(cfg)  # before anything is evaluated (streams.widen_evaluation)
    world = init_world(cfg.train.dist_timeout, cfg.train.dist_bucket_mb)  # a world of one: no-ops
    main = world.is_main
    # Own data: every skipped item goes to OUT/skipped.jsonl (rank 0); other ranks log to a temp file.
    skip_log = None
    if cfg.data.train != "builtin" or cfg.data.val:
        skip_path = out / "skipped.jsonl" if main else Path(tempfile.mkdtemp()) / "skipped.jsonl"
        skip_path.parent.mkdir(parents=True, exist_ok=True)
        skip_log = validate.SkipLog(skip_path)
    ckpt_root = out / "checkpoints"
    if cfg.data.batch_size == "auto":
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, batch_size=resolve_auto_batch(cfg, world, ckpt_root, resume)),
        )
    config_yaml = config_to_yaml(cfg)
    mcfg = cfg.model_config()
    seed = cfg.train.seed
    resume_dir = init_weights = data = None

    t0 = time.perf_counter()

    def load_data():  # rank 0 (or the only process): the disk, and the tokenizer for the others
        nonlocal resume_dir, init_weights, data
        out.mkdir(parents=True, exist_ok=True)
        resume_dir = ckpt_io.find_resumable(ckpt_root) if resume else None
        init_weights, init_tokenizer = ckpt_io.resolve_init(cfg.model.init_from)
        tokenizer_dir = resume_dir or init_tokenizer
        data = build_run_data(cfg, mcfg, tokenizer_dir, world.rank, world.size, skip_log=skip_log)
        return pack_dir(data.tokenizer.save) if world.size > 1 else None

    tokenizer_files = world.on_main(load_data, "loading the data")
    if not main:  # the same data, sharded for this rank, with rank 0's tokenizer
        with unpack_dir(tokenizer_files) as tokenizer_dir:
            data = build_run_data(cfg, mcfg, tokenizer_dir, world.rank, world.size, skip_log=skip_log)
    world.check_same({"config": config_hash(config_yaml), "training samples": str(data.train.num_samples)})
    print(f"data: {data.describe()} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if world.size > 1:
        per_rank = cfg.data.batch_size // world.size
        print(f"data parallel: {world.size} ranks x {per_rank} = global batch {cfg.data.batch_size}")
    if main:
        (out / "config.yaml").write_text(config_yaml)

    model = create_model(mcfg, seed=seed)
    if init_weights is not None and resume_dir is None:
        load_init_weights(model, init_weights)
        print(f"initialised from {init_weights}", flush=True)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    locked = lock_parameters(model, cfg.optim)
    temperature = Temperature(cfg.loss.temperature, cfg.train.steps)
    if not temperature.learnable:  # the schedule writes logit_scale before every step
        model.freeze(recurse=False, keys=["logit_scale"])
    if locked:
        n_locked = sum(v.size for k, v in tree_flatten(model.parameters()) if k in set(locked))
        print(f"locked {len(locked)} tensors ({n_locked / 1e6:.2f}M parameters)", flush=True)
    total = cfg.train.steps
    optimizer = build_optimizer(cfg.optim, total)
    optimizer.init(model.trainable_parameters())
    step_no, epoch, batch_in_epoch = 0, 0, 0
    best = {"name": None, "value": -math.inf, "checkpoint": None}

    def restore() -> dict | None:  # rank 0 (or the only process)
        if resume_dir is None:
            return None
        state = ckpt_io.load_checkpoint(resume_dir, model, optimizer)
        if state.get("world_size", 1) != world.size:
            raise ValueError(
                f"checkpoint {resume_dir} was trained by {state.get('world_size', 1)} rank(s) but this run "
                f"has {world.size}; resume with the same number of ranks (mlx.launch -n "
                f"{state.get('world_size', 1)} ...), or start a new run from its weights with "
                f"--model.init_from {resume_dir}"
            )
        if state.get("config_hash") != config_hash(config_yaml):
            print(f"warning: the config differs from the one checkpoint {resume_dir.name} was trained with")
        print(f"resumed from {resume_dir} at step {state['step']}", flush=True)
        return {k: state[k] for k in ("step", "epoch", "batch_in_epoch")} | {
            "best": state.get("best", best),
            "temperature": state.get("temperature", {}),
        }

    position = world.on_main(restore, "restoring the checkpoint")
    if position is not None:
        step_no, epoch, batch_in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
        best = position["best"]
        temperature.load_state_dict(position["temperature"])
    if world.size > 1:  # every rank starts from rank 0's weights and optimizer state
        model.update(world.broadcast_tree(model.parameters()))
        optimizer.state = world.broadcast_tree(optimizer.state)
    # Batches are a pure function of (seed, epoch, index) (data.py) and the compiled step draws
    # no random numbers, so resuming is exact; anything random later is keyed on (seed, step).
    mx.random.seed(seed * 1_000_003 + step_no)

    step_fn, state = make_step(model, optimizer, cfg, world)
    logger = None
    if main:
        tensorboard = open_tensorboard(out) if cfg.train.tensorboard else None
        logger = Logger(out, total, cfg.train.progress, tensorboard)
    batches_per_epoch = len(data.train)
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training set has fewer samples than one global batch ({cfg.data.batch_size}); "
            "lower data.batch_size or add data"
        )

    def save(step: int, metrics: dict | None = None) -> Path:
        nonlocal best
        keep = set()
        metric = pick_best_metric(cfg, metrics or {})
        is_best = metrics is not None and metric in metrics and metrics[metric] > best["value"]
        if is_best:
            best = {"name": metric, "value": metrics[metric], "checkpoint": f"step_{step}"}
        run_state = {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "seed": seed,
            "world_size": world.size,
            "config_hash": config_hash(config_yaml),
            "best": best,
            "metrics": metrics or {},
            "temperature": temperature.state_dict(),
        }
        path = ckpt_io.save_checkpoint(
            ckpt_root, step, model, optimizer, data.tokenizer, config_yaml, run_state
        )
        if best["checkpoint"]:
            keep.add(best["checkpoint"])
        ckpt_io.prune_checkpoints(ckpt_root, cfg.train.keep_last, keep)
        return path

    def run_eval(step: int) -> dict:
        te = time.perf_counter()
        metrics = evaluate(model, data, cfg)
        logger.log({"event": "eval", "step": step, **metrics})
        if temperature.observe(metrics.get("val_loss", math.nan)):
            logger.message(f"val loss plateaued: temperature lowered to {temperature.tau:.4g}")
        shown = {k: round(v, 4) for k, v in metrics.items() if "R@5" not in k and "R@10" not in k}
        logger.message(f"eval @ {step} ({time.perf_counter() - te:.1f}s): {json.dumps(shown)}")
        return metrics

    stop_at = min(total, step_no + stop_after) if stop_after else total
    window_t, window_n, t_start, start_step = time.perf_counter(), 0, time.perf_counter(), step_no
    metrics: dict = {}
    loss_v = float("nan")
    # Ctrl-C (single process): finish the step in flight, save a checkpoint, exit cleanly.
    interrupted = []
    previous_handler = None
    if world.size == 1 and threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    bad_streak = skipped_steps = 0
    while step_no < stop_at:
        for batch in data.train.epoch(epoch, start_batch=batch_in_epoch):
            if not temperature.learnable:
                model.logit_scale = mx.array(temperature.logit_scale_param(step_no), mx.float32)
            scale_used = model.logit_scale  # (arrays are immutable: the step assigns a new one)
            with world.guard(f"training step {step_no + 1}"), out_of_memory_hint(cfg):
                loss, grad_norm = step_fn(mx.array(batch["images"]), mx.array(batch["tokens"]))
                mx.eval(state, loss, grad_norm)  # (the guard bounds waits on the other ranks)
            if main:  # the temperature this step's loss used
                tau = math.exp(-min(scale_used.item(), LOGIT_SCALE_MAX))
                logger.log({"event": "temperature", "step": step_no + 1, "temperature": tau})
            step_no += 1
            batch_in_epoch += 1
            window_n += len(batch["tokens"]) * world.size  # the global batch
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                # The compiled step already left weights and optimizer state untouched.
                bad_streak += 1
                skipped_steps += 1
                if main:
                    logger.log({"event": "skip", "step": step_no, "reason": "non-finite loss or gradient"})
                    logger.message(f"step {step_no}: non-finite loss or gradient, update skipped")
                if bad_streak >= cfg.train.max_bad_steps:
                    raise NonFiniteError(
                        f"{bad_streak} consecutive steps with a non-finite loss or gradient (last: step "
                        f"{step_no}); stopped without saving, so the last good checkpoint in {ckpt_root} "
                        "is kept. Lower optim.lr (or raise optim.warmup_steps), keep the temperature "
                        "clamped (logit scale <= 100), and train in float32."
                    )
            else:
                bad_streak = 0
            if batch_in_epoch == batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if main and (step_no % cfg.train.log_every == 0 or step_no == stop_at):
                loss_v = loss.item()
                now = time.perf_counter()
                img_s = window_n / (now - window_t)
                eta = (now - t_start) / max(1, step_no - start_step) * (stop_at - step_no)
                lr = lr_at(step_no - 1, cfg.optim, total)
                logger.log(
                    {
                        "event": "train",
                        "step": step_no,
                        "epoch": epoch,
                        "loss": loss_v,
                        "lr": lr,
                        "img_per_s": img_s,
                        "grad_norm": grad_norm.item(),
                        "logit_scale": math.exp(model.logit_scale.item()),
                        "temperature": tau,
                    }
                )
                logger.progress_line(step_no, loss_v, lr, img_s, eta, memory_mb())
                window_t, window_n = now, 0
            evaluate_now = cfg.train.eval_every and step_no % cfg.train.eval_every == 0 and step_no < total
            save_now = cfg.train.save_every and step_no % cfg.train.save_every == 0 and step_no < stop_at
            if evaluate_now and main:
                metrics = run_eval(step_no)
            if save_now and main:
                save(step_no, metrics if evaluate_now else None)
            if evaluate_now or save_now:
                world.barrier(f"waiting for rank 0 to evaluate / save at step {step_no}")
            if evaluate_now and world.size > 1 and cfg.loss.temperature.schedule == "adaptive":
                temperature.load_state_dict(world.broadcast_object(temperature.state_dict()))
            if interrupted:
                stop_at = step_no
                logger.message(f"interrupted at step {step_no}: saving a checkpoint (continue with --resume)")
            if step_no >= stop_at:
                break
    if previous_handler is not None:
        signal.signal(signal.SIGINT, previous_handler)

    def finish() -> dict:  # rank 0 (or the only process); the others wait for its summary
        metrics = run_eval(step_no) if step_no >= total else {}
        final = save(step_no, metrics or None)
        plot_curves(_read_history(out), out / "curves.png")
        logger.close()
        elapsed = time.perf_counter() - t0
        summary = {"step": step_no, "seconds": round(elapsed, 1), "checkpoint": str(final), **metrics}
        if skipped_steps:
            summary["skipped_steps"] = skipped_steps
        if skip_log is not None:
            skips = skip_log.summary()
            skip_log.close()
            if skips.get("skipped"):
                summary["skipped"] = skips
                print(f"skipped {skips['skipped']} bad items ({skips.get('by_reason')}); see {skip_log.path}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    return world.on_main(finish, "evaluating and saving the final checkpoint")


def _read_history(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
