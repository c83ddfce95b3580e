"""Hugging Face transformers CLIP directories <-> mlx_clip checkpoints.

Import (`python -m mlx_clip.convert --from hf DIR --out OUT`): config.json (a `CLIPModel`
config) -> ModelConfig; model.safetensors (or a sharded index, or pytorch_model.bin read with
`torch.load(weights_only=True)`) -> canonical weights; vocab.json + merges.txt -> the tokenizer.

Export (`python -m mlx_clip.export --to hf`): config.json, model.safetensors, the tokenizer as
vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json, and
preprocessor_config.json (the checkpoint's own preprocessing, read back on import: interop/preprocess.py),
so that

    model = transformers.CLIPModel.from_pretrained(OUT)
    processor = transformers.AutoProcessor.from_pretrained(OUT)   # or CLIPTokenizerFast

give our features and our token ids. One difference by design: HF pads with EOT where mlx_clip pads
with 0. Features are unchanged: CLIP pools at the first EOT and attention is causal. (Padding with
the id-0 token "!" instead would make HF split a real "!" as that special token.)

The exported config keeps `text_config.eos_token_id = 2`, which selects HF's argmax pooling:
exactly mlx_clip's. A model with SigLIP's `logit_bias` (trained with loss.type siglip) is refused
with an error that says so: CLIPModel has no bias parameter, so its logits would not be ours; export
such a model to open_clip or torch_ref. Key names and layouts change in convert.py only.
"""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..models.config import SIZE_LIMITS, Activation, ModelConfig
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
from .layouts import WeightError, canonical_to_hf, hf_config_kwargs, hf_to_canonical
from .preprocess import HF_FILE, hf_preprocessor_config, with_hf_preprocessing

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (used when config.json omits a field).
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


# ModelConfig's sizes in config.json: field, section ("" is the top level), key.
_HF_SIZES = (
    ("embed_dim", "", "projection_dim"),
    ("image_size", "vision_config", "image_size"),
    ("patch_size", "vision_config", "patch_size"),
    ("vision_width", "vision_config", "hidden_size"),
    ("vision_layers", "vision_config", "num_hidden_layers"),
    ("vision_heads", "vision_config", "num_attention_heads"),
    ("context_length", "text_config", "max_position_embeddings"),
    ("vocab_size", "text_config", "vocab_size"),
    ("text_width", "text_config", "hidden_size"),
    ("text_layers", "text_config", "num_hidden_layers"),
    ("text_heads", "text_config", "num_attention_heads"),
)


def _section(config: dict, key: str, where: str) -> dict:
    """A tower's section of config.json (or its older `_dict` spelling); {} when absent."""
    value = config.get(key) or config.get(f"{key}_dict") or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _size(value, name: str, limit: int, where: str) -> int:
    """A size from config.json: a positive integer up to `limit` (image and patch sizes may be a
    square pair), checked before any arithmetic or allocation uses it."""
    if name.endswith(("image_size", "patch_size")) and isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {name}={value}: only square images and patches are supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{where}: {name} must be an integer in [1, {limit}], got {value!r}")
    return value


def _hf_sizes(config: dict, text: dict, vision: dict, where: str) -> dict:
    """The ModelConfig sizes of a config.json, each checked under its own key."""
    sections = {"": {"projection_dim": 512, **config}, "text_config": text, "vision_config": vision}
    sizes = {
        field: _size(sections[section][key], f"{section}.{key}".lstrip("."), SIZE_LIMITS[field], where)
        for field, section, key in _HF_SIZES
    }
    for section in ("text_config", "vision_config"):  # divided by the width below, for the MLP ratio
        limit = SIZE_LIMITS["vision_width"] * 64
        _size(sections[section]["intermediate_size"], f"{section}.intermediate_size", limit, where)
    return sizes


def hf_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """A transformers CLIPModel config (the parsed config.json) -> ModelConfig; a variant our model
    cannot express, or a value out of range, is an error that names the field."""
    if not isinstance(config, dict):
        raise ConfigError(
            f"{where}: expected a JSON object (a CLIPModel config), got {type(config).__name__}"
        )
    if config.get("model_type") != "clip":
        raise ConfigError(f"{where}: model_type={config.get('model_type')!r}, expected 'clip' (a CLIPModel)")
    text = {**_TEXT_DEFAULTS, **_section(config, "text_config", where)}
    vision = {**_VISION_DEFAULTS, **_section(config, "vision_config", where)}
    sizes = _hf_sizes(config, text, vision, where)
    t, v = "text_config", "vision_config"
    for tower, c in ((t, text), (v, vision)):
        if c["hidden_act"] not in typing.get_args(Activation):
            raise ConfigError(
                f"{where}: {tower}.hidden_act={c['hidden_act']!r}; mlx_clip supports "
                + " and ".join(map(repr, typing.get_args(Activation)))
            )
        eps = c["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ConfigError(f"{where}: {tower}.layer_norm_eps must be a number, got {eps!r}")
    if text["hidden_act"] != vision["hidden_act"]:
        raise ConfigError(
            f"{where}: {t}.hidden_act={text['hidden_act']!r} differs from {v}.hidden_act="
            f"{vision['hidden_act']!r}; mlx_clip uses one activation for both towers"
        )
    if text["layer_norm_eps"] != vision["layer_norm_eps"]:
        raise ConfigError(f"{where}: {t}.layer_norm_eps differs from {v}.layer_norm_eps; mlx_clip uses one")
    ratio = text["intermediate_size"] / text["hidden_size"]
    for tower, c in ((t, text), (v, vision)):
        if int(c["hidden_size"] * ratio) != c["intermediate_size"]:
            raise ConfigError(
                f"{where}: {tower}.intermediate_size={c['intermediate_size']} does not fit "
                f"{tower}.hidden_size={c['hidden_size']} with the MLP ratio {ratio:g} of the other "
                "tower; mlx_clip uses one mlp_ratio"
            )
    if vision["num_channels"] != 3:
        raise ConfigError(f"{where}: {v}.num_channels={vision['num_channels']}; only RGB (3) is supported")
    # Pooling: eos_token_id 2 is HF's legacy argmax (ours); otherwise HF pools at the first
    # eos_token_id, which is the argmax only when EOT is the largest id.
    eos = text["eos_token_id"]
    if eos not in (2, text["vocab_size"] - 1):
        raise ConfigError(
            f"{where}: {t}.eos_token_id={eos}: mlx_clip pools text at argmax(token id), which equals HF's "
            f"pooling only for eos_token_id 2 (legacy argmax) or {text['vocab_size'] - 1} (EOT = largest id)"
        )
    cfg = ModelConfig(
        **sizes, mlp_ratio=ratio, activation=text["hidden_act"], layer_norm_eps=float(text["layer_norm_eps"])
    )
    cfg.validate(f"{where}: model")  # what needs the whole architecture: divisibility, the parameter count
    return cfg


def hf_config_json(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json that transformers.CLIPModel.from_pretrained reads."""
    kw = hf_config_kwargs(cfg)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": kw["projection_dim"],
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {"model_type": "clip_text_model", **kw["text_config"]},
        "vision_config": {"model_type": "clip_vision_model", **kw["vision_config"]},
    }


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


def import_hf(src: str | Path, out: str | Path, force: bool = False) -> list[str]:
    """A Hugging Face CLIP directory -> an mlx_clip checkpoint directory. Returns notes to print."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face CLIPModel directory)")
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{src / 'config.json'}: invalid JSON ({e})") from None
    cfg = hf_model_config(config, str(src / "config.json"))
    cfg, preprocessing = with_hf_preprocessing(cfg, src)  # preprocessor_config.json, when there is one
    hf_state, path = _hf_weights(src)
    try:
        state = hf_to_canonical(hf_state, cfg, concat=np.concatenate)
    except WeightError as e:
        raise WeightError(f"{path}: {e}") from None
    tok = read_hf_tokenizer(src, cfg)
    write_checkpoint(out, cfg, state, tok, str(path), force)
    tokenizer = "tokenizer: " + (f"{tok.vocab_size} tokens" if tok else "none in the source")
    return [f"read {path}", tokenizer, preprocessing]


def export_hf(checkpoint: str | Path, out: str | Path, force: bool = False, ema: bool = False) -> list[str]:
    """An mlx_clip checkpoint (`ema`: its EMA weights) -> a directory that transformers' CLIPModel /
    AutoProcessor load."""
    ckpt, cfg, state, tok = read_checkpoint(checkpoint, ema)
    hf_state = contiguous(canonical_to_hf(state, cfg))
    with staged_output(out, force) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_json(cfg), indent=2))
        (tmp / HF_FILE).write_text(json.dumps(hf_preprocessor_config(cfg), indent=2))
        if tok is not None:
            write_hf_tokenizer(tok, tmp, cfg.context_length)
    return [f"from {ckpt}", "tokenizer: " + (f"{tok.kind}, {tok.vocab_size} tokens" if tok else "none")]
