"""Text, framework-free.

tokenizer.py   the CLIP byte-level BPE Tokenizer: cleaning, encoding, decoding, save / load
vocab.py       where a Tokenizer comes from: OpenAI's vocabulary (offline), a BPE trained on captions,
               a saved directory or a Hugging Face CLIP directory
"""
