"""Evaluation: zero-shot classification and image-text retrieval metrics (numpy)."""
