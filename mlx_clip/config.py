"""The run config: dataclasses per section, YAML loading with dotted CLI overrides, the resolved config.yaml.

Framework-free on purpose: torch_ref, the benchmarks and the CLIs all read the
same files through this module, so there is exactly one config path:
YAML -> dataclass -> constructor. The strict conversion is mlx_clip/schema.py; the
architecture (the model section's base) is mlx_clip/models/config.py.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .data.resolution import schedule_problem
from .evaluation.spec import EvalSetSpec, best_metric_problem
from .models.config import ModelConfig, model_config
from .models.locate import checkpoint_model_config
from .models.lora_config import FinetuneConfig
from .schema import ConfigError, from_dict, load_yaml, merge, move_deprecated, parse_yaml, set_dotted, to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP paper: t' = log 10, b = -10
SIGLIP_LOGIT_BIAS_INIT = -10.0
MAX_LR = 10.0

# Allowed values, each listed once: the coercer (schema.py) refuses anything else, naming the key, and
# the module that acts on a value takes its tuple from here with typing.get_args.
Auto = Literal["auto"]
# A reader each: data/readers.py (parquet: data/parquet.py, hf = `datasets` on disk: data/hf_disk.py;
# the named datasets, NAME:ROOT[:split] as their publishers ship them: data/named.py)
NamedDataset = Literal["coco", "flickr30k", "cc3m"]
SourceFormat = Literal["csv", "tsv", "json", "jsonl", "folder", "tar", "parquet", "hf", NamedDataset]
DataFormat = Literal["auto", SourceFormat]  # auto: detected from the path
ImageCheck = Literal["header", "full", "off"]  # data/checks.py
BuiltinSplit = Literal["single", "pair", "mixed"]  # data/synthetic.py
Sampler = Literal["random", "hard_negative"]  # data/sampler.py
LossType = Literal["clip", "siglip", "hard_negative", "multi_scale"]  # training/loss.py
HardNegativeStrategy = Literal["semi-hard", "hard", "weighted"]  # training/loss.py
TemperatureSchedule = Literal["learnable", "constant", "warmup", "cosine", "exponential", "adaptive"]
Precision = Literal["float32", "bfloat16"]
OptimizerName = Literal["adamw", "lion"]  # training/optim.py
LRSchedule = Literal["cosine", "const", "const-cooldown"]  # training/optim_rules.py


@dataclass
class _ModelSectionBase:
    # a configs/models name or an architecture YAML path; "custom": ModelConfig's defaults, so
    # every field that differs comes from this section; "checkpoint": the architecture saved with
    # init_from (a converted or trained checkpoint), so fine-tuning needs no architecture name
    arch: str = "tiny"
    init_from: str | None = None  # fine-tuning: a .safetensors file, a checkpoint or a run directory

    def overrides(self) -> dict:
        """The ModelConfig fields this section sets (the others keep the architecture's value)."""
        return {
            f.name: v for f in dataclasses.fields(ModelConfig) if (v := getattr(self, f.name)) is not None
        }


# The `model:` section: arch, init_from, and one optional override per ModelConfig field, typed as
# that field (or None: the architecture's value), so an unknown key or a wrong type is refused by
# from_dict like anywhere else. Derived from ModelConfig: a new architecture field needs no edit here.
_MODEL_HINTS = typing.get_type_hints(ModelConfig)
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(f.name, _MODEL_HINTS[f.name] | None, field(default=None)) for f in dataclasses.fields(ModelConfig)],
    bases=(_ModelSectionBase,),
)
ModelSection.__module__ = __name__  # make_dataclass (3.11) cannot be told; pickle and repr look here


@dataclass
class TrainSource:
    """One source of a mixture (`data.train` as a list): a path, its weight, and optionally its own
    format and keys (None: the data section's)."""

    path: str
    weight: float = 1.0  # the share of an epoch's draws is weight / sum of the weights
    format: DataFormat | None = None
    image_key: str | None = None
    caption_key: str | None = None


@dataclass
class DataConfig:
    """Where images and captions come from and how they are batched."""

    # "builtin" (generated shapes) or a path: .csv/.tsv, .json/.jsonl, a folder, or .tar shards
    # (glob or brace list), or a named dataset (coco:ROOT, flickr30k:ROOT, cc3m:ROOT, with an optional
    # :split; its own val split when val is not set). The format is detected from the path unless
    # `format` is set. Or a weighted mixture: a list of {path, weight[, format, image_key, caption_key]}
    # (data/sampler.py: mixture_order says what an epoch is then).
    train: str | list[TrainSource] = "builtin"
    val: str | None = None
    val_ratio: float = 0.05  # held out of `train` when no `val` is given
    format: DataFormat = "auto"
    image_key: str = "image"
    caption_key: str = "caption"
    batch_size: int | Auto = 64  # or "auto": the largest batch within train.memory_budget_gb
    num_workers: int = 2
    prefetch: int = 4
    # augmentation, train split only (no horizontal flip by default: captions say left/right)
    augment: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    color_jitter: float = 0.0
    hflip: bool = False
    # bad data (own data only): the pre-flight image check (data/checks.py); a run with a
    # larger bad share stops before it starts; every skip goes to OUT/skipped.jsonl
    validate: ImageCheck = "header"
    max_bad_fraction: float = 0.05
    max_image_pixels: int = 89478485  # width x height, read from the header before decoding
    max_aspect_ratio: float = 50.0  # longer side / shorter side, from the header (0: no limit)
    max_caption_chars: int = 4096  # 0: no limit
    # the built-in dataset
    builtin_train_size: int = 20000
    builtin_val_size: int = 1000
    builtin_split: BuiltinSplit = "mixed"
    # Objects snapped to a grid of this many pixels (-1: the model's patch size; 0: free placement).
    builtin_grid: int = -1
    # Built-in training captions: 0 = five captions of varying detail per image (the default data);
    # 2-10 = that many complete paraphrases instead. Training draws one caption per step.
    builtin_paraphrases: int = 0
    # "random" or "hard_negative": batches group samples whose captions share nouns (harder negatives).
    sampler: Sampler = "random"
    # Progressive resizing (FLIP / CLIPA): train at a lower image size first. A list of [fraction,
    # size] pairs, each size starting at that fraction of train.steps, the first at 0.0, e.g.
    # [[0.0, 112], [0.5, 224]]; sizes are multiples of the patch size. Evaluation and checkpoints
    # stay at the model's size (data/resolution.py). null: the model's size throughout.
    resolution_schedule: list[list[int | float]] | None = None

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.train, list)

    def sources(self) -> list[TrainSource]:
        """The training sources, each with its format and keys filled in from this section."""
        listed = self.train if self.is_mixture else [TrainSource(self.train)]
        return [
            TrainSource(
                s.path,
                s.weight,
                s.format or self.format,
                s.image_key or self.image_key,
                s.caption_key or self.caption_key,
            )
            for s in listed
        ]

    def validate_sources(self) -> None:
        """A mixture's entries: paths given, weights >= 0 with a positive sum, no built-in set."""
        if not self.is_mixture:
            return
        if not self.train:
            raise ConfigError(
                "data.train is an empty list: give a path, or a list of {path: SRC, weight: W} entries"
            )
        for i, s in enumerate(self.train):
            if not s.path:
                raise ConfigError(f"data.train[{i}].path is empty; got {s.path!r}: name a data source")
            if s.path == "builtin":
                raise ConfigError(
                    f"data.train[{i}].path 'builtin': the built-in dataset cannot be part of a mixture "
                    "(it is generated in memory); give own-data sources, or data.train: builtin alone"
                )
            if s.weight < 0:
                raise ConfigError(f"data.train[{i}].weight must be >= 0, got {s.weight} ({s.path})")
        if self.sampler == "hard_negative":
            raise ConfigError(
                "data.sampler hard_negative does not combine with a data.train mixture: its batches "
                "group the samples of the whole set by caption words, which would ignore the weights; "
                "use data.sampler random, or one source"
            )
        if not sum(s.weight for s in self.train) > 0:
            weights = ", ".join(f"data.train[{i}].weight={s.weight:g}" for i, s in enumerate(self.train))
            raise ConfigError(f"data.train: every weight is 0 ({weights}); at least one must be > 0")


@dataclass
class TokenizerConfig:
    # "auto": the checkpoint's tokenizer when fine-tuning, else a BPE trained on the captions.
    # "trained": always train one; "openai": the 49408-token CLIP vocabulary (needs
    # vocab_size 49408); or a path: a saved tokenizer, a Hugging Face tokenizer directory (CLIP,
    # any tokenizer.json, or a SentencePiece model, with its settings) or a SentencePiece .model file.
    kind: str = "auto"


@dataclass
class TemperatureConfig:
    """The softmax temperature tau (logits = cosine / tau; the logit scale is 1 / tau)."""

    # learnable (CLIP: a trained log(1/tau), clamped at tau >= 0.01) | constant | warmup | cosine |
    # exponential | adaptive (lower tau by `factor` when the val loss stops improving)
    schedule: TemperatureSchedule = "learnable"
    start: float = 0.07  # tau at step 0
    end: float = (
        0.01  # warmup: reached after warmup_steps; cosine/exponential: at the last step; adaptive: floor
    )
    warmup_steps: int = 100
    patience: int = 1  # adaptive: evaluations without a val-loss improvement before lowering tau
    factor: float = 0.5  # adaptive: tau <- max(end, tau * factor)
    threshold: float = 1e-3  # adaptive: a relative val-loss drop smaller than this is no improvement

    def validate(self, where: str = "loss.temperature") -> None:
        for name in ("start", "end"):
            tau = getattr(self, name)
            if not 0.01 <= tau <= 100:
                raise ConfigError(
                    f"{where}.{name} must be in [0.01, 100] (the logit scale 1/tau is at most 100), got {tau}"
                )
        if self.warmup_steps < 0 or self.patience < 1:
            raise ConfigError(f"{where}.warmup_steps must be >= 0 and {where}.patience >= 1")
        if not 0 < self.factor < 1:
            raise ConfigError(f"{where}.factor must be in (0, 1), got {self.factor}")
        if self.threshold < 0:
            raise ConfigError(f"{where}.threshold must be >= 0, got {self.threshold}")


@dataclass
class DistillConfig:
    """Distillation from a teacher's stored embeddings (`python -m mlx_clip.embed`; training/distill.py):
    the loss adds weight * the cross-entropy of the student's batch softmax against the teacher's."""

    embeddings: str | None = None  # the embed output directory (index.json + shards); None: off
    weight: float = 1.0
    temperature: float | None = None  # teacher logits = cosine / temperature; None: the teacher's own

    @property
    def enabled(self) -> bool:
        return self.embeddings is not None

    def validate(self) -> None:
        if not 0 <= self.weight <= 1000:
            raise ConfigError(f"loss.distill.weight must be in [0, 1000], got {self.weight}")
        t = self.temperature
        if t is not None and not 0 < t <= 100:
            raise ConfigError(
                f"loss.distill.temperature must be in (0, 100] (or null: the teacher's own), got {t}"
            )


@dataclass
class LossConfig:
    # clip (symmetric InfoNCE) | siglip (pairwise sigmoid) | hard_negative | multi_scale
    type: LossType = "clip"
    label_smoothing: float = 0.0
    # Data parallel only: each rank computes the loss rows of its own samples against the gathered
    # global batch ((b, W*b) logits) instead of the whole (W*b, W*b) loss; same gradients.
    local_loss: bool = False
    # hard_negative: which negatives get extra weight, and how much (docs/objectives.md)
    strategy: HardNegativeStrategy = "hard"
    ratio: float = 0.1  # share of each row's negatives that count as hard (hard, semi-hard)
    weight: float = 1.0  # extra weight of the hard negatives; 0 is plain clip
    margin: float = 0.2  # semi-hard: cosine margin below the positive
    # multi_scale: the clip loss at these multiples of the logit scale, mixed by normalised weights
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    scale_weights: list[float] | None = None  # None: equal
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.type == "siglip":
            raise ConfigError("loss.label_smoothing applies to softmax losses, not loss.type=siglip")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"loss.ratio must be in (0, 1], got {self.ratio}")
        if not 0 <= self.weight <= 1000:
            raise ConfigError(f"loss.weight must be in [0, 1000], got {self.weight}")
        if not 0 < self.margin <= 2:
            raise ConfigError(f"loss.margin must be in (0, 2] (cosine similarity units), got {self.margin}")
        if not self.scales or not all(0 < s <= 100 for s in self.scales):
            raise ConfigError(
                f"loss.scales must be a non-empty list of numbers in (0, 100], got {self.scales}"
            )
        w = self.scale_weights
        if w is not None and (len(w) != len(self.scales) or any(x < 0 for x in w) or sum(w) <= 0):
            raise ConfigError(
                f"loss.scale_weights must be {len(self.scales)} non-negative numbers (one per loss.scales) "
                f"with a positive sum, got {w}"
            )
        self.temperature.validate()
        self.distill.validate()


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0  # floor of the cosine decay
    warmup_steps: int = 50
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Per-tower learning rates (None: optim.lr); the schedule scales each the same way.
    image_lr: float | None = None
    text_lr: float | None = None
    # Fine-tuning: lock a tower (LiT locks the image tower); unlock its last N residual blocks
    # (with the final norm and projection). logit_scale always trains.
    lock_image: bool = False
    lock_image_unlocked_layers: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # GradCache / open_clip accum-freq: the batch is run as accum_steps micro-batches whose features
    # form one contrastive batch; same gradients as the whole batch, activations of one micro-batch.
    accum_steps: int = 1
    # adamw, or lion (sign updates: take lr 3-10x smaller and weight_decay 3-10x larger than
    # AdamW's; beta1/beta2 are Lion's two betas, eps is unused)
    optimizer: OptimizerName = "adamw"
    # After warmup: cosine (to min_lr at the last step) | const | const-cooldown (const, then the
    # last cooldown_steps decay to cooldown_end_lr as (1 - progress) ** cooldown_power; open_clip's)
    schedule: LRSchedule = "cosine"
    cooldown_steps: int = 0
    cooldown_power: float = 1.0  # 1: linear
    cooldown_end_lr: float = 0.0
    # Layer-wise learning-rate decay per tower (BEiT/timm; null or 1: off): residual block i of L
    # gets decay ** (L - i) times the tower's rate, the embeddings decay ** (L + 1), the final
    # norm, pooling head and projection 1.
    image_layer_decay: float | None = None
    text_layer_decay: float | None = None


@dataclass
class TrainConfig:
    steps: int = 450
    seed: int = 0
    precision: Precision = "float32"  # bfloat16: bf16 compute, float32 weights and optimizer
    grad_checkpointing: bool = False  # recompute each transformer block in backward: less memory
    # Batch shards run on their own MLX streams (mlx_clip/models/streams.py): "auto" is one per core on
    # the CPU backend, where a stream is one busy core, and 1 on a GPU.
    streams: int | Auto = "auto"
    memory_budget_gb: float | None = None  # data.batch_size auto: None is 60% of device memory
    log_every: int = 20
    save_every: int = 150  # 0: only at the end
    keep_last: int = 2  # recent checkpoints kept, besides the best one
    tensorboard: bool = False
    progress: bool = True
    # One OpenBLAS thread: multi-threaded OpenBLAS drifts in the last bits between identical runs
    # (measured), which would break bit-exact resume; false trades that for BLAS speed.
    deterministic: bool = True
    # Non-finite loss, gradient or updated weights: the step is skipped; this many in a row stop the run.
    max_bad_steps: int = 5
    # Data parallel only (mlx.launch): a rank that waits longer than this on the others (a dead
    # rank, a lost link) exits; it must exceed rank 0's longest evaluation + checkpoint.
    dist_timeout: float = 300.0
    dist_bucket_mb: float = 25.0  # gradients are averaged in all_sum buckets of about this size
    # An exponential moving average of the trainable weights, updated after every accepted step
    # (training/ema.py; 0: off). Saved as ema.safetensors beside model.safetensors.
    ema_decay: float = 0.0
    # The EMA's averaging window 1 / (1 - decay) grows linearly from 1 step to its full
    # 1 / (1 - ema_decay) over the first ema_warmup steps (0: the full decay from step 1).
    ema_warmup: int = 0


@dataclass
class EvalConfig:
    """Evaluation during training: the run's own held-out split, plus named sets (evaluation/suite.py)
    read once before step 1 and evaluated with it, into the same metrics.jsonl record."""

    every: int = 150  # steps between evaluations; 0: only at the end (the final one always runs)
    # The metric that picks the best checkpoint: "auto" (zero-shot top-1, else i2t R@1, on the run's
    # held-out split), a held-out metric (val_loss, i2t_R@1, ...) or "NAME/metric" of a set. Losses
    # and ranks count lower as better, everything else higher.
    best: str = "auto"
    # Named sets, each {name, kind: zeroshot|retrieval|linear_probe, path, test_path (linear_probe),
    # templates (zeroshot: openai|short|dataset|FILE)}; metrics are "NAME/top1", "NAME/i2t_R@1", ...
    sets: list[EvalSetSpec] = field(default_factory=list)
    # Evaluate (and pick the best checkpoint by) the EMA weights (needs train.ema_decay > 0).
    use_ema: bool = False

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0: only at the end), got {self.every}")
        seen = set()
        for i, spec in enumerate(self.sets):
            problem = spec.problem()
            if problem:
                raise ConfigError(f"eval.sets[{i}] ({spec.name!r}): {problem}")
            if spec.name in seen:
                raise ConfigError(f"eval.sets[{i}]: the name {spec.name!r} is used twice; names must differ")
            seen.add(spec.name)
        problem = best_metric_problem(self.best, self.sets)
        if problem:
            raise ConfigError(f"eval.best={self.best!r} is not a metric the run reports; {problem}")


# Keys that moved: the old one is still read, with a warning; old and new together must agree.
DEPRECATED_KEYS = {"train.eval_every": "eval.every", "train.best_metric": "eval.best"}


@dataclass
class Config:
    """A whole run. `model` is an architecture name plus optional field overrides (ModelSection).

    The defaults are the README's main command: `tiny` on the built-in dataset, sized to finish in
    under 10 minutes on a 2-core CPU (450 steps of 64 pairs).
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # LoRA / QLoRA (models/lora_config.py)

    def model_config(self) -> ModelConfig:
        """The architecture (ModelConfig's defaults for "custom"), then the SigLIP paper's init where
        it sets none and loss.type is siglip, then the model section's overrides."""
        values = to_dict(self._architecture())
        if self.loss.type == "siglip":
            for name, init in (
                ("init_logit_scale", SIGLIP_LOGIT_SCALE_INIT),
                ("init_logit_bias", SIGLIP_LOGIT_BIAS_INIT),
            ):
                values[name] = init if values[name] is None else values[name]
        cfg = ModelConfig(**{**values, **self.model.overrides()})
        cfg.validate()
        return cfg

    def _architecture(self) -> ModelConfig:
        arch = self.model.arch
        if arch == "custom":
            return ModelConfig()
        if arch != "checkpoint":
            return model_config(arch)
        if not self.model.init_from:
            raise ConfigError(
                "model.arch checkpoint takes the architecture saved with model.init_from, and "
                "model.init_from is not set; name a checkpoint there or an architecture in model.arch"
            )
        try:
            saved = checkpoint_model_config(self.model.init_from)
        except (OSError, ValueError) as e:  # no checkpoint there, an unreadable header, none recorded
            raise ConfigError(f"model.arch checkpoint: {e}") from None
        return ModelConfig.from_dict(saved, where=f"model.init_from {self.model.init_from}: model")

    def validate(self) -> None:
        mcfg = self.model_config()
        d, o, t = self.data, self.optim, self.train
        if d.batch_size != "auto" and d.batch_size < 2:
            raise ConfigError(
                f"data.batch_size={d.batch_size}: a contrastive loss needs at least 2 pairs per batch "
                "(the other pairs are the negatives)"
            )
        d.validate_sources()
        if not 0 <= d.val_ratio < 1:
            raise ConfigError(f"data.val_ratio must be in [0, 1), got {d.val_ratio}")
        if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            raise ConfigError(
                f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}"
            )
        if not 0 <= d.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
        if d.max_image_pixels < 1 or d.max_caption_chars < 0:
            raise ConfigError("data.max_image_pixels must be >= 1 and data.max_caption_chars >= 0")
        if d.color_jitter < 0:
            raise ConfigError(f"data.color_jitter must be >= 0, got {d.color_jitter}")
        if not (d.max_aspect_ratio == 0 or 1 <= d.max_aspect_ratio < math.inf):
            raise ConfigError(
                f"data.max_aspect_ratio must be 0 (no limit) or a number >= 1, got {d.max_aspect_ratio}"
            )
        if d.num_workers < 1 or d.prefetch < 1:
            raise ConfigError("data.num_workers and data.prefetch must be at least 1")
        problem = schedule_problem(d.resolution_schedule, t.steps, mcfg.patch_size)
        if problem:
            raise ConfigError(problem)
        if d.builtin_paraphrases != 0 and not 2 <= d.builtin_paraphrases <= 10:
            raise ConfigError(
                f"data.builtin_paraphrases must be 0 (the five default captions per image) or 2-10 "
                f"paraphrases, got {d.builtin_paraphrases}"
            )
        self.loss.validate()
        for name in ("lr", "image_lr", "text_lr"):  # AdamW moves each weight by about lr per step
            lr = getattr(o, name)
            if lr is not None and not 0 < lr <= MAX_LR:
                null = "" if name == "lr" else " (or null for optim.lr)"
                raise ConfigError(f"optim.{name} must be in (0, {MAX_LR:g}]{null}, got {lr}")
        if o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
        if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
        for tower, layers in (("image", mcfg.vision_layers), ("text", mcfg.text_layers)):
            n = getattr(o, f"lock_{tower}_unlocked_layers")
            if not 0 <= n <= layers:
                raise ConfigError(f"optim.lock_{tower}_unlocked_layers must be in [0, {layers}], got {n}")
        if o.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be at least 1, got {o.accum_steps}")
        if self.loss.distill.enabled and o.accum_steps > 1:
            raise ConfigError(
                "loss.distill does not support optim.accum_steps > 1 yet; set optim.accum_steps 1"
            )
        if isinstance(d.batch_size, int) and d.batch_size % o.accum_steps:
            raise ConfigError(
                f"data.batch_size={d.batch_size} is not divisible by optim.accum_steps={o.accum_steps}: "
                "the batch is split into accum_steps equal micro-batches"
            )
        if o.warmup_steps < 0 or o.grad_clip < 0 or not 0 < o.eps < 1:
            raise ConfigError("optim.warmup_steps and grad_clip must be >= 0, and eps in (0, 1)")
        if not 0 <= o.weight_decay <= 10:
            raise ConfigError(f"optim.weight_decay must be in [0, 10], got {o.weight_decay}")
        if t.steps < 1:
            raise ConfigError(f"train.steps must be at least 1, got {t.steps}")
        self._validate_controls()
        if not 0 <= t.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32 - 1], got {t.seed}")
        if t.streams != "auto" and t.streams < 1:
            raise ConfigError(f"train.streams must be a positive integer or 'auto', got {t.streams!r}")
        if t.memory_budget_gb is not None and t.memory_budget_gb <= 0:
            raise ConfigError(f"train.memory_budget_gb must be > 0 (or null), got {t.memory_budget_gb}")
        if t.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps must be at least 1, got {t.max_bad_steps}")
        if t.log_every < 1 or t.save_every < 0 or t.keep_last < 1:
            raise ConfigError("train.log_every and keep_last must be >= 1; train.save_every >= 0")
        if t.dist_timeout <= 0 or t.dist_bucket_mb <= 0:
            raise ConfigError("train.dist_timeout and train.dist_bucket_mb must be > 0")
        kind = self.tokenizer.kind
        if kind == "openai" and mcfg.vocab_size != 49408:
            raise ConfigError(
                f"tokenizer.kind='openai' has 49408 tokens but model.vocab_size={mcfg.vocab_size}"
            )
        self.eval.validate()
        self.finetune.validate(mcfg, o, self.model.init_from)

    def _validate_controls(self) -> None:
        """Optimizer, schedule, layer decay and EMA settings."""
        o, t = self.optim, self.train
        if o.schedule == "const-cooldown":
            room = t.steps - o.warmup_steps
            if not 1 <= o.cooldown_steps <= room:
                raise ConfigError(
                    f"optim.cooldown_steps must be in [1, train.steps - optim.warmup_steps = {room}] "
                    f"with optim.schedule const-cooldown, got {o.cooldown_steps}"
                )
            if not 0 < o.cooldown_power <= 100:
                raise ConfigError(
                    f"optim.cooldown_power must be in (0, 100] (1: linear), got {o.cooldown_power}"
                )
            if not 0 <= o.cooldown_end_lr <= o.lr:
                raise ConfigError(
                    f"optim.cooldown_end_lr must be in [0, optim.lr={o.lr}], got {o.cooldown_end_lr}"
                )
        elif o.cooldown_steps:
            raise ConfigError(
                f"optim.cooldown_steps={o.cooldown_steps} is used only by optim.schedule const-cooldown "
                f"(now {o.schedule}); set the schedule or leave cooldown_steps at 0"
            )
        for name in ("image_layer_decay", "text_layer_decay"):
            decay = getattr(o, name)
            if decay is not None and not 0 < decay <= 1:
                raise ConfigError(f"optim.{name} must be in (0, 1] (or null: off), got {decay}")
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {t.ema_decay}")
        if t.ema_warmup < 0:
            raise ConfigError(f"train.ema_warmup must be >= 0 steps, got {t.ema_warmup}")
        if self.eval.use_ema and not t.ema_decay:
            raise ConfigError("eval.use_ema evaluates the EMA weights: set train.ema_decay (e.g. 0.999) too")


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] = (), log=print) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config.

    Override values are parsed as YAML scalars, so `--train.steps 10` is an int and
    `--data.val null` is None. Deprecated keys (DEPRECATED_KEYS) are renamed with a warning
    through `log` (None: silently, for a checkpoint's own config.yaml), in the file and on the
    command line apart, so `--train.eval_every 0` still overrides a file's `eval.every`.
    """
    data = load_yaml(path) if path else {}
    cli: dict = {}
    for dotted, raw in overrides:
        try:
            value = parse_yaml(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        set_dotted(cli, dotted, value)
    where = f"{path}: " if path else ""
    try:
        move_deprecated(data, DEPRECATED_KEYS, log)
        move_deprecated(cli, DEPRECATED_KEYS, log)
        merge(data, cli)
        cfg = from_dict(Config, data)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved config: the model section is written out in full."""
    data = to_dict(cfg)
    data["model"] = {
        "arch": cfg.model.arch,
        **({"init_from": cfg.model.init_from} if cfg.model.init_from else {}),
        **to_dict(cfg.model_config()),
    }
    return yaml.safe_dump(data, sort_keys=False)


__all__ = [
    "Config",
    "ModelSection",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LossConfig",
    "OptimConfig",
    "TemperatureConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TrainSource",
    "config_to_yaml",
    "load_config",
]
