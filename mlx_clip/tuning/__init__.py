"""Hyperparameter sweeps on Optuna (`python -m mlx_clip.sweep`), framework-free: the trials are
training processes. space.py (space.yaml: the search space), trial.py (one trial's process,
watched through its metrics.jsonl), study.py (the study in its database: ask, run, tell, resume),
report.py (table, best.yaml, plots)."""
