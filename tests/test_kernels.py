"""The arithmetic erf/exp/GELU kernels used on MLX's CPU backend match the native ops, and the
switch (MLX_CLIP_KERNELS) picks them or the native ops."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip.models import kernels as fm


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
        (
            fm.fast_gelu_tanh,
            lambda a: 0.5 * a * (1 + mx.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))),
        ),
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


def test_fast_path_only_on_cpu(monkeypatch):
    monkeypatch.delenv(fm.ENV, raising=False)
    assert fm.use_fast_kernels() == (mx.default_device() == mx.cpu)
    monkeypatch.setenv(fm.ENV, "auto")
    assert fm.use_fast_kernels() == (mx.default_device() == mx.cpu)


@pytest.mark.parametrize("choice,fast", [("native", False), ("fast", True), (" Native ", False)])
def test_environment_overrides_the_switch(monkeypatch, choice, fast):
    monkeypatch.setenv(fm.ENV, choice)
    assert fm.use_fast_kernels() is fast


def test_environment_picks_the_kernel_the_activation_runs(monkeypatch):
    """Under `native` the activations are exactly MLX's native formulas; under `fast` they are
    the arithmetic kernels (which differ from the native ops in the last float bits)."""
    x = mx.array(np.linspace(-6, 6, 10001, dtype=np.float32))
    native = {
        "gelu": lambda a: 0.5 * a * (1 + mx.erf(a * (1 / math.sqrt(2.0)))),
        "quick_gelu": lambda a: a * mx.sigmoid(1.702 * a),
        "gelu_tanh": lambda a: 0.5 * a * (1 + mx.tanh(fm._TANH_C * (a + fm._TANH_A * a * a * a))),
    }
    fast = {"gelu": fm.fast_gelu, "quick_gelu": fm.fast_quick_gelu, "gelu_tanh": fm.fast_gelu_tanh}
    for name in native:
        act = fm.activation(name)
        monkeypatch.setenv(fm.ENV, "native")
        assert mx.array_equal(act(x), native[name](x)).item()
        monkeypatch.setenv(fm.ENV, "fast")
        assert mx.array_equal(act(x), fast[name](x)).item()
        assert not mx.array_equal(act(x), native[name](x)).item()


def test_bad_environment_value_and_unknown_activation_are_errors(monkeypatch):
    monkeypatch.setenv(fm.ENV, "fastest")
    with pytest.raises(ValueError, match="MLX_CLIP_KERNELS='fastest'.*auto, native, fast"):
        fm.use_fast_kernels()
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        fm.activation("relu")


def test_gelu_tanh_is_torchs_tanh_approximation():
    """gelu_tanh, both kernels, equals torch GELU(approximate="tanh") (HF gelu_pytorch_tanh),
    values and gradients, computed in float64."""
    torch = pytest.importorskip("torch")
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(t, approximate="tanh").sum().backward()
    want = torch.nn.functional.gelu(t.detach(), approximate="tanh").numpy()
    for env in ("native", "fast"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(fm.ENV, env)
            value, grad = mx.value_and_grad(lambda a: fm.gelu_tanh(a).sum())(mx.array(x))
            assert np.abs(np.array(fm.gelu_tanh(mx.array(x))) - want).max() < 2e-6
            assert np.abs(np.array(grad) - t.grad.numpy()).max() < 2e-6


def test_exp_underflows_to_zero():
    """exp underflows to exactly 0 (a zero exponent field) below x = -127.5 ln 2, not to the
    subnormal float32s that are many times slower in every product they reach (a causal mask's
    -inf went through softmax); only x in [-126.5 ln 2, -126 ln 2) gives a subnormal."""
    x = np.linspace(-1000, -80, 200001, dtype=np.float32)
    y = np.array(fm.exp(mx.array(x)))
    assert (y[x < -126.5 * math.log(2)] == 0).all() and (
        y[x >= -126 * math.log(2)] >= np.finfo(np.float32).tiny
    ).all()
    assert float(fm.exp(mx.array(-mx.inf))) == 0.0 and float(fm.softmax(mx.array([0.0, -mx.inf]))[1]) == 0.0


def test_exp_in_bfloat16_rounds_the_float32_result():
    x = mx.array(np.linspace(-80, 80, 2001, dtype=np.float32))
    got = fm.exp(x.astype(mx.bfloat16))
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, fm.exp(x.astype(mx.bfloat16).astype(mx.float32)).astype(mx.bfloat16)).item()


def test_softmax_values_and_gradients():
    x = mx.random.normal((4, 7, 33), key=mx.random.key(0)) * 20
    cot = mx.random.normal(x.shape, key=mx.random.key(1))
    assert float(mx.abs(fm.softmax(x) - mx.softmax(x, axis=-1)).max()) < 1e-6
    _, (g_fast,) = mx.vjp(lambda a: [fm.softmax(a)], [x], [cot])
    _, (g_ref,) = mx.vjp(lambda a: [mx.softmax(a, axis=-1)], [x], [cot])
    assert float(mx.abs(g_fast - g_ref).max()) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_mlx_sdpa(monkeypatch, causal):
    """The fast attention (arithmetic softmax) against mx.fast.scaled_dot_product_attention, values
    and the gradients of q, k and v; under `native` it is that op itself."""
    q, k, v = (mx.random.normal((2, 3, 9, 8), key=mx.random.key(i)) for i in range(3))
    scale = 8**-0.5

    def loss(kind):
        monkeypatch.setenv(fm.ENV, kind)
        fn = lambda q, k, v: (fm.attention(q, k, v, scale, causal) ** 2).sum()  # noqa: E731
        return mx.value_and_grad(fn, argnums=(0, 1, 2))(q, k, v)

    mask = "causal" if causal else None
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    (v_native, g_native), (v_fast, g_fast) = loss("native"), loss("fast")
    monkeypatch.setenv(fm.ENV, "fast")
    assert float(mx.abs(fm.attention(q, k, v, scale, causal) - want).max()) < 1e-6
    assert abs(float(v_fast) - float(v_native)) < 1e-4
    for a, b in zip(g_fast, g_native, strict=True):
        assert float(mx.abs(a - b).max()) < 1e-5


def test_layer_norm_matches_mlx_with_gradients(monkeypatch):
    """The hand-written LayerNorm backward against autodiff of mx.fast.layer_norm: values and the
    gradients of x, weight and bias, for a batched (B, L, D) input with an offset and spread."""
    x = mx.random.normal((3, 5, 40), key=mx.random.key(0)) * 3 + 2
    w, b = (mx.random.normal((40,), key=mx.random.key(i)) for i in (1, 2))
    cot = mx.random.normal(x.shape, key=mx.random.key(3))

    def grads(kind):
        monkeypatch.setenv(fm.ENV, kind)
        return mx.vjp(lambda *a: [fm.layer_norm(*a, 1e-5)], [x, w, b], [cot])

    (v_native,), g_native = grads("native")
    (v_fast,), g_fast = grads("fast")
    assert float(mx.abs(v_native - mx.fast.layer_norm(x, w, b, 1e-5)).max()) == 0  # native is MLX's
    assert float(mx.abs(v_fast - v_native).max()) < 1e-5
    for a, ref in zip(g_fast, g_native, strict=True):
        assert float(mx.abs(a - ref).max()) < 1e-5 * max(1.0, float(mx.abs(ref).max()))
