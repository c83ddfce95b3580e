"""What a training run reads: the tokenizer, the train loader and the held-out evaluation sets.

Framework-free (numpy + mlx-data), so torch_ref.train builds the very same batches.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config, TrainSource
from ..models.config import ModelConfig
from ..schema import ConfigError
from ..text.tokenizer import MIN_VOCAB_SIZE
from ..text.vocab import AnyTokenizer, load_saved, load_tokenizer, openai_tokenizer, train_tokenizer
from . import named, synthetic
from .hf_disk import arrow_files
from .pipeline import ArraySource, Loader
from .readers import detect_format, read_samples, split_samples
from .resolution import ResolutionSchedule
from .sampler import Mixture
from .synthetic_captions import TEMPLATES
from .synthetic_scene import CLASSNAMES
from .tar_shards import shard_paths
from .transforms import ImagePreprocess

# The built-in dataset is generated from a fixed seed, so every run (whatever train.seed)
# is evaluated on the same held-out images.
BUILTIN_SEED = 0


@dataclass
class EvalSet:
    loader: Loader
    captions: list[list[str]]  # every caption of each image (retrieval counts a hit on any)
    labels: np.ndarray | None = None  # zero-shot class per image, when the set has classes


@dataclass
class SourceInfo:
    """One training source of a mixture, as read: its part of the run's sample list."""

    name: str  # "data.train[i]"
    source: TrainSource
    start: int  # where its samples start in the training sample list
    samples: int  # training samples (after the check and the held-out split)
    skipped: int | None  # bad items the check left out (None: not checked)
    share: float  # expected share of an epoch's draws: weight / sum of the weights
    draws: float  # expected draws per epoch over its size: passes over it (< 1: part of it)

    def describe(self) -> str:
        skipped = "" if self.skipped is None else f", {self.skipped} skipped"
        line = (
            f"{self.name} {self.source.path}: {self.samples} samples{skipped}, weight "
            f"{self.source.weight:g}, expected share {self.share:.1%} "
            f"({self.draws:.2g} passes over it per epoch)"
        )
        if self.source.weight == 0:
            line += " (warning: weight 0, never drawn)"
        return line


@dataclass
class RunData:
    train: Loader | None  # None when built for evaluation only
    tokenizer: AnyTokenizer
    tokenize: Callable[[list[str]], np.ndarray]
    evals: dict[str, EvalSet] = field(default_factory=dict)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    source: str = ""
    sources: list[SourceInfo] = field(default_factory=list)  # a mixture's, one per data.train entry
    # data.resolution_schedule: the image size of each step, and a train Loader per size (the
    # native one is `train`), built on first use by `make_train(size)`; the same samples, order
    # and draws, so batch k of epoch e differs between them only in its pixels
    resolution: ResolutionSchedule | None = None
    make_train: Callable[[int], Loader] | None = None
    train_by_size: dict[int, Loader] = field(default_factory=dict)

    def train_at(self, step: int) -> Loader:
        """The train Loader for 0-based step `step`: `train`, or the one at the schedule's size."""
        size = self.resolution.size_at(step) if self.resolution is not None else self.train.image_size
        if size == self.train.image_size:
            return self.train
        if size not in self.train_by_size:
            self.train_by_size[size] = self.make_train(size)
        return self.train_by_size[size]

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {e.loader.num_samples}" for k, e in self.evals.items())
        train = (
            f"train {self.train.num_samples} images ({len(self.train)} batches/epoch), " if self.train else ""
        )
        return (
            f"{self.source}: {train}held out: {sizes or 'none'}; tokenizer {self.tokenizer.vocab_size} tokens"
        )

    def val_pairs(self):
        """(images, tokens) numpy batches of the val set (256 pairs, each image with its first
        caption): the val loss is their size-weighted mean loss, in MLX and in torch_ref.train."""
        ev = self.evals["val"]
        for batch in ev.loader.epoch(0):
            if len(batch["index"]) >= 2:  # a contrastive loss needs negatives
                yield batch["images"], self.tokenize([ev.captions[i][0] for i in batch["index"].tolist()])


def build_tokenizer(
    cfg: Config, mcfg: ModelConfig, captions: list[list[str]], saved: Path | None
) -> AnyTokenizer:
    """The run's tokenizer; a resumed or fine-tuned run reuses the one saved with its checkpoint."""
    kind = cfg.tokenizer.kind
    if saved is not None:
        tok = load_saved(saved)
    elif kind in ("auto", "trained"):
        if mcfg.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size={mcfg.vocab_size} is too small for a trained tokenizer: it needs at "
                f"least {MIN_VOCAB_SIZE} (512 byte symbols, start and end tokens)"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = train_tokenizer((c for caps in captions for c in caps), mcfg.vocab_size)
        for w in caught:  # a small caption vocabulary is normal here: say so once, plainly
            print(f"tokenizer: {w.message}")
    elif kind == "openai":
        tok = openai_tokenizer()
    else:
        tok = load_tokenizer(kind)
    if tok.vocab_size != mcfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {mcfg.vocab_size}; "
            "set model.vocab_size to match (or tokenizer.kind: trained)"
        )
    return tok


def _checked(source: str, d, kw: dict, skip_log, name: str | None = None) -> list:
    """Samples of an own-data source; with a skip log, bad items are scanned for, logged and
    dropped (checks.prepare), and too large a bad share stops the run here, before training.
    `name`: a mixture's "data.train[i]", which the error and every logged skip then carry."""
    return (
        _check(source, d, kw, skip_log, name).samples if skip_log is not None else read_samples(source, **kw)
    )


def _check(source: str, d, kw: dict, skip_log, name: str | None = None):
    """checks.prepare on one source with the data section's limits: its Report."""
    from . import checks

    return checks.prepare(
        source,
        log=skip_log if name is None else _SourceSkips(skip_log, [name]),
        mode=d.validate,
        max_bad_fraction=d.max_bad_fraction,
        max_image_pixels=d.max_image_pixels,
        max_aspect_ratio=d.max_aspect_ratio or None,
        max_caption_chars=d.max_caption_chars,
        source=source if name is None else f"{name} {source}",
        **kw,
    )


class _SourceSkips:
    """A skip log's view that writes which mixture source each skip belongs to: `names[s]` for
    source s, found from the skip's sample index through `mixture` (one name: every skip)."""

    def __init__(self, log, names: list[str], mixture: Mixture | None = None):
        self.log, self.names, self.mixture = log, names, mixture
        self.path = log.path

    def add(self, skip) -> None:
        s = 0 if self.mixture is None else int(self.mixture.source_of(np.array([skip.index]))[0])
        self.log.add(dataclasses.replace(skip, source=self.names[s]))

    __call__ = add

    def extend(self, skips) -> None:
        for skip in skips:
            self.add(skip)


def _mixture_sources(cfg: Config, skip_log) -> tuple[list, list, list[SourceInfo]]:
    """data.train as a list: each source read and checked on its own (its own bad share), its
    held-out part split off when no data.val is given; (train samples end to end, held-out
    samples, the sources)."""
    d, train, val, infos = cfg.data, [], [], []
    total = sum(s.weight for s in d.sources())
    for i, src in enumerate(d.sources()):
        name, kw = (
            f"data.train[{i}]",
            dict(image_key=src.image_key, caption_key=src.caption_key, fmt=src.format),
        )
        if skip_log is None:
            samples, skipped = read_samples(src.path, **kw), None
        else:
            report = _check(src.path, d, kw, skip_log, name)
            samples, skipped = report.samples, len(report.bad_items())
        held = []
        if not d.val and d.val_ratio > 0:
            samples, held = split_samples(samples, d.val_ratio, cfg.train.seed)
        infos.append(SourceInfo(name, src, len(train), len(samples), skipped, src.weight / total, 0.0))
        train.extend(samples)
        val.extend(held)
    empty = [s.name for s in infos if not s.samples]
    if empty:
        raise ConfigError(f"{', '.join(empty)}: no training samples left; remove the source or add data")
    draws = sum(s.samples for s in infos if s.source.weight > 0)  # an epoch (sampler.mixture_order)
    for s in infos:
        s.draws = draws * s.share / s.samples
    return train, val, infos


def val_source(d) -> str | None:
    """Where the val set is read from: data.val, else the val split a named train source ships
    (`coco:ROOT` -> `coco:ROOT:val`, data/named.py); None: a data.val_ratio share of train (or none)."""
    if d.val:
        named.check_val(d.val, d.format)
        return d.val
    if d.train == "builtin" or d.is_mixture:  # a mixture holds val_ratio out of each source
        return None
    return named.default_val(d.train, d.format)


def builtin_sources(d, mcfg: ModelConfig, with_train: bool):
    """The built-in dataset: (description, train source or None, val source, val labels or None)."""
    S = mcfg.image_size
    grid = d.builtin_grid
    if grid < 0:  # auto: the patch grid, when it has room for two large objects side by side
        grid = mcfg.patch_size if S // mcfg.patch_size >= 5 else 0
    paraphrases = f", {d.builtin_paraphrases} paraphrases" if d.builtin_paraphrases else ""
    source = f"built-in shapes ({d.builtin_split}, {S}px, grid {grid or 'off'}{paraphrases})"
    train_src, val_src, labels = None, [], None
    if with_train:
        n, split, paraphrases = d.builtin_train_size, d.builtin_split, d.builtin_paraphrases or 1
        train_set = synthetic.generate(n, S, BUILTIN_SEED, "train", split, grid, paraphrases)
        train_src = ArraySource(train_set.images, train_set.captions)
    if not d.val:
        # The held-out captions ignore builtin_paraphrases: runs are compared on the same set.
        val_set = synthetic.generate(d.builtin_val_size, S, BUILTIN_SEED, "val", "single", grid)
        val_src, labels = ArraySource(val_set.images, val_set.captions), val_set.labels
    return source, train_src, val_src, labels


def build_run_data(
    cfg: Config,
    mcfg: ModelConfig,
    tokenizer_dir: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    with_train: bool = True,
    skip_log=None,
) -> RunData:
    """Loaders and tokenizer for a run. with_train=False builds the held-out sets only (eval)."""
    d = cfg.data
    S = mcfg.image_size
    kw = dict(image_key=d.image_key, caption_key=d.caption_key, fmt=d.format)
    val_spec = val_source(d)
    classnames, templates, labels, augment = [], [], None, False
    sources, mixture = [], None
    if d.is_mixture:
        source, train_src, val_src = f"a mixture of {len(d.train)} sources", None, []
        if with_train:
            train_src, val_src, sources = _mixture_sources(cfg, skip_log)
            mixture = Mixture(tuple(s.samples for s in sources), tuple(s.source.weight for s in sources))
        if d.augment:
            augment = dict(scale=tuple(d.crop_scale), color_jitter=d.color_jitter, hflip=d.hflip)
    elif d.train == "builtin":
        source, train_src, val_src, labels = builtin_sources(d, mcfg, with_train)
        if labels is not None:
            classnames, templates = list(CLASSNAMES), list(TEMPLATES)
        # No augmentation: colour and position are what the captions describe.
    else:
        source, train_src, val_src = d.train, None, []
        if with_train:
            train_src = _checked(d.train, d, kw, skip_log)
            if not val_spec and d.val_ratio > 0:
                train_src, val_src = split_samples(train_src, d.val_ratio, cfg.train.seed)
        if d.augment:
            augment = dict(scale=tuple(d.crop_scale), color_jitter=d.color_jitter, hflip=d.hflip)
    if val_spec:
        if not d.val:
            print(f"data: val from {val_spec}, the dataset's own val split (data.val_ratio is not used)")
        val_src = _checked(val_spec, d, kw, skip_log)
    train_caps = (
        train_src.captions if isinstance(train_src, ArraySource) else [s.captions for s in train_src or []]
    )
    val_caps = val_src.captions if isinstance(val_src, ArraySource) else [s.captions for s in val_src]

    tokenizer = build_tokenizer(cfg, mcfg, train_caps, tokenizer_dir)
    ctx = mcfg.context_length

    def tokenize(texts: list[str]) -> np.ndarray:
        return tokenizer(texts, ctx)

    # The model's own preprocessing (ModelConfig's mean/std, resize mode, filter), train and eval alike.
    common = dict(num_workers=d.num_workers, prefetch=d.prefetch, rank=rank, world_size=world_size)
    common["preprocess"] = ImagePreprocess.of(mcfg)
    files = {}
    if skip_log is not None:  # own data: a bad image mid-epoch is replaced and reported, never fatal
        files = dict(on_error="skip", on_skip=skip_log, max_image_pixels=d.max_image_pixels)
        files["max_aspect_ratio"] = d.max_aspect_ratio or None
    if d.train != "builtin":
        common.update(files)
    train, make_train, resolution = None, None, None
    if mixture is not None and skip_log is not None:  # decode-time skips name their source too
        common["on_skip"] = _SourceSkips(skip_log, [s.name for s in sources], mixture)
    if with_train:
        # data.batch_size is the GLOBAL batch: the Loader gives each rank a contiguous
        # batch_size / world_size slice of it, so the batches are the same for any world size.
        if d.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={d.batch_size} is the global batch and must be divisible by the "
                f"number of ranks ({world_size})"
            )

        def make_train(size: int) -> Loader:
            return Loader(
                train_src,
                d.batch_size // world_size,
                size,
                train=True,
                seed=cfg.train.seed,
                augment=augment,
                sampler=d.sampler,
                tokenize=tokenize,
                mixture=mixture,
                **common,
            )

        train = make_train(S)
        resolution = ResolutionSchedule.of(d.resolution_schedule, cfg.train.steps, S)
    evals = {}
    if len(val_caps):
        # Every rank encodes the whole held-out set, so evaluation needs no gathering.
        val_files = files if not isinstance(val_src, ArraySource) else {}
        val_loader = Loader(
            val_src,
            256,
            S,
            train=False,
            num_workers=d.num_workers,
            prefetch=d.prefetch,
            preprocess=common["preprocess"],
            **val_files,
        )
        evals["val"] = EvalSet(val_loader, val_caps, labels)
    return RunData(
        train, tokenizer, tokenize, evals, classnames, templates, source, sources, resolution, make_train
    )


def fingerprints(cfg: Config, data: RunData) -> dict:
    """What a resumed run checks its data against, per source ("train", "val"): the source, its
    files and their sizes, the sample count and a hash of the ordered sample list. The built-in
    dataset is a pure function of its parameters: those stand in for files and hash. A mixture's
    "train" is the whole sample list, and each source has its own "data.train[i]", with its weight."""
    d, found = cfg.data, {}
    val_spec = val_source(d)
    loaders = {"train": data.train, "val": data.evals["val"].loader if "val" in data.evals else None}
    for s in data.sources if data.train is not None else []:
        found[s.name] = {
            "source": s.source.path,
            "files": _source_files(s.source.path, s.source.format),
            "sample_hash": data.train.digest(s.start, s.start + s.samples)[:16],
            "samples": s.samples,
            "weight": s.source.weight,
        }
    for name, loader in loaders.items():
        if loader is None:
            continue
        spec = val_spec if name == "val" and val_spec else d.train
        if isinstance(spec, list):  # a mixture: each source is fingerprinted above
            found[name] = {"source": data.source, "sample_hash": loader.digest()[:16]}
        elif spec == "builtin":
            size = d.builtin_train_size if name == "train" else d.builtin_val_size
            found[name] = {"source": data.source, "size": size, "seed": BUILTIN_SEED}
        else:
            found[name] = {"source": spec, "files": _source_files(spec, d.format)}
            found[name]["sample_hash"] = loader.digest()[:16]
        found[name]["samples"] = loader.num_samples
    return found


def _source_files(spec: str, fmt: str) -> dict[str, int]:
    """The files a source is read from, with their sizes in bytes (-1: gone). A folder's files are
    its images, which the sample list already names."""
    fmt = detect_format(spec) if fmt == "auto" else fmt
    if fmt == "folder":
        paths = []
    elif fmt in ("tar", "parquet"):
        paths = shard_paths(spec, "." + fmt)
    elif fmt == "hf":
        paths = arrow_files(spec)
    elif fmt in named.NAMES:  # the annotation file, or the shards
        paths = named.source_files(spec, fmt)
    else:
        paths = [spec]
    sizes = {}
    for path in paths:
        try:
            sizes[str(path)] = os.path.getsize(path)
        except OSError:
            sizes[str(path)] = -1
    return sizes
