"""Evaluation on numpy features (framework-free).

metrics.py         zero-shot top-k (prompt ensemble) and image<->text retrieval; the tie rule
classification.py  top-1/top-5/mean per-class recall as CLIP_benchmark, per-class recall, confusion PNG
linear_probe.py    logistic regression on frozen features (L-BFGS, L2 sweep on a held-out split)
"""
