"""Prompt templates and class-name lists for zero-shot classification.

    templates = load_templates("openai")        # OpenAI's 80 ImageNet prompts; "short": its 7-prompt subset
    templates = load_templates("my_prompts.txt")
    classnames = load_classnames("imagenet")    # OpenAI's 1000 curated ImageNet class names
    prompts = [t.format(name) for t in templates]

Files hold one entry per line, UTF-8. A template file is CLIP_benchmark's
`zeroshot_classification_templates.txt` format: the class name's place is `{c}`; `{}` works too.
Loaded templates always use `{}` (exactly one, no other brace), the form the rest of mlx_clip fills
with `str.format`. Blank lines in a template file are ignored. In a class-name file the line number
is the class index, so a blank line between names is an error; blank lines at the end are not.

The shipped lists (prompts/*.txt, package data) are the facts OpenAI published with CLIP, written in
this format: the 80 templates and the 1000 class names of its ImageNet notebook, and the 7 templates
that the notebook's forward selection over the 80 kept. The class list repeats two names ("missile",
"sunglasses"), as OpenAI's does; labels refer to classes by index, so that is harmless.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.samples import DataError, open_text

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TEMPLATE_SETS = {"openai": "openai_templates.txt", "short": "short_templates.txt"}
CLASSNAME_SETS = {"imagenet": "imagenet_classnames.txt"}


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line of a UTF-8 file; a DataError names a missing file."""
    try:
        with open_text(path) as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1)]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a text file with one entry per line") from None


def normalize_template(template: str, where: str) -> str:
    """A template with `{c}` or `{}` -> the same with `{}`; a DataError (naming `where`) unless it has
    exactly one placeholder and no other brace."""
    t = template.replace("{c}", "{}")
    rest = t.replace("{}", "")
    if t.count("{}") != 1 or "{" in rest or "}" in rest:
        raise DataError(
            f"{where}: template {template!r} must hold the class name's place exactly once, as {{c}} "
            "(CLIP_benchmark) or {}, and no other brace"
        )
    return t


def load_templates(spec: str | os.PathLike) -> list[str]:
    """ "openai" (80), "short" (7) or a file's path -> templates with `{}` for the class name."""
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        path = PROMPTS_DIR / TEMPLATE_SETS[spec]
    elif os.path.isfile(spec):
        path = Path(spec)
    else:
        raise DataError(f"templates {str(spec)!r}: no such file, and not one of {', '.join(TEMPLATE_SETS)}")
    templates = [normalize_template(t, f"{path}:{n}") for n, t in _read_lines(path) if t]
    if not templates:
        raise DataError(f"{path}: no templates (expected one per line, with {{c}} for the class name)")
    return list(dict.fromkeys(templates))  # a repeated template would weigh twice in the ensemble


def read_classnames(path: str | os.PathLike) -> list[str]:
    """One class name per line, line i naming class i (0-based); trailing blank lines are ignored."""
    path = Path(path)
    rows = _read_lines(path)
    while rows and not rows[-1][1]:
        rows.pop()
    blank = next((n for n, name in rows if not name), None)
    if blank is not None:
        raise DataError(
            f"{path}:{blank}: blank line; line i names class i, so remove it or write the class name"
        )
    if not rows:
        raise DataError(f"{path}: no class names (expected one per line)")
    return [name for _, name in rows]


def load_classnames(spec: str | os.PathLike) -> list[str]:
    """ "imagenet" (OpenAI's 1000 names) or a file's path -> class names, index i = class i."""
    if isinstance(spec, str) and spec in CLASSNAME_SETS:
        return read_classnames(PROMPTS_DIR / CLASSNAME_SETS[spec])
    if not os.path.isfile(spec):
        raise DataError(
            f"class names {str(spec)!r}: no such file, and not one of {', '.join(CLASSNAME_SETS)}"
        )
    return read_classnames(spec)


__all__ = [
    "CLASSNAME_SETS",
    "TEMPLATE_SETS",
    "load_classnames",
    "load_templates",
    "normalize_template",
    "read_classnames",
]
