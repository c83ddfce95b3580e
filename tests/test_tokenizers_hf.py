"""Checkpoint tokenizers (mlx_clip/text/hf_tokenizer.py): ids equal transformers' AutoTokenizer.

Every tokenizer file is built here, offline: a T5-style Unigram, a Gemma / SigLIP 2-style byte-fallback
BPE and a plain BPE with a BOS/EOS template are trained with `tokenizers` on CORPUS and saved as
Hugging Face directories; a SentencePiece model is trained with `sentencepiece`.
"""

import io
import json
import pickle
import random

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from mlx_clip.text.clean import CLEANERS
from mlx_clip.text.hf_dir import read_hf_directory
from mlx_clip.text.hf_tokenizer import HFTokenizer
from mlx_clip.text.tokenizer import Tokenizer
from mlx_clip.text.vocab import load_saved, load_tokenizer, train_tokenizer


def make_corpus() -> list[str]:
    rng = random.Random(0)
    words = (
        "a photo of the Dog cat CAT bird Über café naïve façade résumé São Paulo 東京 猫の写真 "
        "北京 서울 Москва ½ 3.14 2026 42nd x86_64 e-mail don't it's U.S.A. #hashtag @user "
        "50% $9.99 (big) [red] {blue} <tag> C++ Ω ß ﬁ İstanbul 😀 🐱 👍🏽 ♥ — … “quoted” ‘single’"
    ).split()
    seps = [" ", "  ", "\t", "\n", ", ", ". ", "! ", "? ", "_", "-", " / "]
    corpus = [
        "",
        " ",
        "a",
        "A photo of a DOG.",
        "  leading and trailing spaces  ",
        "snake_case_words and camelCaseWords",
        "&amp; &lt;b&gt;html&lt;/b&gt; entities",
        "mojibake: cafÃ© and â€œquotesâ€\x9d",
        "zero-width\u200bspace and nbsp\u00a0here",
        "the end </s> in the middle",
        "</s>",
        "</s> starts with EOS",
        "ends with EOS</s>",
        "a<unk>b <pad> c </s></s> d",
        "Hello, </s>!!! World_42",
        " ".join(["a very long caption that must be truncated"] * 40),
    ]
    for _ in range(300):
        n = rng.randint(1, 18)
        parts = [rng.choice(words) for _ in range(n)]
        text = parts[0]
        for p in parts[1:]:
            text += rng.choice(seps) + p
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        corpus.append(text)
    return corpus


CORPUS = make_corpus()
TRAIN = [t for t in CORPUS if "<" not in t]  # special tokens written in a text are not for training
LENGTHS = (64, 16)


def hf_ids(directory, texts, length):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    out = auto(list(texts), padding="max_length", truncation=True, max_length=length)
    return np.array(out["input_ids"], dtype=np.int32)


def write_hf_dir(directory, tok: RustTokenizer, config: dict, specials: dict) -> None:
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **specials}))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))


def t5_like(directory):
    """SigLIP's T5 tokenizer: Unigram, <pad>=0 </s>=1 <unk>=2, Metaspace, EOS appended, right padding."""
    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(TRAIN, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 64}
    write_hf_dir(directory, tok, config, {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    return directory


def gemma_like(directory, tokenizer_class="GemmaTokenizer"):
    """SigLIP 2's Gemma tokenizer: byte-fallback BPE on "▁"-joined text, <pad>=0 <eos>=1 <bos>=2, EOS
    appended and no BOS (open_clip's SigLIP 2 setting), right padding."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trained = RustTokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials + byte_tokens, limit_alphabet=60, show_progress=False
    )
    trained.train_from_iterator(TRAIN, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = RustTokenizer(
        models.BPE(model["vocab"], merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    config = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": False,
        "add_eos_token": True,
        "padding_side": "right",
        "model_max_length": 64,
    }
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    write_hf_dir(directory, tok, config, names)
    return directory


def bpe_template(directory):
    """A generic tokenizer.json: NFKC + lower case, byte-level BPE, "<s> $A </s>" template, left padding."""
    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left"}
    write_hf_dir(directory, tok, config, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "t5": t5_like(root / "t5"),
        "gemma": gemma_like(root / "gemma"),
        "siglip2": gemma_like(root / "siglip2", "Siglip2Tokenizer"),
        "bpe": bpe_template(root / "bpe"),
    }


@pytest.mark.parametrize("name", ["t5", "gemma", "siglip2", "bpe"])
def test_ids_equal_auto_tokenizer(hf_dirs, name, tmp_path):
    ours = load_tokenizer(hf_dirs[name])
    assert isinstance(ours, HFTokenizer)
    for length in LENGTHS:
        expected = hf_ids(hf_dirs[name], CORPUS, length)
        np.testing.assert_array_equal(ours(CORPUS, length), expected, err_msg=f"{name}, max_length={length}")
    # saved next to a checkpoint and read back: the same ids, the same settings
    ours.save(tmp_path / "ckpt")
    back = load_tokenizer(tmp_path / "ckpt")
    assert back.config() == ours.config()
    np.testing.assert_array_equal(back(CORPUS), ours(CORPUS))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ours))(CORPUS[:20]), ours(CORPUS[:20]))
    # written back as Hugging Face files (export): AutoTokenizer gives our ids again
    out = tmp_path / "export"
    out.mkdir()
    back.save_hf(out)
    np.testing.assert_array_equal(hf_ids(out, CORPUS, 64), ours(CORPUS, 64))


def test_settings_follow_the_checkpoint(hf_dirs):
    t5, gemma, siglip2, bpe = (load_tokenizer(hf_dirs[n]) for n in ("t5", "gemma", "siglip2", "bpe"))
    assert (t5.eos_id, t5.pad_id, t5.bos_id, t5.pad_side, t5.context_length) == (1, 0, None, "right", 64)
    assert (gemma.eos_id, gemma.bos_id, gemma.pad_id, gemma.clean) == (1, None, 0, "none")
    assert siglip2.clean == "lowercase"
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_side) == (1, 2, "left")
    row = t5(["a photo"], 8)[0]
    assert row[list(row).index(1) + 1 :].tolist() == [0] * (7 - list(row).index(1))  # EOS then pads
    long = t5([max(CORPUS, key=len)], 16)[0]
    assert long[-1] == 1 and 0 not in long  # truncated: EOS kept at the end
    assert bpe([max(CORPUS, key=len)], 16)[0][[0, -1]].tolist() == [1, 2]
    assert t5.decode(t5(["A photo of a dog"])[0]) == "A photo of a dog"


def test_canonicalize_matches_open_clip():
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    theirs = open_clip_tokenizer.get_clean_fn("canonicalize")
    assert [CLEANERS["canonicalize"](t) for t in CORPUS] == [theirs(t) for t in CORPUS]
    for name in ("whitespace", "lower"):
        theirs = open_clip_tokenizer.get_clean_fn(name)
        assert [CLEANERS[name](t) for t in CORPUS] == [theirs(t) for t in CORPUS], name


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([CLEANERS["siglip"](t) for t in TRAIN if t.strip()]),
        model_writer=model,
        vocab_size=300,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    directory = tmp_path_factory.mktemp("siglip")
    (directory / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    specials = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    return directory, processor


def test_sentencepiece_model_equals_its_own_ids(spiece, tmp_path):
    directory, sp = spiece
    ours = load_tokenizer(directory)  # SigLIP's layout: siglip cleaning, EOS, pad "</s>" to 64
    assert (ours.kind, ours.clean, ours.context_length, ours.eos_id, ours.pad_id) == (
        "sentencepiece",
        "siglip",
        64,
        1,
        1,
    )
    plain = [t for t in CORPUS if not any(s in t for s in ("</s>", "<pad>", "<unk>"))]
    for length in LENGTHS:
        expected = np.full((len(plain), length), 1, dtype=np.int32)
        for row, text in zip(expected, plain, strict=True):
            ids = [*sp.encode(CLEANERS["siglip"](text))[: length - 1], 1]
            row[: len(ids)] = ids
        np.testing.assert_array_equal(ours(plain, length), expected)
    bare = load_tokenizer(directory / "spiece.model")  # a bare .model: its own pad / EOS ids, no cleaning
    assert (bare.pad_id, bare.eos_id, bare.clean) == (0, 1, "none")
    ours.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "spiece.model").read_bytes() == (directory / "spiece.model").read_bytes()
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "ckpt")(CORPUS), ours(CORPUS))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ours))(CORPUS), ours(CORPUS))


def test_missing_sentencepiece_names_the_extra(spiece, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"spiece\.model.*mlx-clip\[sentencepiece\]"):
        load_tokenizer(spiece[0])


def test_clip_tokenizer_dirs_still_load(tmp_path):
    clip = train_tokenizer(TRAIN, 600)
    clip.save(tmp_path / "new")
    old = tmp_path / "old"  # an early checkpoint: a config without "kind"
    clip.save(old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    del config["kind"]
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    for directory in (tmp_path / "new", old):
        for tok in (load_tokenizer(directory), load_saved(directory), Tokenizer.load(directory)):
            assert isinstance(tok, Tokenizer)
            np.testing.assert_array_equal(tok(CORPUS), clip(CORPUS))


def test_errors_name_the_file(hf_dirs, tmp_path):
    ours = load_tokenizer(hf_dirs["t5"])
    ours.save(tmp_path / "a")
    with pytest.raises(ValueError, match=r"a/tokenizer_config\.json.*load_tokenizer"):
        Tokenizer.load(tmp_path / "a")  # the CLIP class says which function reads it
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({**config, "kind": "wordpiece9"}))
    with pytest.raises(ValueError, match=r"a/tokenizer_config\.json.*unknown tokenizer kind 'wordpiece9'"):
        load_tokenizer(tmp_path / "a")
    ours.save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"b/tokenizer\.json"):
        load_tokenizer(tmp_path / "b")
    ours.save(tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"names tokenizer\.json.*c"):
        load_tokenizer(tmp_path / "c")
    broken = tmp_path / "broken_hf"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=r"broken_hf/tokenizer\.json"):
        load_tokenizer(broken)
    with pytest.raises(ValueError, match=r"unknown text cleaning 'loud'"):
        HFTokenizer(ours._backend, clean="loud")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(FileNotFoundError, match="nothing.*tokenizer.json.*spiece.model"):
        read_hf_directory(nothing)


def test_interop_reads_and_writes_checkpoint_tokenizers(hf_dirs, spiece, tmp_path):
    from types import SimpleNamespace

    from mlx_clip.interop.hf import read_hf_tokenizer, write_hf_tokenizer

    t5 = load_tokenizer(hf_dirs["t5"])
    cfg = SimpleNamespace(vocab_size=t5.vocab_size, context_length=24)
    tok = read_hf_tokenizer(hf_dirs["t5"], cfg, clean="canonicalize")  # open_clip's tokenizer_kwargs
    assert (type(tok), tok.context_length, tok.clean) == (HFTokenizer, 24, "canonicalize")
    np.testing.assert_array_equal(tok(CORPUS), t5([CLEANERS["canonicalize"](t) for t in CORPUS], 24))
    write_hf_tokenizer(t5, tmp_path, context_length=32)  # export: AutoTokenizer reads our ids back
    np.testing.assert_array_equal(hf_ids(tmp_path, CORPUS, 32), t5(CORPUS, 32))
    sp = read_hf_tokenizer(
        spiece[0], SimpleNamespace(vocab_size=spiece[1].get_piece_size(), context_length=64)
    )
    assert sp.kind == "sentencepiece"


@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_sentencepiece_equals_transformers_siglip_tokenizer(spiece, tmp_path):
    pytest.importorskip("google.protobuf")  # transformers' SiglipTokenizer needs protobuf
    ours = load_tokenizer(spiece[0])
    for length in LENGTHS:  # special tokens written in the text included
        np.testing.assert_array_equal(ours(CORPUS, length), hf_ids(spiece[0], CORPUS, length))
    # padding with "<pad>" (not EOS) shows where an EOS written at the end is not doubled
    other = tmp_path / "pad"
    other.mkdir()
    for name in ("spiece.model", "tokenizer_config.json"):
        (other / name).write_bytes((spiece[0] / name).read_bytes())
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (other / "special_tokens_map.json").write_text(json.dumps(specials))
    ours = load_tokenizer(other)
    assert ours.pad_id == 0
    np.testing.assert_array_equal(ours(CORPUS), hf_ids(other, CORPUS, 64))


def test_checkpoint_with_its_own_tokenizer_loads_for_inference(hf_dirs, tmp_path):
    import mlx_clip
    from mlx_clip.config import Config, ModelSection, config_to_yaml
    from mlx_clip.inference import encode_texts, load
    from mlx_clip.interop.files import read_checkpoint
    from mlx_clip.models.config import ModelConfig
    from mlx_clip.schema import to_dict

    tok = load_tokenizer(hf_dirs["t5"])
    arch = dict(embed_dim=16, image_size=32, patch_size=16, vision_width=32, vision_layers=1)
    arch |= dict(vision_heads=2, context_length=13, vocab_size=tok.vocab_size, text_width=32)
    arch |= dict(text_layers=1, text_heads=2)
    model = mlx_clip.create_model(ModelConfig(**arch), seed=0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    mlx_clip.save_weights(model, ckpt / "model.safetensors")
    (ckpt / "config.yaml").write_text(
        config_to_yaml(Config(model=ModelSection(arch="tiny", **to_dict(model.config))))
    )
    tok.save(ckpt)
    _, loaded, _ = load(ckpt)
    assert isinstance(loaded, HFTokenizer) and loaded.context_length == 13
    np.testing.assert_array_equal(loaded(CORPUS[:8]), tok(CORPUS[:8], 13))
    assert encode_texts(model, loaded, CORPUS[:8]).shape == (8, 16)
    assert isinstance(read_checkpoint(ckpt)[3], HFTokenizer)  # convert / export read it too
