"""Transcendentals built from multiply/add/divide, for MLX's CPU backend.

On the CPU backend `mx.erf`, `mx.exp` and `mx.sigmoid` run at ~30-60 ns per element while a
fused multiply-add chain runs at ~0.5 ns (measured in benchmarks/RESULTS.md), so a GELU costs
more than the matmuls around it. These versions are accurate to a few float32 ulps and
compile into one fused elementwise kernel. GPUs (Metal, CUDA) keep the native ops.

Coefficients: least-squares fits in float64 (numpy), reweighted to minimise relative error;
tests/test_fastmath.py checks their accuracy against the native ops over the whole range.
"""

from __future__ import annotations

import math

import mlx.core as mx

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
# 2^f on f in [0, 1): max relative error 4.4e-9 in float64.
_EXP2_C = (
    1.0000000044199466,
    0.6931469139660769,
    0.2402303082818542,
    0.055482150283791665,
    0.00967998525637806,
    0.0012437946368677733,
    0.00021683431304408973,
)
_LOG2E = 1.4426950408889634


def _horner(t: mx.array, coeffs: tuple[float, ...]) -> mx.array:
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return acc


def erf(x: mx.array) -> mx.array:
    """Rational erf; max abs error ~3.5e-7. Its derivative (through autodiff) is rational too."""
    x = mx.clip(x, -ERF_CLAMP, ERF_CLAMP)
    t = x * x
    return x * _horner(t, _ERF_P) / _horner(t, _ERF_Q)


def _exp(x: mx.array) -> mx.array:
    y = mx.clip(x, -87.0, 88.0) * _LOG2E
    k = mx.floor(y)
    f = y - k
    # 2^k built directly in the exponent field of a float32.
    two_k = mx.left_shift((k.astype(mx.int32) + 127), 23).view(mx.float32)
    return _horner(f, _EXP2_C).astype(x.dtype) * two_k.astype(x.dtype)


def _exp_vjp(primals, cotangent, output):
    return cotangent * output


def on_this_stream(fun, vjp):
    """mx.custom_function(fun) with the hand-written `vjp`, built on the current default stream.

    MLX runs a custom VJP's Python when the backward graph is built, on whatever stream is the
    default then, not on the stream the forward ran on. The training step runs shards of the
    batch on their own CPU streams (mlx_clip/training/streams.py), so the VJP is pinned to the stream of
    the forward here; otherwise every shard's activation backward would queue on one stream.
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


def use_fast_math() -> bool:
    """True where the arithmetic versions are faster: MLX's CPU backend."""
    return mx.default_device() == mx.cpu


# The activations get hand-written VJPs: differentiating the rational/polynomial forms
# through autodiff yields a graph that compiles into many kernels (~5x slower).
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


def fast_gelu(x: mx.array) -> mx.array:
    return on_this_stream(_fast_gelu, _fast_gelu_vjp)(x)


def fast_quick_gelu(x: mx.array) -> mx.array:
    return on_this_stream(_fast_quick_gelu, _fast_quick_gelu_vjp)(x)


def gelu(x: mx.array) -> mx.array:
    """Exact-form GELU, x * Phi(x), as torch.nn.GELU() and HF "gelu"."""
    if use_fast_math():
        return fast_gelu(x)
    return 0.5 * x * (1 + mx.erf(x * _INV_SQRT2))


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    if use_fast_math():
        return fast_quick_gelu(x)
    return x * mx.sigmoid(1.702 * x)
