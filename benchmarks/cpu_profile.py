"""Where a training step's CPU time goes, per backend: the step of benchmarks/train_throughput.py
run under Linux `perf`, its samples sorted into categories.

    python -m benchmarks.cpu_profile [--arch tiny] [--batch 32] [--backends mlx-cpu,torch_ref-cpu]
                                     [--steps 60] [--warmup 5] [--freq 1000] [--out FILE]

Each backend runs in a process of its own, the same worker as train_throughput's
(benchmarks/step_workers.py), under `perf record -k CLOCK_MONOTONIC -F FREQ`. The worker records
the monotonic clock around its timed steps, and only the samples inside that window count, so the
set-up, the warm-up and the GEMM peak measured afterwards are left out. Each sample goes to the
first category of CATEGORIES whose pattern matches its symbol and library; CPU ms per step =
samples / FREQ / steps, summed over all of the process's threads (on a machine with C cores a
step can use up to C x its wall time). "threads" lists the busiest threads' CPU ms per step.

What the categories tell apart: the matrix products (BLAS), the elementwise work (MLX's fused
kernels compiled by mx.compile, torch's vectorized loops and fused attention / LayerNorm), layout
copies, reductions, the framework's own bookkeeping (graph, scheduling, dispatch), memory
allocation, the OS kernel (thread wake-ups, page faults), and thread pools waiting for work.

Needs `perf` on PATH and user-space sampling allowed (kernel.perf_event_paranoid <= 2; the default
on Debian). The JSON goes to benchmarks/results/profile-<host>-<UTC time>.json (or --out) with the
table printed; it holds the categories, not the samples.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import record_header, write_record
from .step_workers import log
from .train_throughput import default_out, run_backend

# (category, pattern over "symbol (library file name)"), first match wins.
CATEGORIES = (
    ("GEMM (BLAS kernels and packing)", r"sgemm|dgemm|mkl_blas|brgemm|dnnl|cblas_"),
    ("thread pools waiting for work", r"\((libgomp|libiomp5)|blas_thread_server"),
    ("layout copies", r"copy_general|copy_inplace|memmove|memcpy|\bcopy<"),
    ("reductions", r"reduction_op|Reduce|outer_sum|RowwiseMoments"),
    (
        "elementwise and fused kernels",
        r"_strided|_contiguous|binary_op|unary_op|ternary_op|VectorizedLoop|Sleef|vml_|flash_attention|"
        r"LayerNorm|[Ss]oftmax",
    ),
    ("OS kernel (wake-ups, scheduling, page faults)", r"\[kernel"),
    ("malloc / free and the C++ runtime", r"\((libc\.so|libstdc\+\+|libm\.so|libpthread)"),
    ("Python interpreter", r"\((libpython|python3)"),
    ("framework bookkeeping (graph, scheduling, dispatch)", r"\((libmlx|libtorch|libc10|core\.cpython)"),
)
OTHER = "other"
_LIBRARY = re.compile(r"\(([^()]*)\)\s*$")
PARANOID = Path("/proc/sys/kernel/perf_event_paranoid")  # > 2: no sampling of one's own processes


def perf_unusable() -> str | None:
    """Why `perf record` cannot sample this user's processes here, or None when it can."""
    if shutil.which("perf") is None:
        return "`perf` is not on PATH (Debian/Ubuntu: apt install linux-perf)"
    level = PARANOID.read_text().strip() if PARANOID.is_file() else ""
    if level.lstrip("-").isdigit() and int(level) > 2:
        fix = "as root: sysctl -w kernel.perf_event_paranoid=2"
        return f"{PARANOID} is {level}: perf may not sample user processes (needs <= 2; {fix})"
    return None


def category(symbol: str, library: str) -> str:
    """The category of one sample: its symbol and the file name of its library."""
    key = f"{symbol} ({Path(library).name})"
    return next((name for name, pattern in CATEGORIES if re.search(pattern, key)), OTHER)


def aggregate(script: str, freq: int, steps: int) -> dict:
    """`perf script -F tid,ip,sym,dso -G` output -> CPU ms per step by category and by thread."""
    by_category, by_thread, total = collections.Counter(), collections.Counter(), 0
    for line in script.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 2:
            continue
        library = _LIBRARY.search(line)
        rest = fields[2] if len(fields) > 2 else ""
        symbol = rest[: rest.rfind("(")].strip() if library else rest
        by_category[category(symbol, library.group(1) if library else "")] += 1
        by_thread[fields[0]] += 1
        total += 1
    per_step = 1e3 / freq / steps
    return {
        "samples": total,
        "cpu_ms_per_step": total * per_step,
        "categories_ms_per_step": {k: v * per_step for k, v in by_category.most_common()},
        "threads_ms_per_step": [v * per_step for _, v in by_thread.most_common()],
    }


def profile_backend(spec: dict, freq: int, timeout: float) -> dict:
    """One backend's train_throughput worker under `perf record`, then its samples inside the timed
    steps."""
    backend = spec["backend"]
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "perf.data")
        record = ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", str(freq), "-o", data, "--"]
        log(backend, f"under perf ({freq} Hz)")
        result = run_backend(spec, timeout, prefix=record)
        if "error" in result:
            return result
        start, end = result["timed_window_monotonic_s"]
        window = f"{start:.6f},{end:.6f}"
        read = ["perf", "script", "-i", data, "--time", window, "-F", "tid,ip,sym,dso", "-G"]
        done = subprocess.run(read, capture_output=True, text=True)
        if done.returncode != 0:
            return {"backend": backend, "error": f"perf script failed: {done.stderr.strip()[-500:]}"}
        script = done.stdout
    # (not "mfu": the worker's GEMM peak is measured at 512^3 here, to save time)
    keep = ("backend", "median_step_s", "streams", "contention", "timed_window_monotonic_s")
    return {**{k: result.get(k) for k in keep}, **aggregate(script, freq, spec["steps"])}


def table(results: list[dict]) -> str:
    """Markdown: a row per category, a column per backend (CPU ms per step and its share)."""
    ok = [r for r in results if "error" not in r]
    names = [name for name, _ in CATEGORIES] + [OTHER]
    lines = [
        "| CPU ms per step | " + " | ".join(r["backend"] for r in ok) + " |",
        "|---" * (len(ok) + 1) + "|",
    ]
    for name in names:
        cells = [r["categories_ms_per_step"].get(name, 0.0) for r in ok]
        if any(c >= 0.05 for c in cells):
            totals = [r["cpu_ms_per_step"] for r in ok]
            shares = [f"{c:.1f} ({100 * c / t:.0f}%)" for c, t in zip(cells, totals, strict=True)]
            lines.append(f"| {name} | " + " | ".join(shares) + " |")
    lines.append("| **all threads** | " + " | ".join(f"**{r['cpu_ms_per_step']:.1f}**" for r in ok) + " |")
    lines.append("| median step (wall) | " + " | ".join(f"{1e3 * r['median_step_s']:.1f}" for r in ok) + " |")
    threads = [", ".join(f"{t:.0f}" for t in r["threads_ms_per_step"][:4]) for r in ok]
    lines.append("| busiest threads | " + " | ".join(threads) + " |")
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['backend']}: {r['error']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_profile", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny", help="architecture name or model YAML (default tiny)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backends", default="mlx-cpu,torch_ref-cpu", help="comma-separated CPU backends")
    p.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--freq", type=int, default=1000, help="perf samples per second per thread (default 1000)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per backend")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0 or args.freq < 1:
        p.error("--batch must be >= 2, --steps and --freq >= 1, --warmup >= 0")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    wrong = [b for b in backends if not b.endswith("-cpu")]
    if wrong:
        p.error(f"--backends: perf profiles CPU backends only, got {wrong}")
    args.backends = backends
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    why = perf_unusable()
    if why:
        sys.exit(f"error: {why}")
    spec = dict(
        arch=args.arch, batch=args.batch, warmup=args.warmup, steps=args.steps, seed=0,
        gemm_size=512, gemm_reps=2, mlx_streams="auto", precision="float32",
    )  # fmt: skip
    results = [profile_backend({**spec, "backend": b}, args.freq, args.timeout) for b in args.backends]
    settings = {**spec, "freq": args.freq}
    doc = {**record_header("mlx_clip.cpu_profile/1"), "settings": settings, "results": results}
    stamped = default_out()
    out = args.out or stamped.with_name("profile-" + stamped.name)
    write_record(doc, out, table(results))
    return doc


if __name__ == "__main__":
    main()
