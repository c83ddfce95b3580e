"""Weight exchange: the ONLY place weight layouts and key names change.

layouts.py     key maps and the conv layout: canonical <-> torch, Hugging Face, open_clip (framework-free)
files.py       reading torch / safetensors state dicts, writing checkpoint directories atomically
hf.py          Hugging Face transformers CLIPModel import and export
open_clip.py   open_clip import and export
preprocess.py  a checkpoint's image preprocessing <-> HF preprocessor_config.json, open_clip preprocess_cfg
"""
