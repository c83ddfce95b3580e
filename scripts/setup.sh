#!/usr/bin/env bash
# Idempotent set-up used by `make train` and `make test`:
#   scripts/setup.sh [base|dev]
# Creates .venv, gives MLX a fast BLAS on Linux where it can, installs the package.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND="${1:-base}"
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.installed-$KIND"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    exit 0
fi

"$PY" - <<'PYEOF'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"mlx_clip needs Python >= 3.11, found {sys.version.split()[0]}; set PYTHON=python3.11")
PYEOF

# The Linux mlx[cpu] wheel ships a reference BLAS (~30x slower GEMM); OpenBLAS
# from the system fixes that (mlx_clip loads it at import, see mlx_clip/_blas.py).
if [ "$(uname -s)" = "Linux" ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 /usr/lib*/libopenblas*.so.0 >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" = "none" ]; then
        echo "WARNING: OpenBLAS is not installed and this user cannot install it." >&2
        echo "         MLX matmuls will be ~30x slower. Fix: sudo apt-get install libopenblas0-pthread" >&2
    elif command -v apt-get >/dev/null; then
        echo ">> installing OpenBLAS (libopenblas0-pthread)"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libopenblas0-pthread >/dev/null \
            || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libopenblas0-pthread >/dev/null; } \
            || echo "WARNING: could not install libopenblas0-pthread; MLX matmuls will be slow" >&2
    elif command -v dnf >/dev/null; then
        $SUDO dnf install -y -q openblas || echo "WARNING: could not install openblas; MLX matmuls will be slow" >&2
    else
        echo "WARNING: no apt-get/dnf; install OpenBLAS yourself or set MLX_CLIP_BLAS=/path/libopenblas.so" >&2
    fi
fi

# The web app's browser tests (tests/test_ui_app.py) need Chromium and its driver from the system's
# packages (/usr/bin/chromium, /usr/bin/chromedriver); without them those tests skip, saying why.
if [ "$KIND" = "dev" ] && [ "$(uname -s)" = "Linux" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null; then
        echo ">> installing chromium and chromium-driver (the web app's browser tests)"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
            || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
            || echo "WARNING: could not install chromium chromium-driver; the browser tests will skip" >&2
    else
        echo "WARNING: chromium / chromedriver missing and not installable here; the browser tests will skip" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if [ "$KIND" = "dev" ]; then
    echo ">> installing mlx_clip with the dev extra (torch, transformers, open_clip, sentencepiece, pytest)"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    # CLIP_benchmark, the reference of the evaluation tests: its metrics need only torch, tqdm and
    # scikit-learn (in the dev extra); its full requirements add ~100 MB of captioning tools.
    "$VENV/bin/python" -m pip install -q --no-deps "clip-benchmark==1.6.2"
else
    echo ">> installing mlx_clip"
    "$VENV/bin/python" -m pip install -q -e .
fi
touch "$STAMP"
