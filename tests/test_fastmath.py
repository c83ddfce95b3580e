"""The arithmetic erf/exp/GELU kernels used on MLX's CPU backend match the native ops."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip.models import fastmath as fm


def test_erf_matches_native_everywhere():
    x = mx.array(np.linspace(-12, 12, 200001, dtype=np.float32))
    assert float(mx.abs(fm.erf(x) - mx.erf(x)).max()) < 6e-7


def test_exp_relative_error_over_float32_range():
    x = mx.array(np.linspace(-87, 88, 200001, dtype=np.float32))
    rel = mx.abs(fm.exp(x) - mx.exp(x)) / mx.exp(x)
    assert float(rel.max()) < 5e-7
    assert float(fm.exp(mx.array(-1000.0))) < 1e-37 and math.isfinite(float(fm.exp(mx.array(1000.0))))


@pytest.mark.parametrize(
    "fast,ref",
    [
        (fm.fast_gelu, lambda a: 0.5 * a * (1 + mx.erf(a / math.sqrt(2)))),
        (fm.fast_quick_gelu, lambda a: a * mx.sigmoid(1.702 * a)),
    ],
)
def test_activation_values_and_gradients(fast, ref):
    x = mx.array(np.linspace(-10, 10, 100001, dtype=np.float32))
    assert float(mx.abs(fast(x) - ref(x)).max()) < 2e-6
    g_fast = mx.grad(lambda a: fast(a).sum())(x)
    g_ref = mx.grad(lambda a: ref(a).sum())(x)
    assert float(mx.abs(g_fast - g_ref).max()) < 2e-6
    # and under mx.compile, as in the training step
    g_comp = mx.compile(mx.grad(lambda a: fast(a).sum()))(x)
    assert float(mx.abs(g_comp - g_ref).max()) < 2e-6


def test_fast_path_only_on_cpu():
    assert fm.use_fast_math() == (mx.default_device() == mx.cpu)
