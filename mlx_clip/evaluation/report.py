"""What an evaluation of named sets leaves behind: a plain-text table, eval.json and, per
zero-shot set, a confusion-matrix PNG beside it (framework-free).

    print(table({"A": scalars}))                       # set | metric | A
    print(table({"A": a, "B": b}, diff=True))          # set | metric | A | B | B-A
    write_json("out/eval.json", result)
    write_confusions("out/", details)                  # out/confusion_NAME.png per zero-shot set
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .classification import write_confusion_png


def difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """{metric: b - a} for every metric both have, in a's order."""
    return {k: b[k] - a[k] for k in a if k in b}


def _cell(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def table(columns: dict[str, dict[str, float]], diff: bool = False) -> str:
    """Aligned plain text: one row per "NAME/metric" (the set named on its first row), one column
    per entry of `columns`; with `diff` (two columns) a last column "B-A" = second minus first."""
    labels = list(columns)
    keys = list(dict.fromkeys(k for scalars in columns.values() for k in scalars))
    header = ["set", "metric", *labels] + ([f"{labels[1]}-{labels[0]}"] if diff else [])
    rows, last = [], None
    for key in keys:
        name, _, metric = key.partition("/")
        values = [columns[c].get(key) for c in labels]
        row = [name if name != last else "", metric, *(_cell(v) for v in values)]
        if diff:
            a, b = values[0], values[1]
            row.append(_cell(b - a if a is not None and b is not None else None, signed=True))
        rows.append(row)
        last = name
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        left = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        return "  ".join(left + [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def write_json(path: str | Path, result: dict) -> Path:
    """`result` as indented JSON at `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def write_confusions(folder: str | Path, details: dict, suffix: str = "") -> list[Path]:
    """folder/confusion_NAME{suffix}.png for every zero-shot set in `details` (evaluate_sets')."""
    written = []
    for name, d in details.items():
        if d.get("kind") != "zeroshot":
            continue
        path = Path(folder) / f"confusion_{name}{suffix}.png"
        title = f"{name}{suffix}: zero-shot confusion ({d['images']} images)"
        write_confusion_png(np.array(d["confusion"]), d["classnames"], path, title)
        written.append(path)
    return written


__all__ = ["difference", "table", "write_confusions", "write_json"]
