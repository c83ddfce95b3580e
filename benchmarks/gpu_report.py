"""The two Python steps of benchmarks/gpu.sh: which GPU backends work, and the merged report.

    python -m benchmarks.gpu_report DIR --preflight [--backends LIST]
        checks each backend in its own process (a tiny GPU matmul), writes DIR/preflight.json and
        prints the comma-separated list of those that work (what gpu.sh passes to the cells)
    python -m benchmarks.gpu_report DIR [--mode full|smoke] [--backends LIST]
        merges the cells gpu.sh ran into DIR/gpu.json and DIR/gpu.md

DIR holds what gpu.sh wrote: plan.tsv (one line per cell: arch, dtype, batch, name) and, per cell
under cells/, NAME.json (a benchmarks.train_throughput record) when the cell ran, NAME.log and
NAME.rc (its output and exit code), or NAME.skipped (why it did not start). Every planned cell
and backend gets a row: measured, or failed / skipped with the reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from .common import REPO_ROOT, record_header

SCHEMA = "mlx_clip.gpu_bench/1"
BACKENDS = ("mlx-gpu", "torch_ref-cuda", "open_clip-cuda")
REFERENCES = ("torch_ref-cuda", "open_clip-cuda")  # the ratio columns: MLX's img/s over theirs
CUDA_PACKAGES = ("mlx-cuda-12", "mlx-cuda-13", "nvidia-cublas", "nvidia-cublas-cu12", "nvidia-cudnn-cu13")

# Each check imports its framework in a fresh process (as the benchmark's workers do) and runs one
# small matmul on the GPU, so a wheel that imports but cannot run kernels here is caught too.
_CHECKS = {
    "mlx-gpu": """
import mlx_clip.models.config, mlx.core as mx
assert mx.cuda.is_available(), "mx.cuda.is_available() is False"
a = mx.ones((256, 256), dtype=mx.float32, stream=mx.gpu)
mx.eval(a @ a)
print(mx.device_info().get("device_name", "gpu"))
""",
    "torch_ref-cuda": """
import torch, torch_ref
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
a = torch.ones(256, 256, device="cuda")
(a @ a).sum().item()
print(torch.cuda.get_device_name(), "CUDA", torch.version.cuda)
""",
}
_CHECKS["open_clip-cuda"] = "import open_clip\n" + _CHECKS["torch_ref-cuda"]


def check_backend(backend: str, timeout: float = 180) -> dict:
    """{"ok": bool, "detail": what the check printed, or the end of its error output}."""
    if backend not in _CHECKS:
        return {"ok": False, "detail": f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"}
    try:
        p = subprocess.run(
            [sys.executable, "-c", _CHECKS[backend]],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"the check timed out after {timeout:.0f} s"}
    if p.returncode == 0:
        return {"ok": True, "detail": p.stdout.strip()}
    # the error's last line, and a warning such as torch's "driver too old" if one was printed
    lines = [line.strip() for line in (p.stderr or p.stdout).splitlines() if line.strip()]
    warning = [line for line in lines if "Warning" in line][:1]
    return {
        "ok": False,
        "detail": "; ".join([f"exit code {p.returncode}: {lines[-1] if lines else ''}"] + warning),
    }


def preflight(out_dir: Path, backends: list[str]) -> list[str]:
    """Check the backends side by side; write out_dir/preflight.json; return the working ones."""
    with ThreadPoolExecutor(len(backends)) as pool:
        checks = dict(zip(backends, pool.map(check_backend, backends), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "preflight.json").write_text(json.dumps(checks, indent=1))
    for b, c in checks.items():
        print(f"[preflight] {b}: {'ok' if c['ok'] else 'FAILED'}: {c['detail']}", file=sys.stderr)
    return [b for b in backends if checks[b]["ok"]]


# ---------------------------------------------------------------------------
# The report


def read_cell(cells: Path, name: str) -> dict:
    """One planned cell's outcome: status ok / failed / skipped / missing, its record or the reason."""
    record, rc, skipped = cells / f"{name}.json", cells / f"{name}.rc", cells / f"{name}.skipped"
    if record.is_file():
        return {"status": "ok", "record": json.loads(record.read_text())}
    if rc.is_file():
        code = rc.read_text().strip()
        why = "cut at the end of the time budget" if code in ("124", "137") else "no result written"
        log = cells / f"{name}.log"
        lines = (
            [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
        )
        last = f"; last log line: {lines[-1].strip()}" if lines else ""
        return {"status": "failed", "error": f"exit code {code} ({why}){last}"}
    if skipped.is_file():
        return {"status": "skipped", "error": "skipped: " + skipped.read_text().strip()}
    return {"status": "missing", "error": "no result, log or skip note (gpu.sh stopped before this cell?)"}


def cell_rows(cell: dict, outcome: dict, backends: list[str], checks: dict) -> list[dict]:
    """One row per backend: its numbers, or why it has none."""
    by_backend = {r["backend"]: r for r in outcome.get("record", {}).get("results", [])}
    rows = []
    for b in backends:
        row = {**cell, "backend": b}
        r = by_backend.get(b)
        if r is not None and "error" not in r:
            row.update(
                images_per_s=r["images_per_s"],
                median_step_s=r["median_step_s"],
                mfu=r["mfu"],
                mfu_device=r.get("mfu_device"),
                peak_memory_bytes=r["peak_memory_bytes"],
                device_name=r["device_name"],
                tf32=r.get("tf32"),
            )
        elif r is not None:
            row["error"] = r["error"]
        elif b in checks and not checks[b]["ok"]:
            row["error"] = "not available: " + checks[b]["detail"]
        else:
            row["error"] = outcome.get("error", "not run in this cell (not among its --backends)")
        rows.append(row)
    ok = {row["backend"]: row for row in rows if "error" not in row}
    for row in rows:  # MLX over each reference, on the MLX row
        if row["backend"] == "mlx-gpu" and "error" not in row:
            for ref in REFERENCES:
                if ref in ok:
                    row[f"mlx_over_{ref.split('-')[0]}"] = row["images_per_s"] / ok[ref]["images_per_s"]
    return rows


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def markdown(doc: dict) -> str:
    head = ["arch", "dtype", "batch", "backend", "img/s", "step ms", "MFU", "peak memory"]
    head += [f"MLX / {ref.split('-')[0]}" for ref in REFERENCES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        cells = [r["arch"], r["dtype"], str(r["batch"]), r["backend"]]
        if "error" in r:
            cells += [f"failed: {r['error']}".replace("|", "/")] + ["-"] * (len(head) - 5)
        else:
            cells += [
                _fmt(r["images_per_s"], ",.0f"),
                _fmt(r["median_step_s"], ",.1f", 1e3),
                _fmt(r["mfu_device"] if r["mfu_device"] is not None else r["mfu"], ".1%"),
                _fmt(r["peak_memory_bytes"], ",.1f", 2**-30) + " GiB",
                *[_fmt(r.get(f"mlx_over_{ref.split('-')[0]}"), ".2f") for ref in REFERENCES],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    s = doc["settings"]
    gpus = sorted({r["device_name"] for r in doc["rows"] if "device_name" in r}) or ["no backend ran"]
    intro = [
        f"# GPU training throughput ({s['mode']}), {doc['created']}",
        "",
        f"{', '.join(gpus)}; commit {doc['git']['commit']}{' (dirty)' if doc['git']['dirty'] else ''}; "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
        "",
        "img/s and step ms: median of the timed steps; MFU: model FLOPs / step time / the best GEMM peak "
        "in the row's dtype measured on the device in its cell (benchmarks/train_throughput.py); "
        "MLX / X: MLX's img/s over X's in the same cell. fp32 is full fp32 (no TF32) in every backend; "
        "bf16 is mixed precision (bf16 compute, fp32 weights and AdamW state).",
        "",
    ]
    return "\n".join(intro + lines) + "\n"


def _versions() -> dict:
    out = {}
    for name in CUDA_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def report(out_dir: Path, mode: str, backends: list[str]) -> dict:
    with open(out_dir / "plan.tsv", newline="") as f:
        plan = [{**c, "batch": int(c["batch"])} for c in csv.DictReader(f, delimiter="\t")]
    pre = out_dir / "preflight.json"
    checks = json.loads(pre.read_text()) if pre.is_file() else {}
    header = record_header(SCHEMA)
    doc = {
        **header,
        "versions": {**header["versions"], **_versions()},
        "settings": {"mode": mode, "backends": backends, "plan": plan},
        "preflight": checks,
        "nvidia_smi": (out_dir / "nvidia-smi.txt").read_text()
        if (out_dir / "nvidia-smi.txt").is_file()
        else None,
        "cells": [],
        "rows": [],
    }
    for c in plan:
        outcome = read_cell(out_dir / "cells", c["name"])
        cell = {"arch": c["arch"], "dtype": c["dtype"], "batch": c["batch"]}
        doc["cells"].append({**cell, "name": c["name"], **outcome})
        doc["rows"] += cell_rows(cell, outcome, backends, checks)
    (out_dir / "gpu.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "gpu.md").write_text(markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path, help="the output folder of benchmarks/gpu.sh")
    p.add_argument("--preflight", action="store_true", help="check the backends, print the working ones")
    p.add_argument("--mode", default="full", help="full or smoke (recorded)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: all three)")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.preflight:
        print(",".join(preflight(args.dir, backends)))
        return 0
    if not (args.dir / "plan.tsv").is_file():
        p.error(f"{args.dir / 'plan.tsv'} not found: DIR must be an output folder of benchmarks/gpu.sh")
    doc = report(args.dir, args.mode, backends)
    print((args.dir / "gpu.md").read_text())
    print(f"wrote {args.dir / 'gpu.json'} and {args.dir / 'gpu.md'}")
    failed = sum(1 for r in doc["rows"] if "error" in r)
    return 1 if failed == len(doc["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
