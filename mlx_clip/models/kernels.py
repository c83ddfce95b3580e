"""Backend-specific kernels behind one switch, so the model code reads as plain MLX.

The model takes these from here:

- `activation(name)`: "gelu" (exact erf form, as torch.nn.GELU() and HF "gelu"), "gelu_tanh"
  (its tanh approximation, as torch GELU(approximate="tanh") and HF "gelu_pytorch_tanh": SigLIP's)
  or "quick_gelu" (OpenAI CLIP's x * sigmoid(1.702 x)).
- `checkpoint_block(block, x, causal)`: a transformer block with gradient checkpointing.
- `quantized_matmul(x, layer)`: x @ W.T for a quantized linear layer (models/quantize.py).
- `attention(q, k, v, scale, causal)`: scaled dot-product attention (its softmax is a kernel too).
- `layer_norm(x, weight, bias, eps)`: LayerNorm, with a hand-written backward on the CPU.

The switch, `use_fast_kernels()`, picks between MLX's native `mx.erf` / `mx.sigmoid` / softmax and
versions built from multiply/add/divide only. On MLX's CPU backend the native transcendentals
cost far more per element than a fused multiply-add chain (measured:
benchmarks/RESULTS.md#numbers-quoted-in-the-code), so a native GELU costs more than the matmuls
around it; the arithmetic versions are accurate to a few float32 ulps and compile into one fused
elementwise kernel. GPUs (Metal, CUDA) keep the native ops. The environment variable
MLX_CLIP_KERNELS overrides the choice; it is read whenever an activation is traced:

    auto    (default) arithmetic kernels on the CPU device, native ops elsewhere
    native  always MLX's native ops: turns the CPU kernels off
    fast    always the arithmetic kernels, whatever the device

Either way the activations' values agree to ~2e-6 (tests/test_kernels.py).

Streams: the arithmetic activations, softmax and `checkpoint_block` have hand-written VJPs; MLX runs
a custom VJP's Python on the default stream of the moment the backward graph is built, not on
the forward's stream. `on_this_stream` pins them to the forward's stream, which the training
step's batch shards (mlx_clip/models/streams.py) rely on.

Coefficients: least-squares fits in float64 (numpy), reweighted to minimise relative error;
tests/test_kernels.py checks their accuracy against the native ops over the whole range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import Activation

ENV = "MLX_CLIP_KERNELS"
CHOICES = ("auto", "native", "fast")

# erf(x) = x * P(x^2) / Q(x^2) on |x| <= ERF_CLAMP; erf(ERF_CLAMP) rounds to 1 in float32.
ERF_CLAMP = 3.925
_ERF_P = (
    1.1283791626766757,
    0.183789515267457,
    0.05198260828416279,
    0.003512702026807894,
    0.0002845849227805508,
    2.1712225768966142e-06,
)
_ERF_Q = (
    1.0,
    0.4962123987172211,
    0.11147344436851055,
    0.014457014653201806,
    0.0011113326132618628,
    3.9331852487653474e-05,
)
# 2^f on f in [-0.5, 0.5]: max relative error 7.5e-8 in float64 (a minimax fit).
_EXP2_C = (
    1.0000000716554323,
    0.6931469670620417,
    0.2402211972007436,
    0.055507132760935274,
    0.00967554154009705,
    0.001327647173738325,
)
_LOG2E = 1.4426950408889634
# Adding 1.5 * 2^23 to a float32 of magnitude < 2^22 leaves no bits below the units: (y + R) - R
# is y rounded to the nearest integer, in two additions (mx.floor / mx.round are library calls
# on MLX's CPU backend, many times the cost of an addition).
_ROUND = 12582912.0


def _poly(t: mx.array, coeffs: tuple[float, ...]) -> mx.array:
    """sum(c_i t^i) in Estrin's form: pairs (c0 + c1 t), (c2 + c3 t), ... combined with t^2, t^4, ...

    Half the dependency depth of Horner's rule, which keeps a polynomial inside one fused
    kernel (MLX stops fusing past a graph depth of 11; a long Horner chain splits the kernel).
    """
    terms = [c + d * t for c, d in zip(coeffs[::2], coeffs[1::2], strict=False)]
    if len(coeffs) % 2:
        terms.append(coeffs[-1])
    while len(terms) > 1:
        t = t * t
        pairs = [a + b * t for a, b in zip(terms[::2], terms[1::2], strict=False)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def erf(x: mx.array) -> mx.array:
    """Rational erf; max abs error ~3.5e-7. Its derivative (through autodiff) is rational too."""
    x = mx.clip(x, -ERF_CLAMP, ERF_CLAMP)
    t = x * x
    return x * _poly(t, _ERF_P) / _poly(t, _ERF_Q)


def _exp(x: mx.array) -> mx.array:
    # exp(x) = 2^y = 2^k * 2^f, k = round(y), f = y - k in [-0.5, 0.5]. y is clipped to [-127, 127]:
    # k = -127 writes a zero exponent field, so exp underflows to exactly 0 for y < -126.5 (not to
    # subnormals, which are many times slower in every later product: a causal mask's -inf in
    # softmax) and overflows to at most 2^127.5, finite. In float32 whatever x's dtype: the
    # rounding needs its 23 mantissa bits.
    y = mx.clip(x.astype(mx.float32) * _LOG2E, -127.0, 127.0)
    k = (y + _ROUND) - _ROUND
    # 2^k built directly in the exponent field of a float32.
    two_k = mx.left_shift(k.astype(mx.int32) + 127, 23).view(mx.float32)
    return (_poly(y - k, _EXP2_C) * two_k).astype(x.dtype)


def _exp_vjp(primals, cotangent, output):
    return cotangent * output


def on_this_stream(fun, vjp):
    """mx.custom_function(fun) with the hand-written `vjp`, built on the current default stream.

    MLX runs a custom VJP's Python when the backward graph is built, on whatever stream is the
    default then, not on the stream the forward ran on. The training step runs shards of the
    batch on their own CPU streams (mlx_clip/models/streams.py), so the VJP is pinned to the
    stream of the forward here; otherwise every shard's backward would queue on one stream.
    """
    stream = mx.default_stream(mx.default_device())
    f = mx.custom_function(fun)

    @f.vjp
    def _vjp(primals, cotangent, output):
        with mx.stream(stream):
            return vjp(primals, cotangent, output)

    return f


def exp(x: mx.array) -> mx.array:
    """exp via 2^k * 2^f: k from the float exponent bits, 2^f from a polynomial."""
    return on_this_stream(_exp, _exp_vjp)(x)


def sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


def _sigmoid(x: mx.array) -> mx.array:  # inside a custom_function: no autodiff of its own
    return 1.0 / (1.0 + _exp(-x))


def _softmax(x: mx.array) -> mx.array:
    e = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis with the arithmetic exp (a -inf input gets weight 0)."""
    return on_this_stream(_softmax, _softmax_vjp)(x)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
    """softmax(q k^T scale) v over (B, h, L, hd) queries and (B, h, S, hd) keys and values, with the
    upper triangle masked when `causal` (L == S). MLX's CPU backend runs
    mx.fast.scaled_dot_product_attention as these same products with its native softmax, whose exp
    costs more than the products at CLIP's sizes; the fast kernels use `softmax` instead (float32 only)."""
    if not use_fast_kernels() or q.dtype != mx.float32:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # (B, h, L, S)
    if causal:
        L = scores.shape[-1]
        above = mx.arange(L)[:, None] < mx.arange(L)[None]  # (L, L): a query's later keys
        scores = scores + mx.where(above, -mx.inf, 0.0)
    return softmax(scores) @ v  # (B, h, L, hd)


def _normalized(x: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(x - mean) / std over the last axis, and 1 / std; the variance in two passes."""
    centred = x - mx.mean(x, axis=-1, keepdims=True)
    rstd = mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * rstd, rstd


def _layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    return _normalized(x, eps)[0] * weight + bias


def _layer_norm_vjp(primals, cotangent, output, eps: float):
    x, weight, _ = primals
    normed, rstd = _normalized(x, eps)  # recomputed: two row reductions, no stored activations
    g = cotangent * weight
    mean_g, mean_gn = mx.mean(g, axis=-1, keepdims=True), mx.mean(g * normed, axis=-1, keepdims=True)
    dx = rstd * (g - mean_g - normed * mean_gn)
    rows = (-1, x.shape[-1])
    return dx, (cotangent * normed).reshape(rows).sum(axis=0), cotangent.reshape(rows).sum(axis=0)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """LayerNorm over the last axis with an affine weight and bias: mx.fast.layer_norm, or with the
    fast kernels (float32) the same function with a hand-written VJP. On the CPU backend
    mx.fast.layer_norm lowers to composed operations whose autodiff backward is slower (measured:
    benchmarks/RESULTS.md#numbers-quoted-in-the-code)."""
    if not use_fast_kernels() or x.dtype != mx.float32:
        return mx.fast.layer_norm(x, weight, bias, eps)
    fun = on_this_stream(
        lambda x, w, b: _layer_norm(x, w, b, eps),
        lambda primals, cotangent, output: _layer_norm_vjp(primals, cotangent, output, eps),
    )
    return fun(x, weight, bias)


def use_fast_kernels() -> bool:
    """The switch: True for the arithmetic kernels, False for MLX's native ops (see the module
    docstring). `auto` is True on MLX's CPU backend, where the arithmetic versions are faster."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    if choice == "auto":
        return mx.default_device() == mx.cpu
    return choice == "fast"


# The activations get hand-written VJPs: differentiating the rational/polynomial forms
# through autodiff yields a graph that compiles into many kernels, several times slower
# (measured: benchmarks/RESULTS.md#numbers-quoted-in-the-code).
_INV_SQRT2 = 1 / math.sqrt(2.0)
_INV_SQRT_2PI = 1 / math.sqrt(2.0 * math.pi)


def _fast_gelu(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + erf(x * _INV_SQRT2))


def _fast_gelu_vjp(primals, cotangent, output):
    x = primals  # a single array for a one-input custom_function
    # d/dx x*Phi(x) = Phi(x) + x*phi(x)
    cdf = 0.5 * (1 + erf(x * _INV_SQRT2))
    pdf = _INV_SQRT_2PI * _exp(-0.5 * x * x)
    return cotangent * (cdf + x * pdf)


def _fast_quick_gelu(x: mx.array) -> mx.array:
    return x * _sigmoid(1.702 * x)


def _fast_quick_gelu_vjp(primals, cotangent, output):
    x = primals  # a single array for a one-input custom_function
    s = _sigmoid(1.702 * x)
    return cotangent * (s + 1.702 * x * s * (1 - s))


# gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


def _fast_gelu_tanh(x: mx.array) -> mx.array:
    return x * _sigmoid(2 * _TANH_C * (x + _TANH_A * x * x * x))


def _fast_gelu_tanh_vjp(primals, cotangent, output):
    x = primals  # a single array for a one-input custom_function
    e = _exp(-2 * _TANH_C * (x + _TANH_A * x * x * x))
    s = 1.0 / (1.0 + e)
    dz = 2 * _TANH_C * (1 + 3 * _TANH_A * x * x)
    return cotangent * (s + x * (s * s * e) * dz)  # s (1 - s) = s^2 e, without 1 - s's cancellation


def fast_gelu(x: mx.array) -> mx.array:
    return on_this_stream(_fast_gelu, _fast_gelu_vjp)(x)


def fast_quick_gelu(x: mx.array) -> mx.array:
    return on_this_stream(_fast_quick_gelu, _fast_quick_gelu_vjp)(x)


def fast_gelu_tanh(x: mx.array) -> mx.array:
    return on_this_stream(_fast_gelu_tanh, _fast_gelu_tanh_vjp)(x)


def gelu(x: mx.array) -> mx.array:
    """Exact-form GELU, x * Phi(x), as torch.nn.GELU() and HF "gelu"."""
    if use_fast_kernels():
        return fast_gelu(x)
    return 0.5 * x * (1 + mx.erf(x * _INV_SQRT2))


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU's tanh approximation, as torch GELU(approximate="tanh") and HF "gelu_pytorch_tanh"
    (not mlx.nn.gelu_approx, a sigmoid refit that differs by ~1e-4)."""
    if use_fast_kernels():
        return fast_gelu_tanh(x)
    return 0.5 * x * (1 + mx.tanh(_TANH_C * (x + _TANH_A * x * x * x)))


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    if use_fast_kernels():
        return fast_quick_gelu(x)
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS: dict[Activation, Callable[[mx.array], mx.array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
}


def activation(name: Activation) -> Callable[[mx.array], mx.array]:
    """The activation function called `name` (a key of ACTIVATIONS); each one checks the switch
    when it runs, so a model built on one device computes correctly on another."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def checkpoint_block(block: nn.Module, x: mx.array, causal: bool) -> mx.array:
    """block(x, causal=causal) whose activations are recomputed in the backward pass instead of kept.

    Only the block's input is stored; the block's trainable parameters are inputs of the custom
    function, so their gradients flow. Unlike a bare mx.checkpoint, the recomputation depends
    (mx.depends) on the cotangent arriving from the block above, so the evaluator cannot run every
    block's recomputation as soon as the backward starts, which would keep them all alive at once
    and save nothing (measured: benchmarks/RESULTS.md#memory). The backward is built on the stream
    the forward ran on (`on_this_stream`); streams.py keeps MLX's default evaluation width for runs
    that checkpoint, as a wide one undoes the saving.
    """
    flat = tree_flatten(block.trainable_parameters())  # empty for a locked (frozen) block
    keys, values = [k for k, _ in flat], [v for _, v in flat]

    def run(x, *values):
        block.update(tree_unflatten(list(zip(keys, values, strict=True))))
        return block(x, causal=causal)

    def backward(primals, cotangent, output):
        x, *values = primals
        (x,) = mx.depends([x], [cotangent])  # recompute only once the cotangent exists
        _, grads = mx.vjp(lambda *args: [run(*args)], [x, *values], [cotangent])
        return tuple(grads)

    return on_this_stream(run, backward)(x, *values)


def quantized_matmul(
    x: mx.array, layer: nn.QuantizedLinear, start: int = 0, stop: int | None = None
) -> mx.array:
    """x @ W[start:stop].T for a QuantizedLinear's packed weight (rows slice alike in the weight,
    scales and offsets), without its bias.

    MLX's CPU quantized matmul is a plain loop, some 40x slower than the BLAS matmul here
    (benchmarks/RESULTS.md#quantized-inference), so the fast kernels dequantize the weight and
    multiply in float32: the quantized weights stay what is kept in memory, and each layer's float
    copy is a temporary of its own matmul."""
    rows = slice(start, stop)
    q = dict(group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    w, scales, biases = layer.weight[rows], layer.scales[rows], layer.get("biases")
    biases = None if biases is None else biases[rows]
    if use_fast_kernels():
        return x @ mx.dequantize(w, scales, biases, **q).T
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, **q)
