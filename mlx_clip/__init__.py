"""mlx_clip: train CLIP natively in MLX.

Importing this package first gives MLX an optimized BLAS on Linux (see _blas.py);
the heavy modules load lazily, on first use of a public name.
"""

from ._blas import ensure_fast_blas

ensure_fast_blas()

__version__ = "0.1.0"

_LAZY = {
    "create_model": ".models.model",
    "CLIP": ".models.model",
    "save_weights": ".models.weights",
    "load_weights": ".models.weights",
    "clip_loss": ".training.loss",
    "model_config": ".models.config",
    "ModelConfig": ".models.config",
    "ConfigError": ".schema",
    "load": ".inference",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mlx_clip' has no attribute {name!r}")
