import numpy as np
import pytest

# Imported before any test module imports mlx.core, so MLX binds the fast BLAS (mlx_clip/_blas.py).
import mlx_clip  # noqa: F401

ODD_ARCH = dict(
    embed_dim=40,
    image_size=48,
    patch_size=8,
    vision_width=96,
    vision_layers=3,
    vision_heads=3,
    context_length=13,
    vocab_size=301,
    text_width=72,
    text_layers=2,
    text_heads=3,
    mlp_ratio=4.0,
    activation="gelu",
    layer_norm_eps=1e-5,
)


def random_tokens(rng: np.random.Generator, batch: int, context_length: int, vocab_size: int) -> np.ndarray:
    """CLIP-like token rows: SOT-ish start, random body, EOT (= max id) then zero padding."""
    tokens = np.zeros((batch, context_length), dtype=np.int32)
    for i in range(batch):
        n = int(rng.integers(1, context_length - 1))
        tokens[i, 0] = vocab_size - 2
        tokens[i, 1 : n + 1] = rng.integers(1, vocab_size - 2, size=n)
        tokens[i, n + 1] = vocab_size - 1
    return tokens


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def check_schema(obj, spec, where):
    """Assert that a benchmark record has every key of `spec` with the given type (nested dicts
    are sub-schemas); `where` names the record in the message."""
    for key, tp in spec.items():
        assert key in obj, f"{where}.{key} missing"
        if isinstance(tp, dict):
            check_schema(obj[key], tp, f"{where}.{key}")
        else:
            assert isinstance(obj[key], tp), (
                f"{where}.{key}: {type(obj[key]).__name__}, expected {tp.__name__}"
            )
