"""What an evaluation set is and which scalars it reports, framework-free (config.py reads it).

An EvalSetSpec is one entry of the config's `eval.sets` or one `python -m mlx_clip.eval` option;
evaluation/suite.py reads and evaluates it. The metric names below are the ones `eval.best` may
name: a run's own held-out metrics (training/evaluate.py) and "NAME/metric" for a named set.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

EvalKind = Literal["zeroshot", "retrieval", "linear_probe"]
KINDS: tuple[str, ...] = typing.get_args(EvalKind)
TEMPLATE_CHOICES = ("openai", "short", "dataset")  # or a FILE of templates (evaluation/templates.py)

CLASSIFICATION_METRICS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(
    f"{d}_{m}" for d in ("i2t", "t2i") for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")
)
SET_METRICS = {  # the scalars each kind reports, after "NAME/"
    "zeroshot": CLASSIFICATION_METRICS,
    "retrieval": RETRIEVAL_METRICS,
    "linear_probe": tuple(f"probe_{m}" for m in CLASSIFICATION_METRICS),
}
HEADLINE = {"zeroshot": "top1", "retrieval": "i2t_R@1", "linear_probe": "probe_top1"}  # curves.png
# A run's own held-out metrics (evaluation/metrics.evaluate_run, and val_loss with a val split).
RUN_METRICS = ("zeroshot_top1", "zeroshot_top5", *RETRIEVAL_METRICS, "val_loss")


def lower_is_better(metric: str) -> bool:
    """Losses and ranks improve downwards; accuracies and recalls upwards."""
    return metric.endswith(("val_loss", "mean_rank", "median_rank"))


@dataclass(frozen=True)
class EvalSetSpec:
    """One named evaluation set: an entry of eval.sets, or one CLI option."""

    name: str
    kind: EvalKind
    path: str  # linear_probe: the training split
    test_path: str | None = None  # linear_probe: the test split
    templates: str = "openai"  # zeroshot: openai | short | FILE | dataset (its own file, else openai)

    def problem(self) -> str | None:
        """What is wrong with the spec's fields (read from a config), or None."""
        if not self.name or "/" in self.name or any(c.isspace() for c in self.name):
            return f"name {self.name!r} must be non-empty with no '/' or space (metrics are NAME/top1)"
        if self.kind == "linear_probe" and not self.test_path:
            return "test_path is required for a linear_probe set (path is its training split)"
        if self.kind != "linear_probe" and self.test_path is not None:
            return f"test_path is for linear_probe sets only, not kind {self.kind!r}"
        if self.kind != "zeroshot" and self.templates != "openai":
            return f"templates is for zeroshot sets only, not kind {self.kind!r}"
        if not self.templates:
            return f"templates must be {', '.join(TEMPLATE_CHOICES)} or a templates file"
        return None


def set_metric_names(specs) -> list[str]:
    """Every "NAME/metric" scalar the sets report."""
    return [f"{s.name}/{m}" for s in specs for m in SET_METRICS[s.kind]]


def best_metric_problem(best: str, specs) -> str | None:
    """Why `best` (eval.best) names no metric of a run with eval sets `specs`, with the valid
    choices; None when it does ("auto", a held-out metric or "NAME/metric" of a set)."""
    choices = ["auto", *RUN_METRICS, *set_metric_names(specs)]
    if best in choices:
        return None
    name, slash, _ = best.partition("/")
    kinds = {s.name: s.kind for s in specs}
    if slash and name in kinds:
        valid = ", ".join(f"{name}/{m}" for m in SET_METRICS[kinds[name]])
        return f"set {name!r} ({kinds[name]}) reports {valid}"
    if slash:
        return f"no set is named {name!r} (eval.sets: {', '.join(kinds) or 'none'})"
    return f"valid: {', '.join(choices)}"
