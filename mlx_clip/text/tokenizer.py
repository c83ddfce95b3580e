"""CLIP byte-level BPE tokenizer on Hugging Face `tokenizers` (framework-free).

One `Tokenizer` class serves three vocabularies:

* `openai_tokenizer()`: the 49408-token OpenAI CLIP vocabulary, read offline from a Hugging Face CLIP
  directory (vocab.json + merges.txt) or from the BPE file that ships inside the `open_clip` package.
  Ids equal `open_clip.tokenize` exactly (see "Parity" below).
* `train_tokenizer(captions, vocab_size)`: a CLIP-style BPE learned from captions.
* `Tokenizer.load(dir)`: either of the above, saved next to a checkpoint by `Tokenizer.save(dir)`.

Every vocabulary follows the CLIP layout that the text tower relies on: it pools features at
argmax(token id), so EOT must be the largest id and SOT the second largest; rows are zero padded, and
id 0 is an ordinary token ("!" in OpenAI's vocab), never SOT or EOT.

Pipeline: text cleaning runs in Python exactly as open_clip does it (ftfy.fix_text, html.unescape twice,
whitespace collapse, lower()); the Rust tokenizer then splits with CLIP's regex, maps bytes to printable
characters (ByteLevel) and runs BPE with the "</w>" end-of-word suffix.

Parity with open_clip (checked against open_clip_torch 3.3.0 by tests/test_tokenizer.py):

* Ids match for every character assigned up to Unicode 16 (the tests try each one Python knows).
  Recent `regex` releases, which open_clip uses, know letters new in Unicode 17+ (e.g. Sidetic) that
  the Oniguruma engine inside `tokenizers` does not, so text in those scripts can split differently.
* U+0345 (combining ypogegrammeni) matches no branch of open_clip's case-insensitive pattern, so
  open_clip skips it; `clean_text` turns it into a space, which splits and disappears the same way.
* A literal "<start_of_text>" / "<end_of_text>" in a caption becomes the SOT / EOT id, as in open_clip,
  and only where open_clip's regex scan lands on it (so "x<<end_of_text>" stays plain text in both).
* `decode` drops SOT, stops at the first EOT and has no trailing space (open_clip's decode leaves one).
* Without ftfy, cleaning falls back to NFC normalisation (with a warning): mojibake, curly quotes and
  full-width forms are then not repaired, so ids can differ from open_clip on such text.
"""

from __future__ import annotations

import html
import json
import os
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

try:  # ftfy repairs mojibake the way open_clip does; optional, see clean_text()
    import ftfy
except ImportError:  # pragma: no cover - only where ftfy is missing
    ftfy = None

# The Rust tokenizer warns and turns its thread pool off when a data-loader process forks after it ran;
# CLIP captions are short, so threads buy little. An explicit user setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"  # open_clip's names (used for trained vocabs)
HF_SOT_TOKEN, HF_EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"  # OpenAI / Hugging Face names
OPENAI_VOCAB_SIZE = 49408
OPENAI_NUM_MERGES = OPENAI_VOCAB_SIZE - 2 * 256 - 2  # 48894: the vocab is 512 base symbols + merges + 2
# CLIP's word pattern. open_clip compiles it with IGNORECASE; "(?i)" keeps e.g. "'ſ" one contraction.
WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
MIN_VOCAB_SIZE = 2 * 256 + 2  # base symbols with and without "</w>", SOT, EOT

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CONFIG_FORMAT = "mlx_clip.text.tokenizer"
CONFIG_VERSION = 1

GET_OPENAI_VOCAB = (
    "install open_clip_torch (`pip install open_clip_torch`; it ships bpe_simple_vocab_16e6.txt.gz), or "
    "download a Hugging Face CLIP tokenizer (`huggingface-cli download openai/clip-vit-base-patch32 "
    "vocab.json merges.txt --local-dir DIR`) and pass DIR"
)


def byte_to_char() -> dict[int, str]:
    """Printable stand-ins for the 256 byte values, in CLIP's vocabulary order (dict order = token id).

    Bytes that are printable and not whitespace stand for themselves and come first (so id 0 is "!");
    the other 68 bytes (controls, space, NBSP, soft hyphen) map to U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def base_symbols() -> list[str]:
    """Ids 0..511 of every CLIP vocab: the byte stand-ins, then the same with the end-of-word suffix."""
    chars = list(byte_to_char().values())
    return chars + [c + END_OF_WORD for c in chars]


_warned_no_ftfy = False


def clean_text(text: str) -> str:
    """open_clip's default ("lower") cleaning: fix encoding, unescape HTML twice, collapse whitespace,
    lower-case. Returns the text the BPE sees: `decode(encode(t))` is this text with a space between
    the pieces of CLIP's regex split ("don't." -> "don 't .")."""
    global _warned_no_ftfy
    if ftfy is not None:
        text = ftfy.fix_text(text)
    else:
        if not _warned_no_ftfy:
            warnings.warn(
                "ftfy is not installed: text cleaning falls back to NFC normalisation, so ids can differ "
                "from open_clip on mojibake or curly quotes (`pip install ftfy`)",
                stacklevel=2,
            )
            _warned_no_ftfy = True
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    # open_clip's regex matches nothing at U+0345 and skips it; a space splits and disappears alike.
    text = text.replace("\u0345", " ")
    # str.split() is open_clip's whitespace set (it includes \x1c-\x1f, which regex's \s does not).
    return " ".join(text.split()).lower()


def _split_pattern(specials: Sequence[str] = ()) -> pre_tokenizers.Split:
    # Keep the regex matches and drop what lies between them (whitespace). With `specials` this is
    # open_clip's exact pattern, special tokens first, used only to find where they are recognised.
    escaped = [tok.replace("|", r"\|") for tok in specials]
    pattern = "(?i)" + "|".join([*escaped, WORD_PATTERN])
    return pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # CLIP words, then each UTF-8 byte -> its printable stand-in (no extra GPT-2 style split).
    return pre_tokenizers.Sequence(
        [_split_pattern(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def build_hf(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """The Rust side: CLIP split, bytes -> stand-ins, BPE with "</w>". Cleaning stays in clean_text()."""
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    hf.pre_tokenizer = pre_tokenizer()
    # "</w>" becomes the stand-in for a space byte, so byte decoding turns it into " " (bytes split across
    # tokens are joined first). This keeps tokenizer.json usable on its own; Tokenizer.decode uses it too.
    # (No decoders.Strip for the last space: it panics on an empty id list in tokenizers 0.23.)
    hf.decoder = decoders.Sequence(
        [decoders.Replace(END_OF_WORD, byte_to_char()[ord(" ")]), decoders.ByteLevel()]
    )
    # SOT/EOT stay plain vocab entries, not "added tokens": those would match anywhere in the text, while
    # open_clip recognises them only where its regex scan lands (see Tokenizer._split_specials).
    return hf


class Tokenizer:
    """Text -> (B, context_length) int32 ids for a CLIP text tower: [SOT] tokens [EOT] 0 0 ...

    Build one with `openai_tokenizer`, `train_tokenizer`, `load_tokenizer` or `Tokenizer.load`.
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        sot_token: str,
        eot_token: str,
        kind: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ):
        self._hf = hf
        self.kind = kind
        self.context_length = context_length
        self.sot_token, self.eot_token = sot_token, eot_token
        self.vocab_size = hf.get_vocab_size()
        sot_id, eot_id = hf.token_to_id(sot_token), hf.token_to_id(eot_token)
        # The text tower pools at argmax(id): anything else here would silently pool the wrong position.
        if eot_id != self.vocab_size - 1 or sot_id != self.vocab_size - 2:
            raise ValueError(
                f"CLIP layout needs EOT={eot_token!r} at the largest id ({self.vocab_size - 1}) and "
                f"SOT={sot_token!r} just below it; this vocab has them at {eot_id} and {sot_id}"
            )
        self.sot_token_id, self.eot_token_id = sot_id, eot_id
        self._specials = {sot_token: sot_id, eot_token: eot_id}
        self._special_split = _split_pattern(list(self._specials))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, ctx={self.context_length})"

    # ----------------------------------------------------------------------------------------- encoding

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(B, context_length) int32: SOT, tokens, EOT, then zeros. Too-long texts are cut so that EOT is
        still the last token (as open_clip does)."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = self.context_length if context_length is None else context_length
        if ctx < 2:
            raise ValueError(f"context_length must leave room for SOT and EOT, got {ctx}")
        out = np.zeros((len(texts), ctx), dtype=np.int32)  # (B, ctx), 0 = padding
        for row, ids in zip(out, self._encode_many(texts), strict=True):
            ids = [self.sot_token_id, *ids[: ctx - 2], self.eot_token_id]
            row[: len(ids)] = ids
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT."""
        return self._encode_many([text])[0]

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        # Each text becomes a list of parts: strings for the BPE and ints for recognised special tokens.
        # All strings go to the Rust tokenizer in one batch, then the pieces are put back in order.
        plans = []
        for text in texts:
            text = clean_text(text)
            has_special = any(tok in text for tok in self._specials)  # rare: skip the second scan
            plans.append(self._split_specials(text) if has_special else [text])
        strings = [part for plan in plans for part in plan if isinstance(part, str)]
        encoded = iter(self._hf.encode_batch(strings, add_special_tokens=False))
        result = []
        for plan in plans:
            ids: list[int] = []
            for part in plan:
                ids.extend(next(encoded).ids if isinstance(part, str) else [part])
            result.append(ids)
        return result

    def _split_specials(self, text: str) -> list[str | int]:
        """Cut `text` at the special tokens that open_clip's regex scan would match.

        The scan puts the special tokens first in its alternation, so one is recognised exactly where a
        match starts: "a <end_of_text>" has one, "a.<end_of_text>" does not ("." swallows "<"). The
        segments between them tokenize as they would in the full scan, because no match crosses a cut.
        """
        parts: list[str | int] = []
        start = 0
        for piece, (begin, end) in self._special_split.pre_tokenize_str(text):  # character offsets
            if piece in self._specials:
                parts += [text[start:begin], self._specials[piece]]
                start = end
        parts.append(text[start:])
        return [p for p in parts if p != ""]

    # ----------------------------------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, or one row of `__call__`): SOT is dropped and everything from the first
        EOT on (EOT and padding) is ignored. Bytes split across tokens are rejoined; invalid UTF-8 becomes
        U+FFFD."""
        ids = [int(i) for i in (ids.reshape(-1) if isinstance(ids, np.ndarray) else ids)]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        text = self._hf.decode([i for i in ids if i != self.sot_token_id], skip_special_tokens=False)
        return text.removesuffix(" ")  # the last word's "</w>"

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    # ------------------------------------------------------------------------------------- save / load

    def config(self) -> dict:
        """What tokenizer_config.json holds: enough to rebuild and to check the vocab layout on load."""
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "sot_token": self.sot_token,
            "eot_token": self.eot_token,
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
            "context_length": self.context_length,
            "clean": "ftfy+html+whitespace+lower",
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json (Hugging Face format) and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / TOKENIZER_FILE, self._hf.to_str(pretty=False))
        _write_atomic(directory / CONFIG_FILE, json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a directory written by `save`. Errors name the directory and the file at fault."""
        directory = Path(directory)
        missing = [name for name in (TOKENIZER_FILE, CONFIG_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no saved tokenizer in {directory}: missing {', '.join(missing)} "
                f"(Tokenizer.save writes {TOKENIZER_FILE} and {CONFIG_FILE})"
            )
        config_path, tok_path = directory / CONFIG_FILE, directory / TOKENIZER_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt tokenizer config {config_path}: {e}") from e
        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ValueError(
                f"{config_path} is not an mlx_clip tokenizer config (format != {CONFIG_FORMAT!r})"
            )
        if config.get("kind") in ("hf", "sentencepiece"):
            raise ValueError(
                f"{config_path} holds a {config['kind']} tokenizer, not the CLIP BPE: read it with "
                "mlx_clip.text.vocab.load_tokenizer"
            )
        if config.get("version", 0) > CONFIG_VERSION:
            raise ValueError(
                f"{config_path} has version {config['version']}; this mlx_clip reads <= {CONFIG_VERSION}"
            )
        try:
            hf = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"corrupt tokenizer file {tok_path}: {e}") from e
        try:
            tok = cls(
                hf,
                sot_token=config["sot_token"],
                eot_token=config["eot_token"],
                kind=config.get("kind", "unknown"),
                context_length=int(config.get("context_length", DEFAULT_CONTEXT_LENGTH)),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"tokenizer in {directory} is inconsistent: {e}") from e
        # The ids the model was trained with must not move: check the config against the vocab.
        for key in ("vocab_size", "sot_token_id", "eot_token_id"):
            if key in config and config[key] != getattr(tok, key):
                raise ValueError(
                    f"{config_path}: {key}={config[key]} but {tok_path} gives {getattr(tok, key)}"
                )
        return tok

    def __getstate__(self) -> dict:
        # Data-loader workers pickle the tokenizer; the Rust objects travel as their JSON.
        return {"hf": self._hf.to_str(), "config": self.config()}

    def __setstate__(self, state: dict) -> None:
        c = state["config"]
        self.__init__(
            tokenizers.Tokenizer.from_str(state["hf"]),
            sot_token=c["sot_token"],
            eot_token=c["eot_token"],
            kind=c["kind"],
            context_length=c["context_length"],
        )


def _write_atomic(path: Path, data: str | bytes) -> None:
    # A checkpoint directory must never hold half a file: write a sibling, then rename over.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
