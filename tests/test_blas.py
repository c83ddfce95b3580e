"""Linux: importing mlx_clip gives MLX an optimized BLAS (the wheel bundles a reference one)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only BLAS fix")

BENCH = textwrap.dedent(
    """
    import json, time
    import mlx_clip
    import mlx.core as mx
    n = 1024
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range({reps}):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({{"gflops": 2 * n**3 / best / 1e9, "status": mlx_clip._blas.status}}))
    """
)


def run(code: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out


def test_matmul_at_least_5x_the_reference_blas():
    """OpenBLAS measures ~40x the wheel's reference BLAS on a quiet machine; 5x still fails if it
    is not the BLAS in use (1x) and holds when another process takes half the CPU (20x seen in CI)."""
    fast = json.loads(run(BENCH.format(reps=10)).stdout)
    ref = json.loads(run(BENCH.format(reps=2), MLX_CLIP_BLAS="none").stdout)
    assert fast["status"]["reason"] == "loaded", fast["status"]
    assert ref["status"]["reason"] == "disabled by MLX_CLIP_BLAS"
    ratio = fast["gflops"] / ref["gflops"]
    print(f"MLX matmul: {fast['gflops']:.1f} GFLOP/s; reference BLAS {ref['gflops']:.1f} ({ratio:.0f}x)")
    assert ratio >= 5, (fast, ref)


def test_importing_mlx_first_warns_with_the_fix():
    out = run("import mlx.core, warnings; warnings.simplefilter('always'); import mlx_clip")
    assert "import mlx_clip first" in out.stderr


def test_missing_blas_warns_once_with_the_fix():
    out = run("import mlx_clip", MLX_CLIP_BLAS="/nonexistent/libopenblas.so")
    assert "could not load /nonexistent/libopenblas.so" in out.stderr
    assert "apt-get install libopenblas0-pthread" in out.stderr
    assert out.stderr.count("mlx_clip:") == 1
