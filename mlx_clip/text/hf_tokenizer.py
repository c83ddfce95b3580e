"""Tokenizers that come with a checkpoint: any Hugging Face tokenizer.json, or a SentencePiece .model.

`HFTokenizer` has the interface of the CLIP `Tokenizer` (texts -> (B, context_length) int32 ids), so
training, eval and predict use either. Its settings follow the checkpoint and are saved with it:

* clean           Python text cleaning before the tokenizer sees the text (clean.py: CLEANERS)
* context_length  rows are padded or truncated to this length
* pad_id, pad_side  the pad token id, on the "right" (SigLIP, T5) or the "left"
* bos_id, eos_id  a token put before / after the text ids, or None
* truncation      keeps BOS and EOS: the text ids are cut to context_length - (number of BOS/EOS)

This is what transformers' `tokenizer(texts, padding="max_length", truncation=True, max_length=L)`
does, and tests/test_tokenizers_hf.py checks ids against `AutoTokenizer` on a varied corpus.
hf_dir.py reads these settings from a Hugging Face directory (tokenizer.json or spiece.model,
tokenizer_config.json, special_tokens_map.json). `load_tokenizer` (vocab.py) picks this class or the
CLIP BPE for any directory.

A SentencePiece model gives `sentencepiece`'s own ids, with transformers' SiglipTokenizer handling of
special tokens written in the text ("a </s> b": found before cleaning, no second EOS after a final one).
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
INSTALL_SENTENCEPIECE = "pip install 'mlx-clip[sentencepiece]' (or pip install sentencepiece)"


# ------------------------------------------------------------------------------------------- backends


class TokenizerJson:
    """A `tokenizers.Tokenizer` (tokenizer.json): Unigram, BPE, WordPiece, with its own normalizer."""

    kind = "hf"

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.unk_id = None  # its added tokens are found by the Rust side

    @classmethod
    def from_file(cls, path: Path) -> TokenizerJson:
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


class SentencePieceModel:
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
    def from_file(cls, path: Path) -> SentencePieceModel:
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


BACKENDS = {"hf": TokenizerJson, "sentencepiece": SentencePieceModel}


# ------------------------------------------------------------------------------------------ tokenizer


class HFTokenizer:
    """Text -> (B, context_length) int32 ids, laid out as the checkpoint's tokenizer lays them out:
    [BOS] text [EOS] then pad_id (right padding) or pad_id ... [BOS] text [EOS] (left padding)."""

    def __init__(
        self,
        backend: TokenizerJson | SentencePieceModel,
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
            config = read_json(config_path)
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
            backend = TokenizerJson(tokenizers.Tokenizer.from_str(state["file"].decode("utf-8")))
        else:
            backend = SentencePieceModel(state["file"])
        self.__init__(backend, **{k: c[k] for k in SETTINGS})


SETTINGS = ("clean", "context_length", "pad_id", "pad_side", "bos_id", "eos_id")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value
