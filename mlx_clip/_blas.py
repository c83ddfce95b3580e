"""Give MLX an optimized BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the Netlib reference BLAS, whose fp32 GEMM is
far slower than OpenBLAS on the same cores (measured:
benchmarks/RESULTS.md#numbers-quoted-in-the-code). Loading an
OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is first imported makes the dynamic
linker resolve MLX's `cblas_*` calls to it. On macOS MLX uses Accelerate/Metal
and nothing happens here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings

# Debian/Ubuntu (multiarch), Fedora/RHEL and generic prefixes, pthread build first.
_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]

FIX_HINT = (
    "install OpenBLAS (Debian/Ubuntu: `sudo apt-get install libopenblas0-pthread`, "
    "Fedora: `sudo dnf install openblas`) or point MLX_CLIP_BLAS at a libopenblas.so; "
    "set MLX_CLIP_BLAS=none to silence this"
)

# What happened, for the tests and the benchmarks.
status: dict = {"loaded": None, "reason": "not attempted"}
_lib = None


def find_openblas() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library("openblas")
    return name


def ensure_fast_blas() -> dict:
    """Load OpenBLAS globally if we are on Linux and MLX is not imported yet."""
    if status["reason"] != "not attempted":
        return status
    if not sys.platform.startswith("linux"):
        status.update(reason="not linux: MLX uses its platform BLAS")
        return status
    override = os.environ.get("MLX_CLIP_BLAS", "").strip()
    if override.lower() in ("none", "0", "off"):
        status.update(reason="disabled by MLX_CLIP_BLAS")
        return status
    if "mlx.core" in sys.modules:
        # The reference BLAS is already bound; a late load would not be used.
        status.update(reason="mlx.core was imported before mlx_clip")
        warnings.warn(
            "mlx_clip: mlx.core was imported before mlx_clip, so MLX keeps its slow "
            "reference BLAS; import mlx_clip first (or `import mlx_clip` before `import mlx`)",
            RuntimeWarning,
            stacklevel=3,
        )
        return status
    path = override or find_openblas()
    if not path:
        status.update(reason="no OpenBLAS found")
        warnings.warn(
            f"mlx_clip: MLX on Linux uses a reference BLAS (~30x slower matmuls); {FIX_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
        return status
    global _lib
    try:
        _lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        status.update(reason=f"could not load {path}: {e}")
        warnings.warn(f"mlx_clip: could not load {path} ({e}); {FIX_HINT}", RuntimeWarning, stacklevel=3)
        return status
    status.update(loaded=path, reason="loaded")
    return status


def get_threads() -> int | None:
    """OpenBLAS's thread count now; None when no OpenBLAS was loaded."""
    if _lib is None or not hasattr(_lib, "openblas_get_num_threads"):
        return None
    return int(_lib.openblas_get_num_threads())


@contextlib.contextmanager
def threads(n: int):
    """OpenBLAS at `n` threads inside the block, its previous count restored after (a no-op without
    OpenBLAS). Process-wide: for code that owns the process's MLX work while it runs."""
    before = get_threads()
    if before is None or before == n:
        yield
        return
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def set_threads(n: int) -> bool:
    """Set OpenBLAS's thread count at run time; False when no OpenBLAS was loaded.

    Measured here (OpenBLAS 0.3.21, 2 cores): with 2 threads, identical training runs drift
    apart in the last float32 bits within 20 steps; with 1 thread they are bit-identical. The
    trainer uses 1 thread when train.deterministic is set (the default), which is what makes
    "train N" == "train N/2 + resume + N/2" hold for any model size.
    """
    if _lib is None or not hasattr(_lib, "openblas_set_num_threads"):
        return False
    _lib.openblas_set_num_threads(int(n))
    return True
