"""Evaluation: zero-shot classification and image-text retrieval, on numpy features.

metrics.py         zero-shot accuracy and retrieval metrics (numpy)
templates.py       prompt templates and class-name lists; prompts/*.txt: OpenAI's, shipped as package data
datasets.py        zero-shot sets on disk: ImageFolder, CLIP_benchmark shards, labelled CSV/JSONL
retrieval_sets.py  retrieval sets on disk: Karpathy-split JSON, any caption source training reads
eval_images.py     a set's images as model input, through training's eval pipeline
"""
