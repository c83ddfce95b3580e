"""A sweep's search space (space.yaml): one entry per config key, framework-free.

    optim.lr:      {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    optim.warmup_steps: {type: int, low: 0, high: 100, step: 10}
    loss.type:     {type: categorical, choices: [clip, hard_negative]}
    loss.margin:   {type: float, low: 0.05, high: 0.5, when: {loss.type: hard_negative}}

Keys are dotted config keys (config.py). `when` makes an entry conditional: it is sampled only
where every named key has that value (or one of a list of values), taken from the trial's own
earlier entries, else from the base config. The trial object is optuna's; nothing else here is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..schema import ConfigError, check_dotted_key, load_yaml

KINDS = ("float", "int", "categorical")
FIELDS = {
    "float": ("type", "low", "high", "log", "step", "when"),
    "int": ("type", "low", "high", "log", "step", "when"),
    "categorical": ("type", "choices", "when"),
}


class SpaceError(ValueError):
    """space.yaml is not a valid search space; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    key: str  # a dotted config key, also optuna's parameter name
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict = field(default_factory=dict)  # key -> value or list of values

    def sample(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def load_space(path: str | Path) -> list[Param]:
    """space.yaml -> the parameters in file order; refused (SpaceError) naming the key."""
    try:
        data = load_yaml(path)
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    if not data:
        raise SpaceError(f"{path}: the search space is empty; give at least one config key")
    params: list[Param] = []
    for key, spec in data.items():
        try:
            params.append(parse_param(str(key), spec))
        except (SpaceError, ConfigError) as e:
            raise SpaceError(f"{path}: {key}: {e}") from None
    keys = [p.key for p in params]
    for i, p in enumerate(params):  # a condition reads earlier entries (or the base config)
        later = [k for k in p.when if k in keys[i + 1 :]]
        if later:
            raise SpaceError(f"{path}: {p.key}: when: {later[0]} is listed below it; move {later[0]} above")
    return params


def parse_param(key: str, spec) -> Param:
    check_dotted_key(Config, key)
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise SpaceError(f"expected a mapping with type: {' | '.join(KINDS)}, got {spec!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - set(FIELDS[kind]))
    if unknown:
        raise SpaceError(
            f"unknown field(s) {', '.join(unknown)} for type {kind} (valid: {', '.join(FIELDS[kind])})"
        )
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise SpaceError(f"when: expected a mapping of config key to value, got {when!r}")
    for other in when:
        check_dotted_key(Config, other)
        if other == key:
            raise SpaceError("when: an entry cannot depend on itself")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"choices: expected a non-empty list, got {choices!r}")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise SpaceError(f"choices must be numbers, strings, booleans or null, got {choices!r}")
        return Param(key, kind, choices=tuple(choices), when=when)
    low, high, step = number(spec, "low"), number(spec, "high"), spec.get("step")
    step = None if step is None else number(spec, "step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"log: expected true or false, got {log!r}")
    if not low < high:
        raise SpaceError(f"low must be below high, got low={low} high={high}")
    if log and (low <= 0 or step is not None):
        raise SpaceError(f"log: needs low > 0 and no step, got low={low} step={step}")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise SpaceError(f"type int: low, high and step must be whole numbers, got {low}, {high}, {step}")
    if step is not None and step <= 0:
        raise SpaceError(f"step must be > 0, got {step}")
    return Param(key, kind, low, high, log, step, when=when)


def number(spec: dict, name: str) -> float:
    value = spec.get(name)
    try:  # (YAML 1.1 reads 1e-4 without a dot as a string)
        value = float(value)
    except (TypeError, ValueError):
        raise SpaceError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise SpaceError(f"{name}: expected a finite number, got {value!r}")
    return value


def sample(trial, params: list[Param], base: Config) -> dict:
    """One trial's values, {dotted key: value}, skipping entries whose `when` does not hold."""
    values: dict = {}
    for p in params:
        if all(matches(current(k, values, base), want) for k, want in p.when.items()):
            values[p.key] = p.sample(trial)
    return values


def current(key: str, values: dict, base: Config):
    if key in values:
        return values[key]
    node = base
    for part in key.split("."):
        node = getattr(node, part)
    return node


def matches(value, want) -> bool:
    return value in want if isinstance(want, list) else value == want


def override_text(value) -> str:
    """A sampled value as a `--key VALUE` argument of mlx_clip.train (read back as YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value) if isinstance(value, float) else str(value)
