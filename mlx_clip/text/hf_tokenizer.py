"""Tokenizers that come with a checkpoint: any Hugging Face tokenizer.json, or a SentencePiece .model.

`HFTokenizer` has the interface of the CLIP `Tokenizer` (texts -> (B, context_length) int32 ids), so
training, eval and predict use either. Its settings follow the checkpoint and are saved with it:

* clean           Python text cleaning before the tokenizer sees the text (see CLEANERS)
* context_length  rows are padded or truncated to this length
* pad_id, pad_side  the pad token id, on the "right" (SigLIP, T5) or the "left"
* bos_id, eos_id  a token put before / after the text ids, or None
* truncation      keeps BOS and EOS: the text ids are cut to context_length - (number of BOS/EOS)

This is what transformers' `tokenizer(texts, padding="max_length", truncation=True, max_length=L)`
does, and tests/test_tokenizers_hf.py checks ids against `AutoTokenizer` on a varied corpus.
`read_hf_directory` reads these settings from a Hugging Face directory (tokenizer.json or spiece.model,
tokenizer_config.json, special_tokens_map.json). `load_tokenizer` (vocab.py) picks this class or the
CLIP BPE for any directory.

A SentencePiece model gives `sentencepiece`'s own ids, with transformers' SiglipTokenizer handling of
special tokens written in the text ("a </s> b": found before cleaning, no second EOS after a final one).
transformers 5 is the reference: where a tokenizer.json exists its post-processor decides BOS / EOS
(tokenizer_config.json's add_bos_token / add_eos_token are ignored), and a few classes pad on the left
by default (LEFT_PADDING_CLASSES).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import normalizers, processors

from .clean import CLEANERS
from .tokenizer import CONFIG_FILE, CONFIG_FORMAT, DEFAULT_CONTEXT_LENGTH, _write_atomic

HF_CONFIG_VERSION = 2  # version 1 configs are all CLIP BPE; older mlx_clip refuses version 2 plainly
KINDS = {"hf": "tokenizer.json", "sentencepiece": "spiece.model"}  # kind -> the file saved with it
SP_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model")  # names HF directories use
SIGLIP_CONTEXT_LENGTH = 64
INSTALL_SENTENCEPIECE = "pip install 'mlx-clip[sentencepiece]' (or pip install sentencepiece)"
# transformers 5 classes whose default padding side is left (a tokenizer_config.json setting wins)
LEFT_PADDING_CLASSES = ("Gemma", "Siglip2", "Llama", "CodeLlama", "Cohere", "XLNet")


# ------------------------------------------------------------------------------------------- backends


class _Tokenizers:
    """A `tokenizers.Tokenizer` (tokenizer.json): Unigram, BPE, WordPiece, with its own normalizer."""

    kind = "hf"

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.unk_id = None  # its added tokens are found by the Rust side

    @classmethod
    def from_file(cls, path: Path) -> _Tokenizers:
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"corrupt tokenizer file {path}: {e}") from e

    def encode_batch(self, texts: list[str], start: bool = True) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def to_bytes(self) -> bytes:
        return self.hf.to_str(pretty=False).encode("utf-8")


class _SentencePiece:
    """A SentencePiece model (.model, a serialized protobuf) read by the `sentencepiece` package."""

    kind = "sentencepiece"

    def __init__(self, proto: bytes, source: str = "<bytes>"):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                f"{source} is a SentencePiece model, which needs the sentencepiece package: "
                f"{INSTALL_SENTENCEPIECE}"
            ) from None
        self.proto = proto
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # RuntimeError or OSError, depending on the version
            raise ValueError(f"corrupt SentencePiece model {source}: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()

    @classmethod
    def from_file(cls, path: Path) -> _SentencePiece:
        return cls(path.read_bytes(), str(path))

    def encode_batch(self, texts: list[str], start: bool = True) -> list[list[int]]:
        if start:
            return self.sp.encode(texts)
        # Text that continues after a special token: no "▁" word start in front. Encode it behind the
        # unk piece and drop that piece's ids (as transformers' SiglipTokenizer does).
        unk = self.sp.id_to_piece(self.sp.unk_id())
        skip = len(self.sp.encode(unk))
        return [ids[skip:] for ids in self.sp.encode([unk + t for t in texts])]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def to_bytes(self) -> bytes:
        return self.proto


BACKENDS = {"hf": _Tokenizers, "sentencepiece": _SentencePiece}


# ------------------------------------------------------------------------------------------ tokenizer


class HFTokenizer:
    """Text -> (B, context_length) int32 ids, laid out as the checkpoint's tokenizer lays them out:
    [BOS] text [EOS] then pad_id (right padding) or pad_id ... [BOS] text [EOS] (left padding)."""

    def __init__(
        self,
        backend: _Tokenizers | _SentencePiece,
        *,
        clean: str = "none",
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad_id: int = 0,
        pad_side: str = "right",
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}; choose one of {', '.join(CLEANERS)}")
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
        for name, i in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if i is not None and not 0 <= i < backend.vocab_size:
                raise ValueError(f"{name}={i} is outside the vocabulary [0, {backend.vocab_size})")
        self._backend = backend
        self.kind = backend.kind
        self.clean, self.context_length = clean, context_length
        self.pad_id, self.pad_side, self.bos_id, self.eos_id = pad_id, pad_side, bos_id, eos_id
        self.vocab_size = backend.vocab_size
        ids = [pad_id, bos_id, eos_id, backend.unk_id]
        self._specials = {backend.id_to_token(i): i for i in ids if i is not None}

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, ctx={self.context_length}, "
            f"clean={self.clean!r}, pad={self.pad_id}/{self.pad_side}, bos={self.bos_id}, eos={self.eos_id})"
        )

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(B, context_length) int32. Too-long texts lose their last text ids; BOS/EOS stay."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = self.context_length if context_length is None else context_length
        prefix = [] if self.bos_id is None else [self.bos_id]
        suffix = [] if self.eos_id is None else [self.eos_id]
        room = ctx - len(prefix) - len(suffix)
        if room < 0:
            raise ValueError(f"context_length {ctx} leaves no room for the BOS/EOS tokens")
        out = np.full((len(texts), ctx), self.pad_id, dtype=np.int32)  # (B, ctx)
        for row, ids in zip(out, self._encode_many(texts), strict=True):
            ids = [*prefix, *ids[:room]]
            # transformers' SentencePiece tokenizers (SiglipTokenizer, T5) add no second EOS after an
            # EOS written in the text; a tokenizer.json post-processor always adds it.
            if not (self.kind == "sentencepiece" and len(ids) > len(prefix) and ids[-1] == self.eos_id):
                ids += suffix
            if self.pad_side == "left":
                row[ctx - len(ids) :] = ids
            else:
                row[: len(ids)] = ids
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned text, without BOS/EOS."""
        return self._encode_many([text])[0]

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        clean = CLEANERS[self.clean]
        specials = self._specials if self.clean == "siglip" else {}
        if not any(tok in text for text in texts for tok in specials):
            return self._backend.encode_batch([clean(t) for t in texts])
        # transformers' SiglipTokenizer finds its special tokens in the raw text first, then cleans and
        # encodes the pieces between them: "a </s> b" keeps the EOS id, which the cleaning would drop.
        pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        result = []
        for text in texts:
            parts = re.split(pattern, text)  # text, special, text, special, ..., text
            ids = self._backend.encode_batch([clean(parts[0])])[0]
            pieces = self._backend.encode_batch([clean(p) for p in parts[2::2]], start=False)
            for special, piece in zip(parts[1::2], pieces, strict=True):
                ids = [*ids, specials[special], *piece]
            result.append(ids)
        return result

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or one row of `__call__`), without padding, BOS and EOS."""
        ids = [int(i) for i in (ids.reshape(-1) if isinstance(ids, np.ndarray) else ids)]
        drop = {self.pad_id, self.bos_id, self.eos_id}
        return self._backend.decode([i for i in ids if i not in drop])

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ------------------------------------------------------------------------------------- save / load

    def config(self) -> dict:
        return {
            "format": CONFIG_FORMAT,
            "version": HF_CONFIG_VERSION,
            "kind": self.kind,
            "file": KINDS[self.kind],
            "vocab_size": self.vocab_size,
            "clean": self.clean,
            "context_length": self.context_length,
            "pad_id": self.pad_id,
            "pad_side": self.pad_side,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer file (tokenizer.json or spiece.model) and tokenizer_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / KINDS[self.kind], self._backend.to_bytes())
        _write_atomic(directory / CONFIG_FILE, json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, config: dict | None = None) -> HFTokenizer:
        """Read a directory written by `save` (`config`: its tokenizer_config.json, already read)."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if config is None:
            config = _read_json(config_path)
        kind = config.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{config_path}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if config.get("version", 0) > HF_CONFIG_VERSION:
            version = config["version"]
            raise ValueError(
                f"{config_path} has version {version}; this mlx_clip reads <= {HF_CONFIG_VERSION}"
            )
        path = directory / config.get("file", KINDS[kind])
        if not path.is_file():
            raise FileNotFoundError(f"{config_path} names {path.name}, which is not in {directory}")
        backend = BACKENDS[kind].from_file(path)
        try:
            tok = cls(backend, **{k: config[k] for k in SETTINGS})
        except KeyError as e:
            raise ValueError(f"{config_path}: missing setting {e}") from None
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        if config.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            size = config["vocab_size"]
            raise ValueError(f"{config_path}: vocab_size={size} but {path} has {tok.vocab_size} tokens")
        return tok

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Files `transformers.AutoTokenizer.from_pretrained(directory)` reads as this tokenizer: a
        tokenizer.json whose post-processor adds our BOS / EOS, or spiece.model for SiglipTokenizer.
        transformers runs no Python cleaning: "lowercase" goes into the normalizer, "siglip" is
        SiglipTokenizer's own; other cleanings (clip, canonicalize, whitespace, lower) are left to the
        caller, as open_clip does with its tokenizer_kwargs."""
        directory = Path(directory)
        ends = (("bos", self.bos_id), ("eos", self.eos_id))
        specials = {f"{k}_token": self.id_to_token(i) for k, i in ends if i is not None}
        specials["pad_token"] = self.id_to_token(self.pad_id)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast" if self.kind == "hf" else "SiglipTokenizer",
            **specials,
            "model_max_length": self.context_length,
            "padding_side": self.pad_side,
        }
        data = self._backend.to_bytes()
        if self.kind == "hf":  # the post-processor is what transformers 5 reads for BOS / EOS
            hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            bos, eos = specials.get("bos_token"), specials.get("eos_token")
            used = {t: i for t, i in ((bos, self.bos_id), (eos, self.eos_id)) if t is not None}
            single = " ".join(t for t in (bos, "$A", eos) if t is not None)
            hf.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=list(used.items())
            )
            if self.clean == "lowercase":  # the one cleaning a tokenizer.json can hold itself
                rest = [hf.normalizer] if hf.normalizer is not None else []
                hf.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
            data = hf.to_str(pretty=False).encode("utf-8")
        (directory / KINDS[self.kind]).write_bytes(data)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))

    def __getstate__(self) -> dict:
        # Data-loader workers pickle the tokenizer: the backend travels as its file's bytes.
        return {"file": self._backend.to_bytes(), "config": self.config()}

    def __setstate__(self, state: dict) -> None:
        c = state["config"]
        if c["kind"] == "hf":
            backend = _Tokenizers(tokenizers.Tokenizer.from_str(state["file"].decode("utf-8")))
        else:
            backend = _SentencePiece(state["file"])
        self.__init__(backend, **{k: c[k] for k in SETTINGS})


SETTINGS = ("clean", "context_length", "pad_id", "pad_side", "bos_id", "eos_id")


# --------------------------------------------------------------------- Hugging Face directories


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _token(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def _post_processor_specials(path: Path) -> tuple[str | None, str | None]:
    """(BOS, EOS) that tokenizer.json's post-processor puts around a single text."""
    proc = _read_json(path).get("post_processor")
    procs = proc.get("processors", []) if proc and proc.get("type") == "Sequence" else [proc]
    bos = eos = None
    for p in filter(None, procs):
        if p.get("type") in ("BertProcessing", "RobertaProcessing"):
            bos, eos = p["cls"][0], p["sep"][0]
        elif p.get("type") == "TemplateProcessing":
            items = p["single"]
            a = next(i for i, item in enumerate(items) if "Sequence" in item)
            before = [item["SpecialToken"]["id"] for item in items[:a]]
            after = [item["SpecialToken"]["id"] for item in items[a + 1 :]]
            if len(before) > 1 or len(after) > 1:
                raise ValueError(f"{path}: a post-processor adding {before} / {after} is not supported")
            bos, eos = (before or [None])[0], (after or [None])[0]
    return bos, eos


def read_hf_directory(directory: str | os.PathLike, clean: str | None = None) -> HFTokenizer:
    """The tokenizer of a Hugging Face directory: tokenizer.json (through `tokenizers`) or a
    SentencePiece model, with the padding, BOS/EOS and cleaning its tokenizer_config.json and
    special_tokens_map.json set (as transformers 5 reads them). `clean` overrides the cleaning."""
    directory = Path(directory)
    config = _read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    smap = directory / "special_tokens_map.json"
    specials = _read_json(smap) if smap.is_file() else {}
    cls = str(config.get("tokenizer_class") or "").removesuffix("Fast").removesuffix("Tokenizer")
    name = {k: _token(config.get(f"{k}_token") or specials.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    sp_path = next((directory / n for n in SP_FILES if (directory / n).is_file()), None)
    json_path = directory / "tokenizer.json"
    # transformers' SiglipTokenizer reads only the SentencePiece model, where there is one
    if json_path.is_file() and (cls != "Siglip" or sp_path is None):
        backend = _Tokenizers.from_file(json_path)
        bos, eos = _post_processor_specials(json_path)
    elif sp_path is not None:
        backend = _SentencePiece.from_file(sp_path)
        bos, eos = None, name["eos"] or "</s>"  # SigLIP / T5: EOS appended, no BOS
        # (transformers 5 ignores these two where there is a tokenizer.json: its post-processor rules)
        if "add_bos_token" in config or "add_eos_token" in config:
            bos = name["bos"] if config.get("add_bos_token") else None
            eos = name["eos"] if config.get("add_eos_token", True) else None
    else:
        files = ", ".join(["tokenizer.json", *SP_FILES])
        raise FileNotFoundError(f"{directory}: no tokenizer file (looked for {files})")
    if cls == "T5":
        bos, eos = None, "</s>"  # transformers' T5Tokenizer sets this post-processor itself
    if cls == "Siglip" and config.get("do_lower_case", True) is False:
        raise ValueError(
            f"{directory / CONFIG_FILE}: SiglipTokenizer with do_lower_case false is unsupported"
        )
    default_clean = {"Siglip": "siglip", "Siglip2": "lowercase"}.get(cls, "none")
    default_side = "left" if cls in LEFT_PADDING_CLASSES else "right"
    pad = name["pad"] or ("</s>" if cls == "Siglip" else None)
    ids = {}
    for key, token in (("bos", bos), ("eos", eos), ("pad", pad)):
        ids[key] = None if token is None else backend.token_to_id(token)
        if token is not None and ids[key] is None:
            raise ValueError(f"{directory}: the {key} token {token!r} is not in the vocabulary")
    if ids["pad"] is None:
        raise ValueError(f"{directory}: no pad_token in {CONFIG_FILE} or special_tokens_map.json")
    max_len = config.get("model_max_length")
    default_ctx = SIGLIP_CONTEXT_LENGTH if cls == "Siglip" else DEFAULT_CONTEXT_LENGTH
    return HFTokenizer(
        backend,
        clean=clean or default_clean,
        context_length=max_len if isinstance(max_len, int) and max_len < 100_000 else default_ctx,
        pad_id=ids["pad"],
        pad_side=config.get("padding_side", default_side),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
    )


def read_sentencepiece(path: str | os.PathLike) -> HFTokenizer:
    """A bare SentencePiece .model file: SigLIP's layout (text, then EOS, padded right to 64 with the
    model's pad id, or EOS where it has none), no cleaning."""
    backend = _SentencePiece.from_file(Path(path))
    sp = backend.sp
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else eos
    if pad is None:
        raise ValueError(f"{path}: the model has neither a pad nor an EOS id to pad with")
    return HFTokenizer(backend, context_length=SIGLIP_CONTEXT_LENGTH, pad_id=pad, eos_id=eos)
