"""Training-step throughput of one architecture on every backend at hand.

    python -m benchmarks.train_throughput [--arch vit_b32] [--batch 32] [--backends mlx-cpu,torch_ref-cpu]
                                          [--dtype fp32|bf16] [--patch-dropout 0.0] [--steps 10]
                                          [--warmup 3] [--rounds 1]
                                          [--plot] [--out FILE]

Backends: mlx-cpu, mlx-gpu (Metal or CUDA), torch_ref-{cpu,mps,cuda}, open_clip-{cpu,mps,cuda}
(open_clip's own CLIP built from our ModelConfig via mlx_clip.interop.open_clip.open_clip_cfg, with
its ClipLoss). Default: every one available here. All get the same architecture, batch and
synthetic batch (benchmarks.common.synthetic_batch), and time a FULL training step, fp32 by default:

- MLX: the step of mlx_clip.training.build.build_training (one compiled forward + backward + grad clip +
  AdamW update),
  then one mx.eval of the model/optimizer state and the loss;
- torch: forward, clip loss, backward, clip_grad_norm_(1.0), AdamW.step, LR schedule step,
  logit-scale clamp, device synchronize (eager mode, as torch_ref.train runs).

fp32 means full fp32 matmuls on a GPU too: torch's default (torch.backends.cuda.matmul.allow_tf32
False), and for MLX, whose MLX_ENABLE_TF32 (TF32 fp32 matmuls where the hardware has them) is on by
default in recent versions, the worker gets MLX_ENABLE_TF32=0 unless the caller set it; the GPU
rows record which (`tf32`).

--dtype bf16 is mixed precision: MLX runs the run's own train.precision bfloat16 (bf16 towers on
bf16 copies of the fp32 weights, fp32 AdamW state; mlx_clip.models.model.encode_pair); torch runs
forward and loss under torch.autocast(bfloat16) with fp32 weights and AdamW, as open_clip trains.
MFU is then taken against the bf16 GEMM peak, and settings.precision says "bfloat16".

--patch-dropout P trains with model.patch_dropout P (FLIP): each step keeps int(N * (1 - P)) of the
N patches of every image. MLX and torch_ref draw the kept patches per step as a run does
(mlx_clip/training/patch_dropout.py), inside the timed step; open_clip runs its own PatchDropout.
The FLOPs (benchmarks/flops.py), and so the MFU, count the kept tokens only.

AdamW everywhere: lr 1e-3 with the run schedule, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on
matrices only (mlx_clip.training.optim.decays). The batch is made once, before timing, and reused.

Each backend runs in its own subprocess (benchmarks/step_workers.py), one after the other: a clean
peak RSS, no thread pool or BLAS shared with another framework (the torch workers set
MLX_CLIP_BLAS=none so OpenBLAS is not loaded next to torch's BLAS). Per backend it reports the
median step time over --steps timed steps after --warmup steps, images/s, peak memory (MLX's or
CUDA's allocator peak, else the process peak RSS; the source is named), and MFU = model FLOPs per
step (benchmarks.flops, train = 3 x forward) / median step time / the GEMM peak in the step's dtype
(fp32; bf16 for --dtype bf16) measured by the same worker, framework and device right after the
timed steps (best of --gemm-reps n x n matmuls, n = --gemm-size). A bf16 GEMM peak is measured
too where the device multiplies bf16 natively (GPUs; CPUs with AVX512-BF16 / AMX) or the step is
bf16. "MFU (best GEMM)" divides by the highest such GEMM peak any backend measured on the same
device in the run.
"others' CPU" is the share of the machine's CPU time that other processes used while the timed
steps ran (/proc/stat minus the worker's own getrusage): on a shared machine it says how far to
trust a row. --rounds N runs the backends round-robin N times and keeps, per backend, the round
with the least of it (all rounds stay in the JSON).

The JSON goes to benchmarks/results/<host>-<UTC date and time>.json (or --out); a markdown table
is printed; --plot writes a bar chart with the same name and .png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# Importing mlx_clip (any submodule) loads OpenBLAS for MLX on Linux, before anything imports mlx.core.
from mlx_clip.models.config import model_config
from mlx_clip.schema import to_dict

from .common import (
    RESULTS_DIR,
    machine_info,
    record_header,
    run_in_worker,
    write_record,
)
from .flops import clip_flops_per_pair, format_flops
from .step_workers import log, run_worker

BACKENDS = (
    "mlx-cpu",
    "mlx-gpu",
    "torch_ref-cpu",
    "torch_ref-mps",
    "torch_ref-cuda",
    "open_clip-cpu",
    "open_clip-mps",
    "open_clip-cuda",
)
SCHEMA = "mlx_clip.train_throughput/1"
# --dtype spelling -> the run config's train.precision value (mlx_clip.config.Precision)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------
# Which backends exist here (the parent imports the frameworks only to ask)


def available_backends() -> list[str]:
    found = []
    if importlib.util.find_spec("mlx") is not None:
        import mlx.core as mx  # after mlx_clip (imported above): OpenBLAS is bound first

        found.append("mlx-cpu")
        gpu = False
        for backend in ("metal", "cuda"):
            try:
                gpu = gpu or bool(getattr(mx, backend).is_available())
            except AttributeError:
                pass
        if gpu:
            found.append("mlx-gpu")
    if importlib.util.find_spec("torch") is not None:
        import torch

        devices = ["cpu"]
        if torch.backends.mps.is_available():
            devices.append("mps")
        if torch.cuda.is_available():
            devices.append("cuda")
        found += [f"torch_ref-{d}" for d in devices]
        if importlib.util.find_spec("open_clip") is not None:
            found += [f"open_clip-{d}" for d in devices]
    return found


# ---------------------------------------------------------------------------
# Parent side: one subprocess per backend, then the JSON, the table and the plot


def run_backend(spec: dict, timeout: float | None, prefix=()) -> dict:
    """One backend's worker process (`prefix`: a command that runs it, benchmarks/cpu_profile.py)."""
    backend = spec["backend"]
    env = dict(os.environ)
    if not backend.startswith("mlx-"):
        env["MLX_CLIP_BLAS"] = "none"  # keep OpenBLAS out of torch's process
    else:  # fp32 matmuls in full fp32 on GPUs, not MLX's default TF32: as torch's default (no TF32)
        env.setdefault("MLX_ENABLE_TF32", "0")
    log(backend, "starting worker")
    return run_in_worker("benchmarks.train_throughput", spec, {"backend": backend}, timeout, env, prefix)


def _others(r: dict) -> float:
    return r["contention"]["others_share"] if r.get("contention") else 0.0


def run_rounds(spec: dict, backends: list[str], rounds: int, timeout: float | None) -> list[dict]:
    """Each backend once per round, round-robin; per backend, the least-disturbed successful round."""
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for k in range(rounds):
        for b in backends:
            r = run_backend({**spec, "backend": b}, timeout)
            r["round"] = k
            runs[b].append(r)
    results = []
    for b in backends:
        ok = [r for r in runs[b] if "error" not in r]
        best = min(ok, key=_others) if ok else runs[b][-1]
        if rounds > 1:
            best = {**best, "rounds": runs[b]}
        results.append(best)
    return results


def add_device_mfu(results: list[dict], precision: str = "float32") -> None:
    """mfu_device: achieved FLOP/s over the best GEMM peak (in the step's precision) any framework
    reached on the device.

    `mfu` divides by the worker's own framework's GEMM peak (how well it uses its own BLAS);
    this one compares backends against one yardstick: what the hardware showed it can do.
    """
    ok = [r for r in results if "error" not in r]
    for r in ok:
        same = [x["gemm_peak_flops"][precision] for x in ok if x["device_name"] == r["device_name"]]
        r["device_gemm_peak_flops"] = max(same)
        r["mfu_device"] = r["achieved_flops"] / max(same)


def _short(precision: str) -> str:
    return {v: k for k, v in DTYPES.items()}[precision]


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def _gflops(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.1f}"


def markdown_table(doc: dict) -> str:
    results = doc["results"]
    dtype = _short(doc["settings"].get("precision", "float32"))
    rate = {r["backend"]: r["images_per_s"] for r in results if "error" not in r}
    refs = [b for b in ("torch_ref-cpu", "open_clip-cpu") if b in rate]
    head = ["backend", "device", "step ms (median, min-max)", "img/s", *[f"x {b}" for b in refs]]
    head += [
        "others' CPU",
        "peak memory (counter)",
        "peak RSS",
        f"MFU {dtype} (own GEMM)",
        f"MFU {dtype} (best GEMM)",
        "model GFLOP/s",
        "GEMM fp32 GFLOP/s",
        "GEMM bf16 GFLOP/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        src = "RSS" if "RSS" in r["peak_memory_source"] else r["peak_memory_source"].split(".")[-1]
        row = [
            r["backend"],
            r["device_name"],
            f"{r['median_step_s'] * 1e3:,.1f} ({r['min_step_s'] * 1e3:,.1f}-{r['max_step_s'] * 1e3:,.1f})",
            f"{r['images_per_s']:,.1f}",
            *[f"{r['images_per_s'] / rate[b]:.2f}" for b in refs],
            "-" if not r.get("contention") else f"{100 * r['contention']['others_share']:.0f}%",
            f"{_mb(r['peak_memory_bytes'])} ({src})",
            _mb(r["peak_rss_bytes"]),
            f"{100 * r['mfu']:.1f}%",
            f"{100 * r['mfu_device']:.1f}%" if "mfu_device" in r else "-",
            _gflops(r["achieved_flops"]),
            _gflops(r["gemm_peak_flops"]["float32"]),
            _gflops(r["gemm_peak_flops"].get("bfloat16")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rounds_table(doc: dict) -> str | None:
    """With --rounds > 1: each backend's median step in every round, the median of those, and the
    ratios of the medians of rounds (the row the issue-18 targets are read from: the table above
    picks each backend's least-disturbed round, which on a quiet machine only follows drift)."""
    results = [r for r in doc["results"] if "error" not in r and len(r.get("rounds", [])) > 1]
    if not results:
        return None
    med = {
        r["backend"]: statistics.median(x["median_step_s"] for x in r["rounds"] if "error" not in x)
        for r in results
    }
    refs = [b for b in ("torch_ref-cpu", "open_clip-cpu") if b in med]
    n = max(len(r["rounds"]) for r in results)
    head = ["backend", *[f"round {k + 1} ms" for k in range(n)], "median of rounds ms"]
    head += [f"x {b} (medians)" for b in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rounds = [("error" if "error" in x else f"{x['median_step_s'] * 1e3:,.1f}") for x in r["rounds"]]
        ratios = [f"{med[b] / med[r['backend']]:.2f}" for b in refs]
        row = [r["backend"], *rounds, f"{med[r['backend']] * 1e3:,.1f}", *ratios]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if "error" not in r]
    names = [r["backend"] for r in ok]
    s = doc["settings"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.5 * len(ok) + 1.8))
    ax1.barh(names, [r["images_per_s"] for r in ok], color="tab:blue")
    dtype = _short(s.get("precision", "float32"))
    ax1.set(xlabel="images / s", title=f"{s['arch']}, batch {s['batch']}, {dtype} training step")
    ax2.barh(names, [100 * r.get("mfu_device", r["mfu"]) for r in ok], color="tab:orange")
    ax2.set(
        xlabel=f"MFU (% of the best {dtype} GEMM peak measured on the device)",
        title="model FLOPs utilisation",
    )
    ax2.set_yticklabels([])
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        ax.margins(x=0.15)  # room for the value labels
        for bar in ax.patches:
            x, y = bar.get_width(), bar.get_y() + bar.get_height() / 2
            ax.annotate(
                f"{x:.1f}", (x, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_out() -> Path:
    host = machine_info()["host"].split(".")[0]
    return RESULTS_DIR / f"{host}-{time.strftime('%Y-%m-%d-%H%M%S', time.gmtime())}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", default="vit_b32", help="architecture name or model YAML (default vit_b32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="fp32 (default) or bf16: mixed precision, fp32 weights and optimizer state",
    )
    p.add_argument(
        "--patch-dropout",
        type=float,
        default=0.0,
        help="model.patch_dropout of the step: the share of image patches dropped (default 0)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--gemm-reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mlx-streams",
        default="auto",
        help="train.streams of the MLX step: 'auto' (one per core on the CPU backend) or an int; "
        "1 is the single-stream step with OpenBLAS on all cores",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the backends round-robin this many times; each row is the round where other "
        "processes used the least CPU (for shared machines; every round is kept in the JSON)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per backend (default 3600)")
    p.add_argument("--plot", action="store_true", help="also write a PNG bar chart next to the JSON")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--batch must be >= 2, --steps >= 1 and --warmup >= 0")
    if not 0 <= args.patch_dropout < 1:
        p.error(f"--patch-dropout must be in [0, 1), got {args.patch_dropout}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:  # internal: one backend, in this (fresh) process (step_workers.py)
        spec = json.loads(args.worker.read_text())  # written by run_backend
        Path(spec["result_path"]).write_text(json.dumps(run_worker(spec)))
        return {}

    cfg = replace(model_config(args.arch), patch_dropout=args.patch_dropout)  # fails fast, before any worker
    here = available_backends()
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            sys.exit(f"error: unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        missing = [b for b in backends if b not in here]
        if missing:
            sys.exit(f"error: not available on this machine: {missing} (available: {', '.join(here)})")
    else:
        backends = here
    flops = clip_flops_per_pair(cfg, args.batch)
    print(
        f"{args.arch}: {format_flops(flops['forward'])} forward per pair, "
        f"{format_flops(flops['train'] * args.batch)} per training step of {args.batch}; "
        f"backends: {', '.join(backends)}",
        flush=True,
    )
    spec = dict(
        arch=args.arch,
        batch=args.batch,
        warmup=args.warmup,
        steps=args.steps,
        gemm_size=args.gemm_size,
        gemm_reps=args.gemm_reps,
        seed=args.seed,
        mlx_streams=args.mlx_streams if args.mlx_streams == "auto" else int(args.mlx_streams),
        precision=DTYPES[args.dtype],
        patch_dropout=args.patch_dropout,
    )
    doc = {
        **record_header(SCHEMA),
        "settings": {
            **spec,
            "rounds": args.rounds,
            "backends": backends,
            "model": to_dict(cfg),
        },
        "flops": {
            "convention": "matmuls only, 2*M*N*K; dense attention; train = 3 x forward (benchmarks/flops.py)",
            "forward_per_pair": flops["forward"],
            "train_per_pair": flops["train"],
            "train_per_step": flops["train"] * args.batch,
            "per_pair_parts": {"image": flops["image"], "text": flops["text"], "logits": flops["logits"]},
        },
        "results": run_rounds(spec, backends, args.rounds, args.timeout),
    }
    add_device_mfu(doc["results"], spec["precision"])
    out = args.out or default_out()
    reports = [markdown_table(doc)]
    if (per_round := rounds_table(doc)) is not None:
        reports += ["\nEvery round (median step), and the ratios of the medians of rounds:\n", per_round]
    write_record(doc, out, *reports)
    if args.plot:
        plot(doc, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return doc


if __name__ == "__main__":
    main()
