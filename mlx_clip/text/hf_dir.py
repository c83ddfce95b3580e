"""Reading a Hugging Face tokenizer directory into an HFTokenizer (framework-free).

tokenizer.json (or a SentencePiece model), tokenizer_config.json and special_tokens_map.json give the
padding, BOS / EOS, context length and cleaning, as transformers reads them. transformers 5 is the
reference: where a tokenizer.json exists its post-processor decides BOS / EOS (tokenizer_config.json's
add_bos_token / add_eos_token are ignored), and a few classes pad on the left by default
(LEFT_PADDING_CLASSES).
"""

from __future__ import annotations

import os
from pathlib import Path

from .hf_tokenizer import SP_FILES, HFTokenizer, SentencePieceModel, TokenizerJson, read_json
from .tokenizer import CONFIG_FILE, DEFAULT_CONTEXT_LENGTH

SIGLIP_CONTEXT_LENGTH = 64
# transformers 5 classes whose default padding side is left (a tokenizer_config.json setting wins)
LEFT_PADDING_CLASSES = ("Gemma", "Siglip2", "Llama", "CodeLlama", "Cohere", "XLNet")


def _token(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def _post_processor_specials(path: Path) -> tuple[str | None, str | None]:
    """(BOS, EOS) that tokenizer.json's post-processor puts around a single text."""
    proc = read_json(path).get("post_processor")
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
    config = read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    smap = directory / "special_tokens_map.json"
    specials = read_json(smap) if smap.is_file() else {}
    cls = str(config.get("tokenizer_class") or "").removesuffix("Fast").removesuffix("Tokenizer")
    name = {k: _token(config.get(f"{k}_token") or specials.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    sp_path = next((directory / n for n in SP_FILES if (directory / n).is_file()), None)
    json_path = directory / "tokenizer.json"
    # transformers' SiglipTokenizer reads only the SentencePiece model, where there is one
    if json_path.is_file() and (cls != "Siglip" or sp_path is None):
        backend = TokenizerJson.from_file(json_path)
        try:
            bos, eos = _post_processor_specials(json_path)
        except (KeyError, StopIteration, TypeError, AttributeError) as e:
            raise ValueError(f"{json_path}: unreadable post_processor ({e!r})") from None
    elif sp_path is not None:
        backend = SentencePieceModel.from_file(sp_path)
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
    backend = SentencePieceModel.from_file(Path(path))
    sp = backend.sp
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else eos
    if pad is None:
        raise ValueError(f"{path}: the model has neither a pad nor an EOS id to pad with")
    return HFTokenizer(backend, context_length=SIGLIP_CONTEXT_LENGTH, pad_id=pad, eos_id=eos)
