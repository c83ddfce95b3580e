"""Where a tokenizer comes from: OpenAI's vocabulary (found offline), a BPE trained on captions,
a saved directory (ours, of either kind), or a Hugging Face directory (CLIP, or any tokenizer.json or
SentencePiece model, read by hf_tokenizer.py). The CLIP Tokenizer itself is tokenizer.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import models, trainers

from .hf_dir import read_hf_directory, read_sentencepiece
from .hf_tokenizer import KINDS, SP_FILES, HFTokenizer
from .tokenizer import (
    CONFIG_FILE,
    CONFIG_FORMAT,
    END_OF_WORD,
    EOT_TOKEN,
    GET_OPENAI_VOCAB,
    HF_EOT_TOKEN,
    HF_SOT_TOKEN,
    MIN_VOCAB_SIZE,
    OPENAI_NUM_MERGES,
    OPENAI_VOCAB_SIZE,
    SOT_TOKEN,
    TOKENIZER_FILE,
    Tokenizer,
    base_symbols,
    build_hf,
    clean_text,
    pre_tokenizer,
)

AnyTokenizer = Tokenizer | HFTokenizer  # same interface: texts -> (B, context_length) int32


def _from_vocab(
    tokens: Sequence[str], merges: list[tuple[str, str]], *, sot: str, eot: str, kind: str
) -> Tokenizer:
    """Tokenizer from an id-ordered token list (token i has id i) and the ranked merges."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"the vocabulary has {len(tokens) - len(vocab)} duplicate tokens")
    return Tokenizer(build_hf(vocab, merges), sot_token=sot, eot_token=eot, kind=kind)


# --------------------------------------------------------------------------------------- OpenAI vocab


def _read_bpe_gz(path: Path) -> Tokenizer:
    """open_clip / OpenAI's bpe_simple_vocab_16e6.txt.gz: a header line, then merges by rank. Only the
    first 48894 are used; the vocab is the 512 base symbols, the merge results, then SOT, EOT."""
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the CLIP BPE file {path}: {e}") from e
    merges = [tuple(line.split()) for line in lines[1 : 1 + OPENAI_NUM_MERGES]]
    if len(merges) != OPENAI_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file (need {OPENAI_NUM_MERGES} 'a b' lines)")
    tokens = [*base_symbols(), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
    return _from_vocab(tokens, merges, sot=SOT_TOKEN, eot=EOT_TOKEN, kind="openai")


def _read_hf_dir(directory: Path) -> Tokenizer:
    """A Hugging Face CLIP tokenizer directory: vocab.json (token -> id) and merges.txt."""
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the CLIP vocab in {directory}: {e}") from e
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise ValueError(f"{directory}: vocab.json must map token -> id and merges.txt hold 'a b' lines")
    # OpenAI / Hugging Face files name the specials "<|startoftext|>"; open_clip-derived ones do not.
    for sot, eot in ((HF_SOT_TOKEN, HF_EOT_TOKEN), (SOT_TOKEN, EOT_TOKEN)):
        if sot in vocab and eot in vocab:
            break
    else:
        raise ValueError(
            f"{vocab_path} has neither {HF_SOT_TOKEN}/{HF_EOT_TOKEN} nor {SOT_TOKEN}/{EOT_TOKEN}"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path}: token ids must be exactly 0..{len(vocab) - 1}")
    tokens = sorted(vocab, key=vocab.get)
    try:
        return _from_vocab(tokens, merges, sot=sot, eot=eot, kind="openai")
    except Exception as e:  # e.g. a merge whose result is not in the vocab (raised by the Rust side)
        raise ValueError(f"inconsistent CLIP vocab in {directory}: {e}") from e


def _find_openai_source() -> Path | None:
    """An offline copy of the OpenAI vocab: open_clip's bundled file, else a Hugging Face cache snapshot."""
    try:  # find_spec locates the package without importing it (importing open_clip imports torch)
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    hub_dirs = [
        os.environ.get("HF_HUB_CACHE"),
        os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub"),
    ]
    hub_dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    for hub in filter(None, hub_dirs):
        for snapshot in sorted(Path(hub).glob("models--openai--clip-vit-*/snapshots/*")):
            if (snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file():
                return snapshot
    return None


def openai_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The 49408-token OpenAI CLIP tokenizer, offline.

    `path` may be a Hugging Face CLIP directory (vocab.json + merges.txt) or a bpe_simple_vocab .txt.gz
    file. Without it, the copy inside the installed open_clip package is used, then a cached Hugging Face
    `openai/clip-vit-*` snapshot.
    """
    if path is None:
        source = _find_openai_source()
        if source is None:
            raise FileNotFoundError(f"no OpenAI CLIP vocabulary found offline; {GET_OPENAI_VOCAB}")
    else:
        source = Path(path)
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist; {GET_OPENAI_VOCAB}")
    if source.is_dir():
        if not ((source / "vocab.json").is_file() and (source / "merges.txt").is_file()):
            raise FileNotFoundError(f"{source} has no vocab.json + merges.txt; {GET_OPENAI_VOCAB}")
        tok = _read_hf_dir(source)
    else:
        tok = _read_bpe_gz(source)
    if tok.vocab_size != OPENAI_VOCAB_SIZE:
        raise ValueError(f"{source} holds {tok.vocab_size} tokens, not the OpenAI CLIP {OPENAI_VOCAB_SIZE}")
    return tok


# -------------------------------------------------------------------------------------- trained vocab


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """A CLIP-style byte-level BPE learned from `captions`, with exactly `vocab_size` tokens.

    Cleaning and splitting are the OpenAI tokenizer's. The layout is CLIP's: ids 0..511 are the byte
    symbols without and with "</w>" (so every text encodes, and 0 is "!"), then the learned merges in
    rank order, then SOT and EOT as the two largest ids. A corpus too small to learn
    `vocab_size - 514` distinct merges is padded with unreachable "<unused_N>" tokens placed before SOT
    (a warning says how many), so the size is always exact. The result is deterministic: the same
    captions in the same order give the same vocabulary.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (512 byte symbols + SOT + EOT), got {vocab_size}"
        )
    base = base_symbols()
    chars, suffixed = base[:256], base[256:]
    hf = tokenizers.Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    hf.pre_tokenizer = pre_tokenizer()
    # BpeTrainer gives "x</w>" symbols ids in hash-map order as it meets them, and breaks count ties by
    # id, which made merges differ between runs. Declaring all 256 as (trainer-only) special tokens
    # fixes their ids up front, so training is deterministic. The trainer's vocab then counts the 256
    # chars + 256 suffixed + merges, and `vocab_size - 2` leaves room for SOT and EOT.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=suffixed,
        initial_alphabet=chars,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    hf.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
    learned = json.loads(hf.to_str())["model"]["merges"]
    # Keep merges in rank order until the vocab is full. Two merges can make the same string ("a"+"bc",
    # "ab"+"c"); the string gets one id and both merges stay valid.
    tokens, known, merges = list(base), set(base), []
    budget = vocab_size - 2
    for merge in learned:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        new = a + b
        if new not in known:
            if len(tokens) == budget:
                break
            tokens.append(new)
            known.add(new)
        merges.append((a, b))
    if len(tokens) < budget:
        warnings.warn(
            f"the captions support only {len(tokens) - len(base)} merges; padding the vocab with "
            f"{budget - len(tokens)} unused tokens to reach vocab_size={vocab_size}",
            stacklevel=2,
        )
        # Never produced by BPE: letters and punctuation are never in one word, so no merge makes "<u...".
        tokens += [f"<unused_{i}>" for i in range(budget - len(tokens))]
    return _from_vocab([*tokens, SOT_TOKEN, EOT_TOKEN], merges, sot=SOT_TOKEN, eot=EOT_TOKEN, kind="trained")


# -------------------------------------------------------------------------------------------- loading


CLIP_KINDS = ("openai", "trained", "converted", "unknown")  # Tokenizer.kind values: all the CLIP BPE


def _saved_config(directory: Path) -> dict | None:
    """Our tokenizer_config.json, or None where the file is missing or someone else's (Hugging Face).
    A file that is not JSON is an error, whoever wrote it."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt tokenizer config {path}: {e}") from e
    return config if isinstance(config, dict) and config.get("format") == CONFIG_FORMAT else None


def load_saved(directory: Path) -> AnyTokenizer:
    """A tokenizer saved next to a checkpoint, of whichever kind its tokenizer_config.json names
    (configs without a kind, as early mlx_clip wrote them, are the CLIP BPE)."""
    config = _saved_config(directory)
    if config is None:
        return Tokenizer.load(directory)  # let load() say what is wrong
    kind = config.get("kind", "unknown")
    if kind in KINDS:
        return HFTokenizer.load(directory, config)
    if kind not in CLIP_KINDS:
        raise ValueError(
            f"{directory / CONFIG_FILE}: unknown tokenizer kind {kind!r} "
            f"(known: {', '.join([*CLIP_KINDS, *KINDS])}); was it written by a newer mlx_clip?"
        )
    return Tokenizer.load(directory)


def read_clip_json(path: Path) -> Tokenizer | None:
    """The CLIP BPE inside a Hugging Face tokenizer.json (what transformers 5 saves for CLIP), or None
    when the file holds another tokenizer (not a byte-level BPE with "</w>")."""
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Hugging Face tokenizer file ({e})") from None
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        return None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        (Path(d) / "merges.txt").write_text("\n".join(f"{a} {b}" for a, b in merges), encoding="utf-8")
        return _read_hf_dir(Path(d))


def read_hf_tokenizer_dir(directory: Path) -> AnyTokenizer | None:
    """The tokenizer of a Hugging Face directory: the CLIP BPE (vocab.json + merges.txt, or in
    tokenizer.json), any other tokenizer.json, or a SentencePiece model; None when there is none."""
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return _read_hf_dir(directory)
    if (directory / TOKENIZER_FILE).is_file():
        clip = read_clip_json(directory / TOKENIZER_FILE)
        if clip is not None:
            return clip
    if (directory / TOKENIZER_FILE).is_file() or any((directory / n).is_file() for n in SP_FILES):
        return read_hf_directory(directory)
    return None


def load_tokenizer(spec: str | os.PathLike | AnyTokenizer) -> AnyTokenizer:
    """Resolve a tokenizer spec: a tokenizer; "openai"; a directory written by `save` (e.g. a
    checkpoint), CLIP BPE or HF kind; a Hugging Face directory (a CLIP vocab.json + merges.txt, any
    tokenizer.json, or a SentencePiece model, with its tokenizer_config.json settings); a CLIP BPE
    .txt.gz file; or a SentencePiece .model file."""
    if isinstance(spec, Tokenizer | HFTokenizer):
        return spec
    if str(spec).lower() in ("openai", "clip", "openai-clip"):
        return openai_tokenizer()
    path = Path(spec)
    if path.is_dir():
        # Hugging Face directories also hold a tokenizer_config.json (theirs): check whose it is.
        if _saved_config(path) is not None:
            return load_saved(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return openai_tokenizer(path)
        tok = read_hf_tokenizer_dir(path)
        if tok is not None:
            return tok
        if (path / CONFIG_FILE).is_file():
            return Tokenizer.load(path)  # half a saved tokenizer: let load() say what is wrong
        raise FileNotFoundError(
            f"{path} holds no tokenizer: expected {TOKENIZER_FILE} + {CONFIG_FILE} (a saved tokenizer), "
            f"vocab.json + merges.txt (a Hugging Face CLIP directory), a Hugging Face {TOKENIZER_FILE} "
            f"or a SentencePiece model ({', '.join(SP_FILES)})"
        )
    if path.is_file() and path.name.endswith(".gz"):
        return openai_tokenizer(path)
    if path.is_file() and path.suffix == ".model":
        return read_sentencepiece(path)
    raise FileNotFoundError(
        f"unknown tokenizer {str(spec)!r}: give 'openai', a saved tokenizer directory, a Hugging Face "
        "tokenizer directory, a CLIP BPE .txt.gz file or a SentencePiece .model file"
    )
