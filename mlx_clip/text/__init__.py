"""Text, framework-free.

tokenizer.py     the CLIP byte-level BPE Tokenizer: cleaning, encoding, decoding, save / load
hf_tokenizer.py  HFTokenizer: a checkpoint's own tokenizer.json or SentencePiece model, with its
                 cleaning, padding, BOS/EOS and truncation; read from a Hugging Face directory
clean.py         text cleanings by name (clip, canonicalize, siglip, whitespace, lower, ...)
vocab.py         where a tokenizer comes from: OpenAI's vocabulary (offline), a BPE trained on captions,
                 a saved directory of either kind (load_tokenizer, load_saved) or a Hugging Face one
"""
