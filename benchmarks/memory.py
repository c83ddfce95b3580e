"""Peak memory and step time of one training step under each memory-saving setting.

    python -m benchmarks.memory [--arch vit_b32] [--batch 32] [--variants plain,accum2,...]
                                [--warmup 1] [--steps 2] [--out FILE]

Variants (config overrides on the run defaults, each measured in its own fresh process):

- plain: the fp32 step of mlx_clip.training.build.build_training (one compiled forward + backward + update);
- accum2, accum4: optim.accum_steps 2 / 4, gradient caching (mlx_clip/training/accum.py);
- grad_checkpointing: train.grad_checkpointing true (each transformer block recomputed in backward);
- bf16: train.precision bfloat16 (bf16 compute, fp32 master weights and optimizer state);
- lit, lora, qlora, lora-ckpt, qlora-ckpt (not in the default list): fine-tuning with the image
  tower locked; LoRA rank 8 on both towers (attention qkv/out and MLP, base from a saved random
  init); the same with a 4-bit base (QLoRA); either with train.grad_checkpointing;
- accum2-fused, accum4-fused (not in the default list): gradient caching with all three phases in
  ONE compiled step, in the naive order and with mx.depends forcing micro-batch order
  (`-fused-ordered`): what accum.py's separate compile boundaries are measured against.

Per variant: the model, AdamW and compiled step of mlx_clip.training.build.build_training (populated
optimizer state) and one synthetic batch (benchmarks.common.synthetic_batch) are made and evaluated first;
then mx.reset_peak_memory(), --warmup + --steps full steps (step, then mx.eval of the model /
optimizer state, loss and gradient norm, as the training loop does), and mx.get_peak_memory().
"resident" is mx.get_active_memory() just before the steps (weights, optimizer state, batch), so
peak - resident is what the step itself allocates (activations, gradients, temporaries). Also the
process peak RSS, the median time of the --steps timed steps and how much CPU other processes
used meanwhile (benchmarks.common.contention).

The JSON goes to benchmarks/results/<host>-memory-<UTC date and time>.json (or --out); a markdown
table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Importing mlx_clip (any submodule) loads OpenBLAS for MLX on Linux, before anything imports mlx.core.
from mlx_clip.models.config import model_config
from mlx_clip.schema import to_dict

from .common import (
    RESULTS_DIR,
    machine_info,
    peak_rss_bytes,
    record_header,
    run_in_worker,
    synthetic_batch,
    write_record,
)
from .step_workers import log

SCHEMA = "mlx_clip.memory/1"
LORA = [
    ("finetune.lora.enabled", "true"),
    ("finetune.lora.rank", "8"),
    ("finetune.lora.targets", "[attn_qkv, attn_out, mlp]"),
]
VARIANTS = {
    "plain": [],
    "accum2": [("optim.accum_steps", "2")],
    "accum4": [("optim.accum_steps", "4")],
    "grad_checkpointing": [("train.grad_checkpointing", "true")],
    "bf16": [("train.precision", "bfloat16")],
    "accum2-fused": [("optim.accum_steps", "2")],
    "accum4-fused": [("optim.accum_steps", "4")],
    "accum2-fused-ordered": [("optim.accum_steps", "2")],
    "accum4-fused-ordered": [("optim.accum_steps", "4")],
    # Fine-tuning (issue 16): LiT, LoRA rank 8 on both towers, QLoRA with a 4-bit base. LoRA needs a
    # base file: the worker saves the random-init model's weights first (model.init_from).
    "lit": [("optim.lock_image", "true")],
    "lora": LORA,
    "qlora": [*LORA, ("finetune.quantize_base", "4")],
    "lora-ckpt": [*LORA, ("train.grad_checkpointing", "true")],
    "qlora-ckpt": [*LORA, ("finetune.quantize_base", "4"), ("train.grad_checkpointing", "true")],
}
DEFAULT_VARIANTS = ("plain", "accum2", "accum4", "grad_checkpointing", "bf16")


# ---------------------------------------------------------------------------
# Worker: one variant, in this (fresh) process


def fused_accum_step(model, optimizer, cfg, ordered: bool):
    """Gradient caching as ONE compiled step over the model / optimizer state, for comparison.

    ordered=False leaves the order of the K micro-batches' work to MLX's scheduler; ordered=True
    makes each micro-batch's inputs depend (mx.depends) on the previous one's gradients, so its
    recomputed forward cannot start before they are done. Same values as accum.py's step.
    """
    from functools import partial

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_clip.training.accum import accum_phases, add_head_grads
    from mlx_clip.training.build import make_loss_parts, make_update

    k = cfg.optim.accum_steps
    features, loss_and_cotangents, micro_grads = accum_phases(model, *make_loss_parts(cfg))
    finish = make_update(model, optimizer, cfg)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(images, tokens):
        b = images.shape[0] // k
        parts = [slice(i * b, (i + 1) * b) for i in range(k)]
        feats = [features(images[rows], tokens[rows]) for rows in parts]
        loss, head_grads, d_image, d_text = loss_and_cotangents(
            mx.concatenate([f[0] for f in feats]), mx.concatenate([f[1] for f in feats])
        )
        grads = None
        for rows in parts:
            x, t = images[rows], tokens[rows]
            if ordered and grads is not None:
                x, t = mx.depends([x, t], [g for _, g in tree_flatten(grads)])
            g = micro_grads(x, t, d_image[rows], d_text[rows])
            grads = g if grads is None else tree_map(mx.add, grads, g)
        return finish(loss, add_head_grads(grads, head_grads))

    return step, state


def _base_weights(spec: dict) -> str:
    """A LoRA variant's base: the architecture at random init, saved to a temporary weights file
    (build_training loads it before the peak is reset, so loading does not count)."""
    import mlx_clip
    from mlx_clip.models.weights import save_weights

    path = Path(tempfile.mkdtemp()) / "base.safetensors"
    base = mlx_clip.create_model(spec["arch"], seed=spec["seed"])
    save_weights(base, path)
    del base
    return str(path)


def _measure(spec: dict) -> dict:
    import mlx.core as mx  # after mlx_clip (imported above): OpenBLAS is bound first
    from mlx.utils import tree_flatten

    from mlx_clip.config import load_config
    from mlx_clip.models import streams
    from mlx_clip.training.build import build_training

    from .step_workers import _blas_info, _time_steps

    variant = spec["variant"]
    overrides = [("model.arch", spec["arch"]), ("data.batch_size", str(spec["batch"])), *VARIANTS[variant]]
    overrides += [("train.seed", str(spec["seed"])), ("train.steps", str(spec["warmup"] + spec["steps"]))]
    if any(key == "finetune.lora.enabled" for key, _ in VARIANTS[variant]):
        overrides.append(("model.init_from", _base_weights(spec)))
    cfg = load_config(None, overrides)
    mcfg = cfg.model_config()
    # The run's own step, on train.streams' streams (the process-wide settings stay MLX's defaults,
    # as in the measurements in RESULTS.md).
    training = build_training(cfg, n_streams=streams.resolve(cfg.train.streams))
    model, step_fn, state = training.model, training.step, training.state
    if "fused" in variant:
        step_fn, state = fused_accum_step(
            model, training.optimizer, cfg, ordered=variant.endswith("-ordered")
        )
    images_np, tokens_np = synthetic_batch(mcfg, spec["batch"], spec["seed"])
    images, tokens = mx.array(images_np), mx.array(tokens_np)
    mx.eval(images, tokens, state)
    resident = mx.get_active_memory()
    mx.reset_peak_memory()

    def step():
        loss, grad_norm = step_fn(images, tokens)
        mx.eval(state, loss, grad_norm)  # the whole update, as the training loop does it
        return loss

    times, losses, load = _time_steps(step, lambda: None, spec["warmup"], spec["steps"], variant)
    peak = mx.get_peak_memory()
    return {
        "blas": _blas_info(),
        "num_params": sum(v.size for _, v in tree_flatten(model.parameters())),
        "resident_bytes": resident,
        "peak_memory_bytes": peak,
        "step_peak_bytes": peak - resident,
        "peak_rss_bytes": peak_rss_bytes(),
        "step_times_s": times,
        "median_step_s": statistics.median(times),
        "losses": [x.item() for x in losses],
        "contention": load,
    }


def run_worker(spec: dict) -> dict:
    """Measure one variant in this process; the result carries `error` instead of numbers on failure."""
    out = {"variant": spec["variant"], "overrides": [list(o) for o in VARIANTS[spec["variant"]]]}
    out["load_avg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        out.update(_measure(spec))
        out["loss_finite"] = all(math.isfinite(x) for x in out["losses"])
    except Exception as e:  # recorded, so that one failing variant does not hide the others
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------
# Parent side: one subprocess per variant, then the JSON and the table


def run_variant(spec: dict, timeout: float | None) -> dict:
    variant = spec["variant"]
    log(variant, "starting worker")
    return run_in_worker("benchmarks.memory", spec, {"variant": variant}, timeout)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown_table(doc: dict) -> str:
    results = doc["results"]
    base = next((r for r in results if r["variant"] == "plain" and "error" not in r), None)
    head = [
        "variant",
        "peak MiB (mx)",
        "vs plain",
        "step's own MiB (peak - resident)",
        "vs plain",
        "peak RSS MiB",
        "median step s",
        "time vs plain",
        "others' CPU",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def versus(value: float, ref: float | None) -> str:
        return "-" if ref is None or ref == 0 else f"{100 * (value / ref - 1):+.0f}%"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        row = [
            r["variant"],
            _mib(r["peak_memory_bytes"]),
            versus(r["peak_memory_bytes"], base and base["peak_memory_bytes"]),
            _mib(r["step_peak_bytes"]),
            versus(r["step_peak_bytes"], base and base["step_peak_bytes"]),
            _mib(r["peak_rss_bytes"]),
            f"{r['median_step_s']:,.3f}",
            versus(r["median_step_s"], base and base["median_step_s"]),
            "-" if not r.get("contention") else f"{100 * r['contention']['others_share']:.0f}%",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_out() -> Path:
    host = machine_info()["host"].split(".")[0]
    return RESULTS_DIR / f"{host}-memory-{time.strftime('%Y-%m-%d-%H%M%S', time.gmtime())}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_b32", help="architecture name or model YAML (default vit_b32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per variant (default 3600)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--batch must be >= 2, --steps >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:  # internal: one variant, in this (fresh) process
        spec = json.loads(args.worker.read_text())  # written by run_variant
        Path(spec["result_path"]).write_text(json.dumps(run_worker(spec)))
        return {}

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    cfg = model_config(args.arch)  # fails fast, before any worker starts
    for v in variants:
        k = dict(VARIANTS[v]).get("optim.accum_steps")
        if k and args.batch % int(k):
            sys.exit(f"error: --batch {args.batch} is not divisible by the accum steps of {v} ({k})")
    spec = dict(arch=args.arch, batch=args.batch, warmup=args.warmup, steps=args.steps, seed=args.seed)
    doc = {
        **record_header(SCHEMA),
        "settings": {**spec, "variants": variants, "model": to_dict(cfg)},
        "results": [run_variant({**spec, "variant": v}, args.timeout) for v in variants],
    }
    out = args.out or default_out()
    write_record(doc, out, markdown_table(doc))
    return doc


if __name__ == "__main__":
    main()
