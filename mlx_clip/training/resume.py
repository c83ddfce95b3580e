"""--resume: what changed since the checkpoint, what may change, and restoring its state; and
model.init_from: the preprocessing a run inherits from the checkpoint it starts from.

Resume is exact (bit-identical to an uninterrupted run) only if the sample stream, the batch, the
model and the objective are the ones the checkpoint was trained with. So before anything in OUT is
written, `check_config` lists every config key that changed (dotted names, old -> new), before
the data is read, and `check_data` compares the data fingerprints saved in state.json
(data/run_data.py: files and sizes, sample count, a hash of the ordered sample list; a mixture's
per source, with its weight). Changes that
break exactness are refused unless the user passes --resume-changed, whose meaning is: continue
from the same sample position (epoch, sample index) with the new settings (RunState.seek turns
that position into a batch of the new size).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, config_to_yaml, load_config
from ..models.config import ModelConfig
from ..models.locate import saved_config
from ..schema import ConfigError, parse_yaml
from . import checkpoint as ckpt_io
from .distributed import World
from .state import RunState

# Keys under these prefixes change the sample stream, the batch, the model or the objective.
# Everything else is free to change on --resume: optim.*, most of train.*, and all of eval.*
# (eval.every, eval.best, adding or removing an eval set), which only watch the training.
EXACT_PREFIXES = ("data.", "model.", "loss.", "finetune.")
EXACT_KEYS = {"train.seed"}  # seeds the epoch order and the per-sample draws
# ...except these, which change neither what is trained on nor how (the tokenizer and init
# weights of a resumed run come from its checkpoint).
FREE_KEYS = {"model.init_from", "data.num_workers", "data.prefetch", "data.max_bad_fraction"}


class ResumeError(ValueError):
    """--resume cannot continue this checkpoint as asked; the message lists why and what to do."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old_yaml: str, new_yaml: str) -> dict[str, tuple]:
    """Dotted key -> (old value, new value) for every key that differs (missing: None)."""
    old, new = flatten(parse_yaml(old_yaml) or {}), flatten(parse_yaml(new_yaml) or {})
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def breaks_exactness(key: str) -> bool:
    return key not in FREE_KEYS and (key.startswith(EXACT_PREFIXES) or key in EXACT_KEYS)


def data_changes(old: dict, new: dict) -> list[str]:
    """What differs between two sets of data fingerprints ({source: fingerprint}), one line each."""
    lines = []
    for source in sorted(old.keys() | new.keys()):
        a, b = old.get(source) or {}, new.get(source) or {}
        for field in sorted(a.keys() | b.keys()):
            if a.get(field) != b.get(field):
                lines.append(f"{source} {field}: {_show(a.get(field))} -> {_show(b.get(field))}")
    return lines


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_config(ckpt: Path | None, config_yaml: str, allow_changed: bool, log=print) -> None:
    """Rank 0, before the data is read: print every key that changed since checkpoint `ckpt`, and
    refuse (ResumeError) those that break exactness unless `allow_changed` (--resume-changed)."""
    if ckpt is None:
        return
    changes = config_changes(_in_current_schema(ckpt / "config.yaml"), config_yaml)
    if changes:
        shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
        log(f"config changed since {ckpt.name}: {shown}")
    breaking = [f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items() if breaks_exactness(k)]
    _refuse_unless_allowed(ckpt, breaking, allow_changed, log)


def _in_current_schema(path: Path) -> str:
    """A checkpoint's config.yaml with the keys added to mlx_clip since it was written at their
    defaults (which keep the old behaviour, e.g. model.image_mean), so they are no change; as
    written when it no longer loads (a key since removed is then reported as changed)."""
    try:
        return config_to_yaml(load_config(path))
    except ConfigError:
        return path.read_text()


PREPROCESS_FIELDS = ("image_mean", "image_std", "resize_mode", "interpolation")


def check_init_preprocessing(cfg: Config, weights: Path | None) -> None:
    """model.init_from: the checkpoint's preprocessing (mean/std, resize mode, filter) is the pixels
    its weights were trained on. A run whose architecture gives other values, without setting them
    itself (model.image_mean, ...), is refused with the flags that keep the checkpoint's."""
    saved = saved_config(weights) if weights is not None and weights.suffix == ".safetensors" else None
    if saved is None:
        return
    theirs, ours = ModelConfig.from_dict(saved, where=str(weights)), cfg.model_config()
    differ = [
        f
        for f in PREPROCESS_FIELDS
        if getattr(theirs, f) != getattr(ours, f) and getattr(cfg.model, f) is None
    ]
    if differ:
        value = {f: getattr(theirs, f) for f in differ}
        flags = " ".join(
            f"--model.{f} {v if isinstance(v, str) else repr(json.dumps(v))}" for f, v in value.items()
        )
        shown = ", ".join(f"{f} {_show(getattr(theirs, f))} (run: {_show(getattr(ours, f))})" for f in differ)
        raise ConfigError(
            f"model.init_from {weights} was trained with other preprocessing than model.arch "
            f"{cfg.model.arch!r} gives: {shown}. Keep the checkpoint's with {flags}, or set these "
            "fields yourself to train with other pixels"
        )


def check_data(ckpt: Path | None, fingerprints: dict, allow_changed: bool, log=print) -> None:
    """Rank 0, once the data is read, before anything in OUT is written: the same for the data
    fingerprints (data/run_data.py) saved in the checkpoint's state.json."""
    if ckpt is None:
        return
    saved = json.loads((ckpt / "state.json").read_text()).get("data")
    if saved is None:
        log(f"note: {ckpt.name} predates data fingerprints; the data cannot be checked against it")
        return
    changes = data_changes(saved, fingerprints)
    breaking = ["the data fingerprint (" + "; ".join(changes) + ")"] if changes else []
    _refuse_unless_allowed(ckpt, breaking, allow_changed, log)


def _refuse_unless_allowed(ckpt: Path, breaking: list[str], allow_changed: bool, log) -> None:
    if not breaking:
        return
    if allow_changed:
        log(f"--resume-changed: continuing from {ckpt.name}'s sample position with new {', '.join(breaking)}")
        return
    raise ResumeError(
        f"cannot resume {ckpt} exactly: changed {', '.join(breaking)}. Resume with the settings "
        "and data it was trained with; or add --resume-changed to continue from the same sample "
        f"position with the new ones; or start a new run from its weights with --out NEW "
        f"--model.init_from {ckpt}"
    )


def restore(resume_dir: Path | None, model, optimizer, world: World) -> dict | None:
    """Rank 0: load the checkpoint being resumed into model and optimizer; its run state as JSON."""
    if resume_dir is None:
        return None
    saved = ckpt_io.load_checkpoint(resume_dir, model, optimizer)
    if saved.world_size != world.size:
        raise ResumeError(
            f"checkpoint {resume_dir} was trained by {saved.world_size} rank(s) but this run "
            f"has {world.size}; resume with the same number of ranks (mlx.launch -n "
            f"{saved.world_size} ...), or start a new run from its weights with "
            f"--model.init_from {resume_dir}"
        )
    if not saved.batch_size:  # an older checkpoint counted its position in batches only
        saved.batch_size = int(parse_yaml((resume_dir / "config.yaml").read_text())["data"]["batch_size"])
        saved.samples_in_epoch = saved.batch_in_epoch * saved.batch_size
    print(f"resumed from {resume_dir} at step {saved.step}", flush=True)
    return saved.to_json()


def continue_position(state: RunState, saved: dict, batches_per_epoch: int, log=print) -> None:
    """Take over the saved run's position and turn it into a batch of this run's size."""
    state.resume_from(RunState.from_json(saved))
    position = (state.epoch, state.samples_in_epoch)
    state.seek(batches_per_epoch)
    if (state.epoch, state.samples_in_epoch) != position:
        log(
            f"data position: epoch {position[0]} sample {position[1]} continues at epoch {state.epoch} "
            f"batch {state.batch_in_epoch} (sample {state.samples_in_epoch}) at batch size {state.batch_size}"
        )
