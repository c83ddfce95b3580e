"""Text: the CLIP byte-level BPE tokenizer (OpenAI vocabulary or trained on captions), framework-free."""
