"""build_training: a run's model, optimizer and compiled step, made here and nowhere else.

The trainer, `data.batch_size auto` (autobatch.py) and every benchmark call it, so a benchmark
times exactly the step that training runs. The step is mlx-lm's idiom: one mx.compile over the
model, optimizer and random state, and one mx.eval of that state per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..config import Config
from ..models import streams
from ..models.adapters import build_lora_model
from ..models.config import ModelConfig
from ..models.locate import resolve_init
from ..models.model import CLIP, LOGIT_SCALE_MAX, create_model, encode_pair
from .distributed import World
from .ema import ModelEMA
from .loss import contrastive_loss, distill_loss
from .optim import build_optimizer, lock_parameters
from .patch_dropout import PatchDropout, patch_dropout
from .temperature import Temperature


@dataclass
class Training:
    """What build_training returns. After each `loss, grad_norm = run_step(images, tokens, i)`
    (the compiled `step`, and the EMA's update), evaluate `mx.eval(state, loss, grad_norm)`: the
    whole update happens in that one evaluation. A non-finite loss or grad_norm means the update
    was rejected (make_update)."""

    model: CLIP
    optimizer: optim.Optimizer
    step: Callable[..., tuple]
    state: list
    temperature: Temperature
    locked: list[str]  # paths of the frozen parameters (optim.lock_*)
    ema: ModelEMA | None = None  # train.ema_decay > 0
    patch_dropout: PatchDropout | None = None  # model.patch_dropout > 0

    def run_step(self, images: mx.array, tokens: mx.array, step: int, teacher: tuple = ()) -> tuple:
        """Training step `step` (0-based): `step`, then the EMA update queued on its lazy result
        (still one evaluation of `state`). What the trainer and auto batch size run.
        Returns (loss, grad_norm); built with a teacher scale (distillation), pass
        teacher=(teacher image rows, teacher text rows) of the batch and get (loss, grad_norm,
        distill term). With patch dropout, the kept patches are step `step`'s draw
        (training/patch_dropout.py)."""
        keep = ()
        if self.patch_dropout is not None:
            keep = (mx.array(self.patch_dropout.keep(step, *images.shape[:3])),)  # (B, H, W, 3) images
        out = self.step(images, tokens, *teacher, *keep)
        if self.ema is not None:
            self.ema.update(self.model, step, out[0], out[1])
        return out


def build_training(
    cfg: Config,
    world: World | None = None,
    n_streams: int = 1,
    mcfg: ModelConfig | None = None,
    prepare: Callable[[CLIP, optim.Optimizer], None] | None = None,
    teacher_scale: float | None = None,
) -> Training:
    """The model (seed train.seed; architecture `mcfg`, default cfg.model_config()), its locked
    parameters and temperature, AdamW over the trainable rest, and the compiled step.

    `n_streams` is train.streams resolved to a number (streams.resolve), once per run.
    With finetune.lora the base (model.init_from) is loaded here and wrapped with adapters; only
    what LoRA leaves trainable gets gradients and optimizer state.
    `prepare(model, optimizer)` runs before the step is compiled, with the optimizer state
    populated: the trainer loads initial weights or a checkpoint there (the compiled step captures
    the optimizer's state containers, so they must not be replaced afterwards).
    `teacher_scale` (loss.distill, the teacher's logit scale; training/distill.py): the step also
    takes the batch's teacher rows and adds loss.distill.weight x the distillation term.
    """
    model = create_model(mcfg or cfg.model_config(), seed=cfg.train.seed)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    locked = lock_parameters(model, cfg.optim)
    if cfg.finetune.lora.enabled:  # the base loads here, before quantizing and wrapping (adapters.py)
        base, _ = resolve_init(cfg.model.init_from)
        locked = sorted(set(locked) | set(build_lora_model(model, cfg.finetune, base, seed=cfg.train.seed)))
    temperature = Temperature(cfg.loss.temperature, cfg.train.steps)
    if not temperature.learnable:  # the schedule writes logit_scale before every step
        model.freeze(recurse=False, keys=["logit_scale"])
    lanes = streams.Lanes(n_streams)
    optimizer = build_optimizer(cfg.optim, cfg.train.steps, place=lanes.run, mcfg=model.config)
    optimizer.init(model.trainable_parameters())
    if prepare is not None:
        prepare(model, optimizer)
    step, state = make_step(model, optimizer, cfg, world, lanes, teacher_scale)
    # The EMA starts at the weights prepare() left (initial, init_from or resumed ones).
    ema = ModelEMA(model, cfg.train) if cfg.train.ema_decay else None
    if ema is not None:
        state = [*state, ema.state]
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    dropout = patch_dropout(model.config, cfg.train.seed, rank, size)
    return Training(model, optimizer, step, state, temperature, locked, ema, dropout)


def compute_dtype(cfg: Config):
    """The towers' compute dtype: None (float32) or mx.bfloat16 (mixed precision)."""
    return mx.bfloat16 if cfg.train.precision == "bfloat16" else None


def make_loss_parts(cfg: Config, world: World | None = None, lanes: streams.Lanes | None = None):
    """The two halves of a training loss, kept apart so gradient caching (accum.py) can cut between them.

    encode(model, images, tokens, keep=None) -> (image_features, text_features): float32,
        L2-normalised, in the configured precision; shard by shard over `lanes` (streams.py), each
        shard with its rows of patch dropout's `keep` (B, K), when given.
    features_loss(model, image_features, text_features) -> this rank's loss, from the model's logit
        scale (clamped at 100) and bias; data parallel, the features are gathered over the ranks
        inside (with gradients) and the mean over ranks of the value is the global-batch loss.
    """
    dtype = compute_dtype(cfg)
    group = world.group if world is not None and world.size > 1 else None
    lanes = lanes or streams.Lanes(1)

    def encode(model, images, tokens, keep=None):
        batch = (images, tokens) if keep is None else (images, tokens, keep)
        return lanes.shard(lambda i, t, k=None: encode_pair(model, i, t, dtype, keep=k), *batch)

    def features_loss(model, image_features, text_features):
        scale = mx.exp(mx.minimum(model.logit_scale, LOGIT_SCALE_MAX))
        bias = getattr(model, "logit_bias", None)
        return contrastive_loss(cfg.loss, image_features, text_features, scale, bias, group)

    return encode, features_loss


def make_grad_fn(model: CLIP, cfg: Config, world: World | None = None, lanes: streams.Lanes | None = None):
    """(images, tokens, keep=None) -> (loss, gradients) of the trainable parameters; `keep`:
    patch dropout's kept patches (B, K).

    Data parallel (world.size > 1): the loss sees the global batch through gathered features and
    the returned loss and gradients are the means over the ranks, i.e. the single-process ones
    for the concatenated batch (docs/distributed.md).
    """
    encode, features_loss = make_loss_parts(cfg, world, lanes)
    grad_fn = nn.value_and_grad(model, lambda m, *batch: features_loss(m, *encode(m, *batch)))
    mean_over_ranks = make_rank_mean(world)

    def loss_and_grads(images, tokens, keep=None):
        return mean_over_ranks(*grad_fn(model, images, tokens, keep))

    return loss_and_grads


def make_distill_grad_fn(model: CLIP, cfg: Config, teacher_scale: float, lanes: streams.Lanes | None = None):
    """(images, tokens, teacher_image, teacher_text, keep=None) -> (loss, gradients, distill term):
    the loss is the contrastive loss + loss.distill.weight x distill_loss (one process only)."""
    encode, features_loss = make_loss_parts(cfg, None, lanes)
    weight = cfg.loss.distill.weight

    def loss_fn(m, images, tokens, teacher_image, teacher_text, keep=None):
        image_features, text_features = encode(m, images, tokens, keep)
        scale = mx.exp(mx.minimum(m.logit_scale, LOGIT_SCALE_MAX))
        term = distill_loss(image_features, text_features, scale, teacher_image, teacher_text, teacher_scale)
        return features_loss(m, image_features, text_features) + weight * term, term

    grad_fn = nn.value_and_grad(model, loss_fn)

    def loss_and_grads(images, tokens, teacher_image, teacher_text, keep=None):
        (loss, term), grads = grad_fn(model, images, tokens, teacher_image, teacher_text, keep)
        return loss, grads, term

    return loss_and_grads


def make_rank_mean(world: World | None):
    """(loss, grads) of this rank -> their means over the ranks (identity for one process)."""
    if world is None or world.size == 1:
        return lambda loss, grads: (loss, grads)

    def mean(loss, grads):
        return mx.distributed.all_sum(loss, group=world.group) / world.size, world.average_gradients(grads)

    return mean


def make_update(model: CLIP, optimizer: optim.Optimizer, cfg: Config, lanes: streams.Lanes | None = None):
    """(loss, grads) -> (loss, grad_norm): clip, then update weights and optimizer state unless
    the loss, the gradient or an updated weight is not finite (grad_norm is then non-finite).
    Traceable: it runs inside the compiled step.

    Per-tensor work (norms, clipping, the guard) runs on `lanes` (streams.py), as the optimizer's
    own per-tensor update does when it was built with place=lanes.run.
    """
    max_norm = cfg.optim.grad_clip
    lanes = lanes or streams.Lanes(1)

    def update(loss, grads):
        leaves = _leaves(lanes.map(lambda g: mx.sum(g * g), grads))
        grad_norm = mx.sqrt(sum(leaves[1:], leaves[0]))
        if max_norm > 0:  # as mlx.optimizers.clip_grad_norm
            scale = mx.minimum(max_norm / (grad_norm + 1e-6), 1.0)
            grads = lanes.map(lambda g: g * scale, grads)
        old_params, old_opt = model.trainable_parameters(), _snapshot(optimizer.state)
        optimizer.update(model, grads)
        # CLIP clamps the temperature so the logit scale never exceeds 100.
        model.logit_scale = mx.clip(model.logit_scale, 0.0, LOGIT_SCALE_MAX)
        # A non-finite loss or gradient, or an update that would leave a weight non-finite (a
        # step too large for float32), is rejected: every parameter and optimizer value keeps its
        # old array (the old ones are live inputs anyway, so this costs no memory).
        weights_ok = _all_finite(lanes, model.trainable_parameters())
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm) & weights_ok
        keep = partial(_keep_if, ok)
        model.update(lanes.map(keep, model.trainable_parameters(), old_params))
        _select_in_place(optimizer.state, old_opt, lambda new, old: lanes.run(keep, new, old))
        # The host tells a skipped step by a non-finite loss or norm, so a rejected update reports
        # its norm as NaN.
        return loss, mx.where(weights_ok, grad_norm, mx.nan)

    return update


def make_step(
    model: CLIP,
    optimizer: optim.Optimizer,
    cfg: Config,
    world: World | None = None,
    lanes: streams.Lanes | None = None,
    teacher_scale: float | None = None,
):
    """One training step over the model, optimizer and random state: step(images, tokens[,
    keep]) -> (loss, grad_norm), and the state arrays to evaluate after it (keep: patch dropout's
    kept patches, (B, K)). With `teacher_scale` (distillation, one process): step(images, tokens,
    teacher_image, teacher_text[, keep]) -> (loss, grad_norm, distill term).

    Data parallel: the gradients are averaged over the ranks before clipping. With
    optim.accum_steps > 1 the step caches features micro-batch by micro-batch (accum.py).
    """
    update = make_update(model, optimizer, cfg, lanes)
    if cfg.optim.accum_steps > 1:
        from .accum import make_accum_step

        encode, features_loss = make_loss_parts(cfg, world, lanes)
        return make_accum_step(
            model, optimizer, cfg.optim.accum_steps, encode, features_loss, make_rank_mean(world), update
        )
    state = [model.state, optimizer.state, mx.random.state]
    if teacher_scale is not None:
        if world is not None and world.size > 1:
            raise ValueError("loss.distill runs on one process only (data parallel is not supported)")
        distill_grads = make_distill_grad_fn(model, cfg, teacher_scale, lanes)

        @partial(mx.compile, inputs=state, outputs=state)
        def distill_step(images, tokens, teacher_image, teacher_text, keep=None):
            loss, grads, term = distill_grads(images, tokens, teacher_image, teacher_text, keep)
            return (*update(loss, grads), term)

        return distill_step, state
    loss_and_grads = make_grad_fn(model, cfg, world, lanes)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(images, tokens, keep=None):
        return update(*loss_and_grads(images, tokens, keep))

    return step, state


def _keep_if(ok, new, old):
    return mx.where(ok, new, old)


def _all_finite(lanes: streams.Lanes, tree) -> mx.array:
    """True when every array of `tree` is finite: one reduction per tensor, fused by mx.compile."""
    leaves = _leaves(lanes.map(lambda p: mx.all(mx.isfinite(p)), tree))
    return mx.stack(leaves).all() if leaves else mx.array(True)


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
