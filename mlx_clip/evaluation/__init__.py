"""Evaluation: zero-shot classification, image<->text retrieval and linear probes.

metrics.py         zero-shot top-k (prompt ensemble) and image<->text retrieval; the tie rule (numpy)
classification.py  top-1/top-5/mean per-class recall as CLIP_benchmark, per-class recall, confusion PNG
linear_probe.py    logistic regression on frozen features (L-BFGS, L2 sweep on a held-out split)
templates.py       prompt templates and class-name lists; prompts/*.txt: OpenAI's, shipped as package data
datasets.py        zero-shot sets on disk: ImageFolder, CLIP_benchmark shards, labelled CSV/JSONL
retrieval_sets.py  retrieval sets on disk: Karpathy-split JSON, any caption source training reads
eval_images.py     a set's images as model input, through training's eval pipeline
spec.py            what a set is (EvalSetSpec) and the metric names it reports; framework-free
suite.py           named sets (eval.sets, the eval CLI): read once, evaluated on any encoder
"""
