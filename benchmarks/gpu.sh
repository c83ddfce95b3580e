#!/usr/bin/env bash
# The training-throughput benchmark on an NVIDIA GPU, in one command (issue 18):
#
#   bash benchmarks/gpu.sh [--smoke] [--dry-run] [--out DIR] [--python PY]
#
# 1. makes a throwaway venv (uv if found, else python -m venv + pip) with MLX's CUDA build, torch
#    (PyPI's Linux x86-64 wheel is the CUDA one), open_clip and mlx_clip's own dependencies;
# 2. runs `python -m benchmarks.train_throughput` once per (arch, dtype, batch) cell with the
#    backends mlx-gpu, torch_ref-cuda and open_clip-cuda, each backend in its own worker process
#    with a timeout;
# 3. merges the cells into DIR/gpu.json and DIR/gpu.md (benchmarks/gpu_report.py).
#
# A backend that fails (or is not available after the install) is recorded with its error; a cell
# whose run fails is recorded with its exit code and log; a cell that no longer fits the time
# budget is recorded as skipped. Nothing aborts the rest.
#
#   --smoke     vit_b32 only, fp32 + bf16, batch 128, 1 warm-up + 2 timed steps (~1 min after install)
#   --dry-run   print the plan (venv, packages, every command) and exit 0; installs and runs nothing
#   --out DIR   where the results go (default benchmarks/results/gpu-<host>-<UTC time>/)
#   --python PY the interpreter the venv is made from (default python3; mlx_clip needs >= 3.11)
#
# Environment overrides: VENV_DIR (default ${TMPDIR:-/tmp}/mlx_clip-gpu-venv, reused when its
# packages are unchanged), MLX_SPEC / TORCH_SPEC (pip requirement strings), CUDA_MAJOR (the
# driver's CUDA major version, read from nvidia-smi otherwise), BUDGET_S (seconds, see below).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '4p' "$0" | sed 's/^#  */usage: /' >&2; }

SMOKE=0 DRY=0 OUT_DIR="" PY="python3"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || { usage; exit 2; }; OUT_DIR="$2"; shift ;;
        --python) [ $# -ge 2 ] || { usage; exit 2; }; PY="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "benchmarks/gpu.sh: unknown argument '$1'" >&2; usage; exit 2 ;;
    esac
    shift
done

# ---------------------------------------------------------------------------
# The grid, and why these step counts fit 8 minutes on an H100-class GPU (estimates, not yet
# measured; BUDGET_S below is the guard if they are wrong):
#
#   install, uv, ~3 GB of wheels (torch, the nvidia-* CUDA libraries, mlx-cuda): ~90 s (pip: ~3 min)
#   8 cells x 3 backends = 24 worker processes x ~9 s start-up each (imports, CUDA context,
#     model init, the first compiled step's kernels)                             ~215 s
#   8 cell parents x ~4 s (they import mlx and torch to list the backends)        ~30 s
#   timed work: train FLOPs per step (benchmarks/flops.py) are 5.7 / 11.3 TFLOP for vit_b32 at
#     batch 128 / 256 and 15.8 / 31.6 for vit_b16; at ~35 TFLOP/s fp32 (about half the H100's
#     non-tensor-core fp32 peak) and ~250 TFLOP/s bf16 that is 2.1 s per step for one backend
#     over the 8 cells, x 3 backends x (2 warm-up + 5 timed) steps               ~45 s
#   GEMM peaks (8192^3, 1 + 5 reps, fp32 and bf16) per worker: < 1 s each        ~15 s
#   total                                                                        ~400 s (6.7 min)
#
# --smoke: 2 cells x 3 workers x ~9 s + 2 parents x 4 s + 3 steps of vit_b32 at batch 128 ~= 65 s.
if [ "$SMOKE" = 1 ]; then
    MODE=smoke ARCHS=(vit_b32) DTYPES=(fp32 bf16) BATCHES=(128) WARMUP=1 STEPS=2 BACKEND_TIMEOUT=60
else
    MODE=full ARCHS=(vit_b32 vit_b16) DTYPES=(fp32 bf16) BATCHES=(128 256) WARMUP=2 STEPS=5 BACKEND_TIMEOUT=150
fi
BACKENDS="mlx-gpu,torch_ref-cuda,open_clip-cuda"
GEMM_ARGS=(--gemm-size 8192 --gemm-reps 5)  # 2048^3 (the CPU default) is too small to fill a GPU
# No cell starts once the script has run BUDGET_S seconds (install included); a started cell is
# cut at the budget's end. 480 s = the 8 minutes, less ~20 s for the report.
BUDGET_S="${BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 300 || echo 460)}"

VENV_DIR="${VENV_DIR:-${TMPDIR:-/tmp}/mlx_clip-gpu-venv}"
if [ -z "$OUT_DIR" ]; then
    OUT_DIR="benchmarks/results/gpu-$(hostname -s 2>/dev/null || echo host)-$(date -u +%Y-%m-%d-%H%M%S)"
fi

# ---------------------------------------------------------------------------
# Checks: an NVIDIA GPU (not for --dry-run), a Python >= 3.11

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh: no Python interpreter '$PY'; pass --python /path/to/python3.11" >&2
    exit 2
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "benchmarks/gpu.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); mlx_clip needs >= 3.11 (pass --python)" >&2
    exit 2
}

GPU_LIST=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_LIST="$(nvidia-smi -L 2>/dev/null | grep -i '^GPU' || true)"
fi
if [ -z "$GPU_LIST" ] && [ "$DRY" = 0 ]; then
    echo "benchmarks/gpu.sh: no NVIDIA GPU visible (nvidia-smi missing or lists none); run it on a CUDA machine, or pass --dry-run to see the plan" >&2
    exit 2
fi

# MLX's CUDA build must match the driver: mlx[cuda13] needs a CUDA 13 driver (>= 580), as PyPI's
# current torch wheel does; an older driver gets mlx[cuda12] (and torch will likely fail there,
# recorded as such: pin TORCH_SPEC to a CUDA 12 build).
if [ -z "${CUDA_MAJOR:-}" ] && [ -n "$GPU_LIST" ]; then
    CUDA_MAJOR="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
fi
CUDA_NOTE=""
if [ -z "${CUDA_MAJOR:-}" ]; then
    CUDA_MAJOR=13 CUDA_NOTE=" (driver unknown here: CUDA 13 assumed)"
fi
case "$CUDA_MAJOR" in
    *[!0-9]*) echo "benchmarks/gpu.sh: CUDA_MAJOR='$CUDA_MAJOR' is not a number (e.g. CUDA_MAJOR=13)" >&2; exit 2 ;;
esac
if [ "$CUDA_MAJOR" -ge 13 ]; then MLX_CUDA=cuda13; else MLX_CUDA=cuda12; fi
MLX_SPEC="${MLX_SPEC:-mlx[$MLX_CUDA]}"
TORCH_SPEC="${TORCH_SPEC:-}"

# mlx_clip's own requirements from pyproject.toml, less its mlx / mlx[cpu] (MLX's CUDA build
# replaces them: the cpu wheel next to the CUDA one would clash), plus the torch extra and
# open_clip_torch from the dev extra; mlx_clip itself runs from this checkout (PYTHONPATH).
mapfile -t PACKAGES < <("$PY" - "$MLX_SPEC" "$TORCH_SPEC" <<'PYEOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name = lambda req: re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
extras = project["optional-dependencies"]
reqs = [r for r in project["dependencies"] if name(r) != "mlx"]
reqs += [r for r in extras["torch"] if not (sys.argv[2] and name(r) == "torch")]
reqs += [r for r in extras["dev"] if name(r) == "open_clip_torch"]
reqs += [a for a in sys.argv[1:] if a]
print("\n".join(reqs))
PYEOF
)

if command -v uv >/dev/null 2>&1; then
    MAKE_VENV=(uv venv -q --python "$PY" "$VENV_DIR")
    INSTALL=(uv pip install -q --python "$VENV_DIR/bin/python")
else
    MAKE_VENV=("$PY" -m venv "$VENV_DIR")
    INSTALL=("$VENV_DIR/bin/python" -m pip install -q --progress-bar off)
fi
VPY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.mlx_clip-gpu-packages"

# One cell (arch, dtype, batch, backends): the name of its files under $OUT_DIR/cells, its command.
cell_name() { echo "$1-$2-b$3"; }
cell_cmd() {
    CELL=("$VPY" -m benchmarks.train_throughput --arch "$1" --dtype "$2" --batch "$3" --backends "$4"
        --warmup "$WARMUP" --steps "$STEPS" "${GEMM_ARGS[@]}" --timeout "$BACKEND_TIMEOUT"
        --out "$OUT_DIR/cells/$(cell_name "$1" "$2" "$3").json")
}
REPORT=("$VPY" -m benchmarks.gpu_report "$OUT_DIR" --mode "$MODE" --backends "$BACKENDS")

print_plan() {
    echo "mode: $MODE (budget ${BUDGET_S} s; warm-up $WARMUP + $STEPS timed steps per cell; ${BACKEND_TIMEOUT} s per backend)"
    echo "gpu: ${GPU_LIST:-none visible}; driver CUDA $CUDA_MAJOR$CUDA_NOTE"
    echo "venv: $VENV_DIR"
    echo "out: $OUT_DIR"
    echo "packages: ${PACKAGES[*]}"
    echo "+ ${MAKE_VENV[*]}"
    echo "+ ${INSTALL[*]} ${PACKAGES[*]}"
    echo "+ $VPY -m benchmarks.gpu_report $OUT_DIR --preflight --backends $BACKENDS  # the ones that work"
    for arch in "${ARCHS[@]}"; do for dtype in "${DTYPES[@]}"; do for batch in "${BATCHES[@]}"; do
        cell_cmd "$arch" "$dtype" "$batch" "$BACKENDS"
        echo "cell $(cell_name "$arch" "$dtype" "$batch"): + timeout <budget left> ${CELL[*]}"
    done; done; done
    echo "+ ${REPORT[*]}"
}

print_plan
if [ "$DRY" = 1 ]; then
    exit 0
fi

# ---------------------------------------------------------------------------
# Install (skipped when the venv already holds exactly these packages)

export MLX_CLIP_BLAS=none  # OpenBLAS is for MLX's CPU matmuls; every timed step here is on the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR/cells"
WANT="$(printf '%s\n' "${PACKAGES[@]}")"
if [ -x "$VPY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo ">> venv $VENV_DIR is up to date"
else
    echo ">> installing into $VENV_DIR ($(date -u +%H:%M:%S))"
    [ -x "$VPY" ] || "${MAKE_VENV[@]}"
    if ! "${INSTALL[@]}" "${PACKAGES[@]}" >"$OUT_DIR/install.log" 2>&1; then
        tail -20 "$OUT_DIR/install.log" >&2
        echo "benchmarks/gpu.sh: the install failed; the whole log: $OUT_DIR/install.log" >&2
        exit 1
    fi
    echo "$WANT" >"$STAMP"
fi
echo ">> install done after ${SECONDS} s"
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# Which backends work; the others are recorded as failed by the report, with the reason.
BACKENDS="$("$VPY" -m benchmarks.gpu_report "$OUT_DIR" --preflight --backends "$BACKENDS" || true)"
echo ">> backends: ${BACKENDS:-none}"

# ---------------------------------------------------------------------------
# The grid: one train_throughput run per cell, each cut at the budget's end

printf 'arch\tdtype\tbatch\tname\n' >"$OUT_DIR/plan.tsv"
for arch in "${ARCHS[@]}"; do for dtype in "${DTYPES[@]}"; do for batch in "${BATCHES[@]}"; do
    name="$(cell_name "$arch" "$dtype" "$batch")"
    printf '%s\t%s\t%s\t%s\n' "$arch" "$dtype" "$batch" "$name" >>"$OUT_DIR/plan.tsv"
    left=$((BUDGET_S - SECONDS))
    if [ -z "$BACKENDS" ]; then
        echo "no backend works after the install (see preflight.json)" >"$OUT_DIR/cells/$name.skipped"
        continue
    elif [ "$left" -lt 30 ]; then
        echo "not started: ${SECONDS} s of the ${BUDGET_S} s budget were spent" >"$OUT_DIR/cells/$name.skipped"
        echo ">> $name: skipped (budget spent)"
        continue
    fi
    echo ">> $name ($(date -u +%H:%M:%S), ${left} s of budget left)"
    rc=0
    cell_cmd "$arch" "$dtype" "$batch" "$BACKENDS"
    # timeout signals its whole process group: the cell's parent and its backend workers
    timeout --kill-after=10 "$left" "${CELL[@]}" >"$OUT_DIR/cells/$name.log" 2>&1 || rc=$?
    echo "$rc" >"$OUT_DIR/cells/$name.rc"
    if [ "$rc" = 0 ]; then
        grep -E '^\| (mlx|torch_ref|open_clip)' "$OUT_DIR/cells/$name.log" | cut -d'|' -f2,4,5 || true
    else
        echo ">> $name: exit code $rc; last lines of $OUT_DIR/cells/$name.log:"
        tail -5 "$OUT_DIR/cells/$name.log"
    fi
done; done; done

"${REPORT[@]}"
echo ">> done after ${SECONDS} s"
