"""Text cleaning before a checkpoint's tokenizer sees the text, by name (CLEANERS), framework-free.

The names are open_clip's (`canonicalize`, `whitespace`, `lower`), the CLIP BPE's own (`clip`,
tokenizer.clean_text), transformers' SiglipTokenizer's (`siglip`) and Siglip2Tokenizer's (`lowercase`),
and `none`. tests/test_tokenizers_hf.py checks the open_clip ones against open_clip's functions.
"""

from __future__ import annotations

import html
import re
import string

from .tokenizer import clean_text

try:  # ftfy repairs mojibake the way open_clip does (a base dependency; see tokenizer.clean_text)
    import ftfy
except ImportError:  # pragma: no cover
    ftfy = None

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    # open_clip's basic_clean: fix encoding, unescape HTML twice, strip
    text = ftfy.fix_text(text) if ftfy is not None else text
    return html.unescape(html.unescape(text)).strip()


def canonicalize(text: str) -> str:
    """open_clip's `canonicalize` cleaning (its SigLIP default): basic clean, "_" -> " ", ASCII
    punctuation removed, lower case, whitespace collapsed."""
    text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


def siglip_clean(text: str) -> str:
    """transformers' SiglipTokenizer.canonicalize_text (do_lower_case=True): lower case, ASCII
    punctuation removed, runs of whitespace -> one space, stripped. No ftfy, "_" is dropped."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def whitespace_clean(text: str) -> str:
    """open_clip's `whitespace` cleaning (its HFTokenizer default): basic clean, whitespace collapsed."""
    return " ".join(_basic_clean(text).split())


CLEANERS = {
    "clip": clean_text,  # the CLIP BPE's: ftfy, HTML, whitespace, lower case
    "canonicalize": canonicalize,
    "siglip": siglip_clean,
    "whitespace": whitespace_clean,
    "lower": lambda text: whitespace_clean(text).lower(),  # open_clip's "lower"
    "lowercase": str.lower,  # only that: transformers' Siglip2Tokenizer lower-cases in its normalizer
    "none": lambda text: text,
}
