"""CLIP tokenizer: exact ids against open_clip and transformers, CLIP layout, save/load, training."""

import json
import pickle
import unicodedata
import warnings

import numpy as np
import pytest

from mlx_clip.text import tokenizer as tokmod
from mlx_clip.text import vocab
from mlx_clip.text.tokenizer import Tokenizer, clean_text
from mlx_clip.text.vocab import load_tokenizer, openai_tokenizer, train_tokenizer

LONG = "a very long caption about a red bicycle leaning on a wall " * 12  # ~150 tokens

# Text that stresses each step of the pipeline: ftfy, html, whitespace, case, regex classes, BPE, bytes.
CORPUS = [
    "a photo of a cat",
    "A PHOTO OF A DOG, Running On The BEACH!!!",
    "",
    "   ",
    "x",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand\ttabs\nand\nnewlines\r\nand\x0bvertical\x0cfeed",
    "file\x1cseparator\x1dgroup\x1erecord\x1funit",
    "non\u00a0breaking\u2003em\u3000ideographic\u2028line",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "control\x00chars\x07bell\x7fdel",
    "don't it's I'M we'll they'd you're we've",
    "don\u2019t it\u2019s (curly apostrophes)",
    "'s 't 're alone ''quoted''",
    "it'\u017f long-s contraction",
    "Fish &amp; Chips",
    "&amp;amp; double escaped &amp;lt;b&amp;gt;",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A; &nbsp;nbsp",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe STRASSE",
    "cafe\u0301 e\u0301le\u0300ve combining accents",
    "caf\u00c3\u00a9 mojibake \u00e2\u20ac\u2122 and \u00c3\u00bcber",
    "\u10e6 \u0345 \u1fb3 \u03b1\u0345 ypogegrammeni",
    "\u039f\u0394\u039f\u03a3 \u039c\u0395\u0393\u0391\u039b\u039f\u03a3 final sigma",
    "\u0130stanbul \u0131\u015f\u0131k Turkish dotted I",
    "\u4f60\u597d\u4e16\u754c\uff0c\u8fd9\u662f\u4e00\u53ea\u732b\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u043e\u0448\u043a\u0430",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0663\u0664",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "emoji \U0001f916\U0001f389\U0001f408 cat",
    "zwj family \U0001f468\u200d\U0001f469\u200d\U0001f467 skin \U0001f44d\U0001f3fd",
    "flags \U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5 keycap 1\ufe0f\u20e3",
    "\ufb01ne \ufb02ow ligatures and \uff21\uff22\uff23\uff11\uff12\uff13 full width",
    "numbers 1,000,000 and 3.14159 and 2024-01-01 and 007",
    "superscript x\u00b2 fraction \u00bd roman \u2163 circled \u2460",
    "punctuation... ?! ;-) :-( <3 --> ~~~ ___ *** ###",
    "quotes \u201cdouble\u201d \u2018single\u2019 \u00abguillemets\u00bb",
    "https://example.com/path?query=1&x=2 user@mail.org #hashtag @mention",
    "snake_case camelCase kebab-case PascalCase",
    "tab\tat\tend\t",
    "\n\nnewlines first",
    "a" * 300,
    "1234567890" * 10,
    LONG,
    " ".join(["\u732b"] * 100),
    "<start_of_text>",
    "a <end_of_text> b",
    "<START_OF_TEXT>a photo<END_OF_TEXT>",
    "x<<end_of_text> punctuation swallows the special",
    "'s<end_of_text> after a contraction",
    "caf\u00e9 \u732b\U0001f916 <end_of_text> non-ascii before a special",
    "<|startoftext|> hugging face names are plain text here",
    "\u00a9 2024 \u00ae \u2122 \u20ac100 \u00a35 \u00a510",
    "math \u2200x \u2203y: x\u2264y \u2227 \u00acz \u221e",
    "A man riding a horse on a beach at sunset.",
    "Two dogs playing with a frisbee in the park",
    "a close-up photo of a bowl of ramen, 4k, highly detailed",
    "The 1990's were great; weren't they?",
]


@pytest.fixture(scope="module")
def tok():
    try:
        return openai_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(f"no offline OpenAI CLIP vocabulary: {e}")


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    module = pytest.importorskip("open_clip.tokenizer", reason="open_clip_torch is not installed")
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, open_clip_tokenizer):
    """A Hugging Face style CLIP directory, exported from open_clip's own vocab and merge ranks."""
    directory = tmp_path_factory.mktemp("hf_clip")
    vocab = dict(open_clip_tokenizer.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    ranks = open_clip_tokenizer.bpe_ranks
    merges = sorted(ranks, key=ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


CAPTIONS = [
    "a photo of a cat",
    "a dog on the grass",
    "two cats sleeping on a red sofa",
    "a photograph of the night sky",
    "a man riding a bike in the city",
    "a woman walking on the beach at sunset",
    "three small dogs under a green tree",
    "a blue car parked on the street",
] * 20


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(CAPTIONS, 600)


# ------------------------------------------------------------------------------------ OpenAI parity


def test_openai_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.id_to_token(0) == "!"


def test_ids_match_open_clip(tok, open_clip_tokenizer):
    expected = open_clip_tokenizer(CORPUS, context_length=77).numpy()
    got = tok(CORPUS, context_length=77)
    assert got.dtype == np.int32 and got.shape == (len(CORPUS), 77)
    mismatched = [CORPUS[i] for i in np.flatnonzero((got != expected).any(axis=1))]
    assert not mismatched


def test_every_assigned_character_matches_open_clip(tok, open_clip_tokenizer):
    # All characters Python's unicodedata knows (Unicode 14-16), in runs of 5 so that letter runs,
    # combining marks and byte merges meet their neighbours. ~2400 strings, ~3 s.
    chars = [chr(c) for c in range(0x20, 0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    texts = [
        "".join(c + ("" if k % 5 else " ") for k, c in enumerate(chars[i : i + 60]))
        for i in range(0, len(chars), 60)
    ]
    mismatched = [ascii(t) for t in texts if tok.encode(t) != open_clip_tokenizer.encode(t)]
    assert not mismatched, mismatched[:3]


def test_truncation_matches_open_clip(tok, open_clip_tokenizer):
    for ctx in (2, 5, 16):
        np.testing.assert_array_equal(
            tok(CORPUS, ctx), open_clip_tokenizer(CORPUS, context_length=ctx).numpy()
        )


def test_encode_and_decode_match_open_clip(tok, open_clip_tokenizer):
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == open_clip_tokenizer.encode(text), text
        if tok.sot_token_id not in ids and tok.eot_token_id not in ids:
            # open_clip leaves a space after the last word; ours does not.
            assert tok.decode(ids) == open_clip_tokenizer.decode(ids).removesuffix(" "), text


def test_ids_match_transformers_on_cleaned_text(tok, hf_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    ours = load_tokenizer(hf_dir)  # also exercises the Hugging Face directory path
    # transformers does no ftfy / html cleaning, so both get clean_text's output. Its regex is
    # case-sensitive, so "'ſ" is no contraction there (open_clip and we follow IGNORECASE).
    texts = [clean_text(t) for t in CORPUS if "\u017f" not in t]
    for text in texts:
        want = hf(text)["input_ids"]
        assert [ours.sot_token_id, *ours.encode(text), ours.eot_token_id] == want, text


def test_hf_directory_gives_openai_ids(tok, hf_dir):
    from_dir = load_tokenizer(hf_dir)
    assert from_dir.vocab_size == 49408 and from_dir.eot_token_id == 49407
    # Only the literal special-token names differ ("<|endoftext|>" vs "<end_of_text>").
    plain = [t for t in CORPUS if "of_text>" not in t.lower() and "oftext|>" not in t.lower()]
    np.testing.assert_array_equal(from_dir(plain), tok(plain))
    assert openai_tokenizer(hf_dir).vocab_size == 49408


# --------------------------------------------------------------------------------- shape and padding


def test_truncation_keeps_eot(tok):
    row = tok(LONG, 77)[0]
    assert len(tok.encode(LONG)) > 77
    assert row[0] == tok.sot_token_id and row[-1] == tok.eot_token_id
    assert (row[1:-1] != tok.eot_token_id).all() and (row != 0).all()
    np.testing.assert_array_equal(row[1:-1], tok.encode(LONG)[:75])
    np.testing.assert_array_equal(tok("anything", 2)[0], [tok.sot_token_id, tok.eot_token_id])
    with pytest.raises(ValueError, match="context_length"):
        tok("a", 1)


def test_zero_padding_and_default_context(tok):
    out = tok("a photo of a cat")
    assert out.shape == (1, 77) and out.dtype == np.int32
    n = len(tok.encode("a photo of a cat")) + 2
    assert out[0, n - 1] == tok.eot_token_id and (out[0, n:] == 0).all()
    # argmax pools the EOT position, as the text tower expects.
    assert out[0].argmax() == n - 1
    empty = tok("")[0]
    assert list(empty[:2]) == [tok.sot_token_id, tok.eot_token_id] and (empty[2:] == 0).all()


def test_decode_ignores_sot_eot_and_padding(tok):
    row = tok("A Photo of a CAT &amp; a dog")[0]
    assert tok.decode(row) == "a photo of a cat & a dog"
    assert tok.decode(row.tolist()) == tok.decode(row)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])


def test_special_tokens_recognised_where_open_clip_does(tok):
    assert tok.encode("a <end_of_text> b") == tok.encode("a") + [tok.eot_token_id] + tok.encode("b")
    assert tok.eot_token_id not in tok.encode("x<<end_of_text>")


# -------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tok, trained, tmp_path):
    for name, t in (("openai", tok), ("trained", trained)):
        t.save(tmp_path / name)
        back = Tokenizer.load(tmp_path / name)
        np.testing.assert_array_equal(back(CORPUS), t(CORPUS))
        assert (back.sot_token_id, back.eot_token_id, back.vocab_size) == (
            t.sot_token_id,
            t.eot_token_id,
            t.vocab_size,
        )
        assert load_tokenizer(tmp_path / name).kind == name
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert config["kind"] == name and config["eot_token_id"] == t.vocab_size - 1


def test_pickle_round_trip(trained):
    back = pickle.loads(pickle.dumps(trained))
    np.testing.assert_array_equal(back(CORPUS), trained(CORPUS))


def test_load_errors_name_the_path(trained, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(empty)

    broken = tmp_path / "broken"
    trained.save(broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.*tokenizer\.json"):
        Tokenizer.load(broken)
    trained.save(broken)
    (broken / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"broken.*tokenizer_config\.json"):
        load_tokenizer(broken)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken.*tokenizer_config\.json"):
        Tokenizer.load(broken)


def test_load_rejects_moved_special_ids(trained, tmp_path):
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eot_token_id"] = 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eot_token_id=7"):
        Tokenizer.load(tmp_path)


def test_missing_openai_vocab_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(vocab, "_find_openai_source", lambda: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch.*huggingface-cli download"):
        openai_tokenizer()
    with pytest.raises(FileNotFoundError, match="no_vocab_here"):
        openai_tokenizer(tmp_path / "no_vocab_here")


def test_without_ftfy_plain_text_is_unchanged(tok, monkeypatch):
    expected = tok(CORPUS[:2])
    monkeypatch.setattr(tokmod, "ftfy", None)
    monkeypatch.setattr(tokmod, "_warned_no_ftfy", False)
    with pytest.warns(UserWarning, match="ftfy is not installed"):
        np.testing.assert_array_equal(tok(CORPUS[:2]), expected)


# ------------------------------------------------------------------------------------------ training


def test_trained_layout(trained):
    assert trained.vocab_size == 600
    assert trained.eot_token_id == 599 and trained.sot_token_id == 598
    assert trained.id_to_token(0) == "!"  # padding id is an ordinary token, never SOT/EOT
    ids = trained(CORPUS)
    assert ids.max() < 600 and ids.min() >= 0
    # EOT is the largest id in every row, so argmax pooling finds it.
    assert (ids.max(axis=1) == trained.eot_token_id).all()


def test_trained_vocab_size_is_exact():
    for size in (514, 515, 600):
        assert train_tokenizer(CAPTIONS, size).vocab_size == size
    # The captions support ~100 merges: the rest is padded with unreachable tokens, with a warning.
    with pytest.warns(UserWarning, match="padding the vocab"):
        padded = train_tokenizer(CAPTIONS, 5000)
    assert padded.vocab_size == 5000 and padded.eot_token_id == 4999
    with pytest.raises(ValueError, match="514"):
        train_tokenizer(CAPTIONS, 513)


def test_training_is_deterministic(trained):
    # BpeTrainer breaks count ties by symbol id; the fixed "</w>" ids make repeated runs agree.
    for _ in range(5):
        again = train_tokenizer(CAPTIONS, 600)
        assert again._hf.to_str() == trained._hf.to_str()


def test_trained_round_trip(trained):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for caption in sorted(set(CAPTIONS)):
            ids = trained.encode(caption)
            assert trained.decode(ids) == caption
            assert len(ids) < len(caption)  # it learned merges, not just bytes
        # Unseen characters fall back to byte symbols and still decode exactly (words split at punctuation).
        text = "Caf\u00e9 \U0001f916 \u732b, 42"
        assert trained.decode(trained.encode(text)) == "caf\u00e9 \U0001f916 \u732b , 4 2"
