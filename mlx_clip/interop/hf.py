"""Hugging Face transformers CLIPModel / SiglipModel directories <-> mlx_clip checkpoints.

Import (`python -m mlx_clip.convert --from hf DIR --out OUT`): config.json (model_type "clip",
"siglip", or "siglip2" for use at its grid's fixed resolution) -> ModelConfig (hf_config.py);
model.safetensors (or a sharded index, or pytorch_model.bin read with `torch.load(weights_only=True)`)
-> canonical weights (layouts.py, layouts_siglip.py); the tokenizer: vocab.json + merges.txt (CLIP),
or any tokenizer.json / spiece.model with its tokenizer_config.json settings (SigLIP: EOS appended,
padded to 64); preprocessor_config.json -> the preprocessing (interop/preprocess.py; without it, the
class's own: CLIP's or SigLIP's, named in the notes).

Export (`python -m mlx_clip.export --to hf`): config.json, model.safetensors, preprocessor_config.json
(the checkpoint's own preprocessing, for CLIPImageProcessor or SiglipImageProcessor, read back on
import: interop/preprocess.py) and the tokenizer, as transformers' CLIPModel for a CLIP-shaped model
and as SiglipModel for a SigLIP-shaped one (hf_config.hf_class; a model neither class holds is
refused, naming the options),
so that

    model = transformers.AutoModel.from_pretrained(OUT)             # CLIPModel or SiglipModel
    tokenizer = transformers.AutoTokenizer.from_pretrained(OUT)

give our features and our token ids. A checkpoint's own tokenizer (tokenizer.json or SentencePiece) is
written back as it came. A CLIP BPE is written as vocab.json + merges.txt, and there is one
difference by design: HF pads with EOT where mlx_clip pads with 0. CLIP's features are unchanged (it
pools at the first EOT and attention is causal); a SigLIP-shaped model pools the last position, so
the export says to set `tokenizer.pad_token_id = 0` (PAD_ZERO_NOTE). (Naming the id-0 token "!" the
pad token instead would make HF split a real "!" as that special token.)

The exported CLIPModel config keeps `text_config.eos_token_id = 2`, which selects HF's argmax
pooling: exactly mlx_clip's. A CLIP-shaped model with SigLIP's `logit_bias` is refused with an error
that says so: CLIPModel has no bias parameter, so its logits would not be ours; export such a model
to open_clip or torch_ref. SiglipModel keeps logit_bias. Key names and layouts change in layouts*.py only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..models.config import ModelConfig
from ..schema import ConfigError
from ..text.hf_tokenizer import HFTokenizer
from ..text.tokenizer import (
    HF_EOT_TOKEN,
    HF_SOT_TOKEN,
    OPENAI_VOCAB_SIZE,
    TOKENIZER_FILE,
    Tokenizer,
)
from ..text.vocab import AnyTokenizer, openai_tokenizer, read_hf_tokenizer_dir
from .files import (
    contiguous,
    read_checkpoint,
    read_sharded,
    read_state_dict,
    staged_output,
    write_checkpoint,
)
from .hf_config import NAFLEX_NOTE, hf_class, hf_config_json, hf_model_config, siglip_config_json
from .layouts import WeightError, canonical_to_hf, hf_to_canonical
from .layouts_siglip import canonical_to_hf_siglip, hf_siglip_to_canonical
from .preprocess import HF_FILE, hf_preprocessor_config, with_hf_preprocessing

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ---------------------------------------------------------------------------
# Tokenizer files


def vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE of any mlx_clip tokenizer (OpenAI or trained): token -> id, and merges by rank."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        model = json.loads((Path(d) / TOKENIZER_FILE).read_text(encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _write_vocab_merges(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    if any(" " in a or " " in b for a, b in merges):
        raise ValueError("a merge holds a space: it cannot be written to merges.txt")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_hf_tokenizer(tok: AnyTokenizer, out: Path, context_length: int) -> None:
    """vocab.json + merges.txt + HF tokenizer_config.json + special_tokens_map.json.

    Every mlx_clip CLIP vocab is a byte-level BPE with "</w>", which is what transformers'
    CLIPTokenizer builds from these two files. The OpenAI vocab gets the OpenAI special-token names.
    A checkpoint's own tokenizer (tokenizer.json or SentencePiece) is written back as it came.
    """
    if isinstance(tok, HFTokenizer):
        tok.context_length = context_length
        tok.save_hf(out)
        return
    vocab, merges = vocab_and_merges(tok)
    sot, eot = tok.sot_token, tok.eot_token
    if tok.kind == "openai" and (sot, eot) != (HF_SOT_TOKEN, HF_EOT_TOKEN):
        rename = {sot: HF_SOT_TOKEN, eot: HF_EOT_TOKEN}
        vocab = {rename.get(k, k): i for k, i in vocab.items()}
        sot, eot = HF_SOT_TOKEN, HF_EOT_TOKEN
    _write_vocab_merges(out, vocab, merges)
    specials = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        **specials,
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))


def _kind(tok: Tokenizer) -> str:
    """ "openai" only for the OpenAI vocabulary itself (open_clip's default tokenizer then fits)."""
    if tok.vocab_size != OPENAI_VOCAB_SIZE:
        return "converted"
    try:
        ref = openai_tokenizer()
    except (FileNotFoundError, ValueError):
        return "converted"
    same = all(tok.id_to_token(i) == ref.id_to_token(i) for i in range(tok.vocab_size - 2))
    return "openai" if same else "converted"


def read_hf_tokenizer(directory: Path, cfg: ModelConfig, clean: str | None = None) -> AnyTokenizer | None:
    """The tokenizer of a Hugging Face directory: the CLIP BPE (vocab.json + merges.txt, or inside
    tokenizer.json as transformers 5 saves it), any other tokenizer.json or a SentencePiece model
    (SigLIP), with its tokenizer_config.json settings; None when there is none. `clean` overrides the
    text cleaning of a non-CLIP tokenizer (open_clip's tokenizer_kwargs)."""
    try:
        tok = read_hf_tokenizer_dir(directory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tok is None:
        return None
    if isinstance(tok, HFTokenizer) and clean is not None:
        tok.clean = clean
    if tok.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"{directory}: the tokenizer has {tok.vocab_size} tokens, "
            f"the model's vocab_size is {cfg.vocab_size}"
        )
    if isinstance(tok, Tokenizer):
        tok.kind = _kind(tok)
    tok.context_length = cfg.context_length
    return tok


# ---------------------------------------------------------------------------
# Import / export


def _hf_weights(src: Path) -> tuple[dict[str, np.ndarray], Path]:
    for name in WEIGHT_FILES:
        path = src / name
        if path.is_file():
            return (read_sharded(path) if name.endswith(".index.json") else read_state_dict(path)), path
    raise FileNotFoundError(f"{src}: no Hugging Face weights ({', '.join(WEIGHT_FILES)})")


def _read_config(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"{src}: no config.json (expected a Hugging Face CLIPModel or SiglipModel directory)"
        )
    try:
        return json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{src / 'config.json'}: invalid JSON ({e})") from None


def import_hf(src: str | Path, out: str | Path, force: bool = False) -> list[str]:
    """A Hugging Face CLIPModel or SiglipModel directory -> an mlx_clip checkpoint directory.
    Returns notes to print."""
    src = Path(src)
    config = _read_config(src)
    cfg = hf_model_config(config, str(src / "config.json"))
    model_type = config["model_type"]
    # preprocessor_config.json when there is one; else the class's default (hf_config.py gives a
    # SigLIP config SigLIP's preprocessing, a CLIP config CLIP's)
    default = "CLIP's" if model_type == "clip" else "SigLIP's"
    cfg, preprocessing = with_hf_preprocessing(cfg, src, default)
    hf_state, path = _hf_weights(src)
    try:
        if model_type == "clip":
            state = hf_to_canonical(hf_state, cfg, concat=np.concatenate)
        else:
            state = hf_siglip_to_canonical(hf_state, cfg, np.concatenate, naflex=model_type == "siglip2")
    except WeightError as e:
        raise WeightError(f"{path}: {e}") from None
    tok = read_hf_tokenizer(src, cfg)
    write_checkpoint(out, cfg, state, tok, str(path), force)
    kind = f"{tok.kind}, {tok.vocab_size} tokens" if tok else "none in the source"
    notes = [f"read {path} ({model_type})", f"tokenizer: {kind}", preprocessing]
    return notes + ([NAFLEX_NOTE.format(size=cfg.image_size)] if model_type == "siglip2" else [])


# A CLIP BPE tokenizer pads with id 0, and transformers' CLIPTokenizer with EOT: a model pooled at
# the last position (SigLIP's) sees the padding, and naming "!" (id 0) the pad token would make HF
# split every "!" as that token. Setting the id after loading pads with 0 and changes nothing else.
PAD_ZERO_NOTE = (
    "tokenizer: a CLIP BPE, which pads with 0 where transformers' CLIPTokenizer pads with EOT, and "
    "this model pools the last position: after tok = AutoTokenizer.from_pretrained(OUT), set "
    "tok.pad_token_id = 0 and call tok(texts, padding='max_length', max_length={n}) to get its ids"
)


def export_hf(checkpoint: str | Path, out: str | Path, force: bool = False, ema: bool = False) -> list[str]:
    """An mlx_clip checkpoint (`ema`: its EMA weights) -> a directory that transformers' CLIPModel or
    SiglipModel (whichever has this model's towers: hf_config.hf_class) and AutoTokenizer load."""
    ckpt, cfg, state, tok = read_checkpoint(checkpoint, ema)
    arch = hf_class(cfg)
    if arch == "SiglipModel":
        hf_state, config = canonical_to_hf_siglip(state, cfg), siglip_config_json(cfg)
    else:
        hf_state, config = canonical_to_hf(state, cfg), hf_config_json(cfg)
    notes = [f"from {ckpt}", f"as transformers' {arch}"]
    with staged_output(out, force) as tmp:
        save_file(contiguous(hf_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        processor = arch.replace("Model", "ImageProcessor"), arch.replace("Model", "Processor")
        preprocess = hf_preprocessor_config(cfg, *processor)  # the checkpoint's own preprocessing
        (tmp / HF_FILE).write_text(json.dumps(preprocess, indent=2))
        if tok is not None:
            write_hf_tokenizer(tok, tmp, cfg.context_length)
    notes.append("tokenizer: " + (f"{tok.kind}, {tok.vocab_size} tokens" if tok else "none"))
    if isinstance(tok, Tokenizer) and cfg.text_pool != "argmax":
        notes.append(PAD_ZERO_NOTE.format(n=cfg.context_length))
    return notes
