"""What every benchmark records next to its numbers: machine, versions, commit; plus shared helpers.

Framework-free: the benchmark parents import this without MLX or torch, so that each backend's
worker process starts clean.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Distribution names whose versions a result records (None when not installed).
PACKAGES = ("mlx", "mlx-data", "torch", "torchvision", "open_clip_torch", "numpy", "pillow")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    if match:
        return match.group(1).strip()
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip() or platform.processor()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return set(match.group(1).split()) if match else set()


def cpu_has_native_bf16() -> bool:
    """A bf16 GEMM peak is only meaningful where the CPU multiplies bf16 natively (AVX512-BF16, AMX)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True  # Apple M2 and later; harmless to measure on M1 (it just shows a low number)
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    flags = cpu_flags()
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "memory_bytes": memory_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict:
    """HEAD and whether tracked files differ from it. Read-only: no optional index refresh/lock."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True
            )
        except OSError:
            return None
        return res.stdout if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(changed) if status is not None else None,
        "dirty_files": changed,
    }


def timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory map.
    Not getrusage's ru_maxrss there: it carries over the RSS of the process that forked us
    (Linux keeps the maximum across exec), so a worker would report its parent's size.
    Elsewhere: ru_maxrss (bytes on macOS).
    """
    try:
        match = re.search(r"^VmHWM:\s*(\d+)\s*kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def synthetic_batch(cfg, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (B, S, S, 3) CLIP-normalised, tokens int32 (B, L)) from a seeded generator.

    Token rows look like CLIP's: SOT, random ids, EOT (= the largest id, where the text tower
    pools), then zero padding. Every backend gets the very same arrays.
    """
    from mlx_clip.data.transforms import normalize

    rng = np.random.default_rng(seed)
    S, L, V = cfg.image_size, cfg.context_length, cfg.vocab_size
    images = normalize(rng.integers(0, 256, (batch, S, S, 3), dtype=np.uint8))
    tokens = np.zeros((batch, L), np.int32)
    for row in tokens:
        n = int(rng.integers(1, L - 1))  # body length: room for SOT and EOT
        row[0] = V - 2
        row[1 : n + 1] = rng.integers(1, V - 2, n)
        row[n + 1] = V - 1
    return images, tokens


def cpu_snapshot(children: bool = False) -> dict | None:
    """Machine-wide busy CPU seconds (/proc/stat), this process's CPU seconds, and a wall clock.

    children=True: a parent timing its subprocesses counts their CPU seconds as its own (those of
    the children it has waited for: take the second snapshot after the subprocess has ended)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10])  # already inside user / nice
    hz = os.sysconf("SC_CLK_TCK")
    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return {
        "busy_s": (sum(ticks) - guest - idle) / hz,
        "self_s": sum(u.ru_utime + u.ru_stime for u in usages),
        "wall_s": time.perf_counter(),
    }


def contention(before: dict | None, after: dict | None) -> dict | None:
    """How much of the machine other processes used between two snapshots.

    others_share = CPU seconds of every other process / (cores x wall seconds): 0 on a quiet
    machine; 0.5 on 2 cores means one core's worth of someone else's work ran alongside.
    """
    if before is None or after is None:
        return None
    wall = after["wall_s"] - before["wall_s"]
    own = after["self_s"] - before["self_s"]
    others = max(0.0, after["busy_s"] - before["busy_s"] - own)
    capacity = wall * (os.cpu_count() or 1)
    return {"wall_s": wall, "self_cpu_s": own, "others_cpu_s": others, "others_share": others / capacity}


def write_record(doc: dict, out: Path, *reports: str) -> Path:
    """A benchmark's end: its record as indented JSON at `out` (the folder made), each report (a
    markdown table, a summary line) printed, then the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    for report in reports:
        print(report)
    print(f"wrote {out}")
    return out


def record_header(schema: str) -> dict:
    """The fields every results JSON starts with: what ran, where, with which versions and commit."""
    return {
        "schema": schema,
        "created": timestamp(),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
    }


def run_in_worker(
    module: str, spec: dict, name: dict, timeout: float | None, env: dict | None = None, prefix=()
) -> dict:
    """`python -m MODULE --worker SPEC.json` in a fresh process (its own BLAS, allocator and peak
    RSS): the dict the worker wrote to spec["result_path"]. A timeout, or a worker that ends
    without a result, gives {**name, "error": why} instead. `prefix`: a command that runs the
    worker (`perf record ... --`, benchmarks/cpu_profile.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(out_path)}))
        cmd = [*prefix, sys.executable, "-m", module, "--worker", str(spec_path)]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**name, "error": f"timed out after {timeout:.0f} s"}
        if out_path.is_file():
            return json.loads(out_path.read_text())
        return {**name, "error": f"worker exited with code {proc.returncode} and no result"}
