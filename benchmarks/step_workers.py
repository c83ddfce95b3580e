"""One backend's training-step measurement, run inside its own worker process.

`python -m benchmarks.train_throughput` starts one process per backend; each calls `run_worker`,
which times the full training step in spec["precision"] (float32, or bfloat16 mixed precision;
see train_throughput's docstring for what a step is), then measures the fp32 (and bf16) GEMM peak
with the same framework on the same device.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace

# Importing mlx_clip (any submodule) loads OpenBLAS for MLX on Linux, before anything imports mlx.core.
from mlx_clip.models.config import model_config
from mlx_clip.training.patch_dropout import patch_dropout

from .common import contention, cpu_has_native_bf16, cpu_snapshot, peak_rss_bytes, synthetic_batch
from .flops import clip_flops_per_pair

TIMED_WINDOW: list[float] = []  # [start, end] of the last _time_steps' timed steps, time.monotonic()


def log(backend: str, msg: str) -> None:
    print(f"[{backend}] {msg}", file=sys.stderr, flush=True)


def _time_steps(step, sync, warmup: int, steps: int, backend: str) -> tuple[list[float], list, dict | None]:
    """Run warmup + steps calls of `step` (which must finish the work, sync included); time the last.

    Also returns how much CPU other processes used while the timed steps ran (common.contention).
    The timed steps' window on the monotonic clock is kept in TIMED_WINDOW (run_worker records it:
    benchmarks/cpu_profile.py keeps the `perf` samples inside it).
    """
    times, outputs, before = [], [], None
    for i in range(warmup + steps):
        if i == warmup:
            before = cpu_snapshot()
            TIMED_WINDOW[:] = [time.monotonic()]
        t0 = time.perf_counter()
        out = step()
        sync()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            outputs.append(out)
        log(backend, f"{'warm-up' if i < warmup else 'step'} {i + 1}/{warmup + steps}: {dt * 1e3:.1f} ms")
    TIMED_WINDOW.append(time.monotonic())
    return times, outputs, contention(before, cpu_snapshot())


def _gemm_peak(matmul, sync, n: int, reps: int) -> float:
    """Best-of-`reps` FLOP/s of one n x n x n matmul (after one untimed call)."""
    matmul()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _blas_info() -> dict:
    """Which BLAS MLX's CPU matmuls use here, and with how many threads (OpenBLAS default: all cores).

    The MLX step sets it as a training run does (mlx_clip.models.streams.setup_process), with
    train.deterministic off: one thread per stream with several streams, else OpenBLAS's default.
    """
    from mlx_clip import _blas

    threads = _blas.get_threads()
    return {"library": _blas.status.get("loaded"), "reason": _blas.status.get("reason"), "threads": threads}


def _bf16_peak_wanted(spec: dict) -> bool:
    """On a CPU the bf16 GEMM peak is measured where it multiplies bf16 natively, or where it is the
    MFU's yardstick (a bf16 step): then it is what it is, however slow."""
    return spec.get("precision", "float32") == "bfloat16" or cpu_has_native_bf16()


def _mlx_worker(spec: dict, cfg) -> dict:
    import mlx.core as mx  # after mlx_clip (imported above): OpenBLAS is bound first
    from mlx.utils import tree_flatten

    from mlx_clip import _blas
    from mlx_clip.config import Config
    from mlx_clip.models import streams
    from mlx_clip.training.build import build_training

    backend = spec["backend"]
    device = mx.gpu if backend == "mlx-gpu" else mx.cpu
    mx.set_default_device(device)
    run = Config()  # the run defaults: AdamW 0.9/0.98/1e-6, wd 0.2, grad clip 1.0, no label smoothing
    run.train.deterministic = False  # (1 OpenBLAS thread for bit-reproducibility is a run's choice)
    run.train.seed, run.train.steps = spec["seed"], spec["warmup"] + spec["steps"]
    # bfloat16: the run's own mixed precision (bf16 towers, fp32 master weights and AdamW state)
    run.train.precision = spec.get("precision", "float32")
    n_streams = streams.resolve(spec.get("mlx_streams", "auto"), device)
    default_threads = _blas_info()["threads"]
    streams.setup_process(n_streams, run.train.grad_checkpointing, run.train.deterministic)
    training = build_training(run, n_streams=n_streams, mcfg=cfg)  # exactly the step a run trains
    state, model = training.state, training.model
    images_np, tokens_np = synthetic_batch(cfg, spec["batch"], spec["seed"])
    images, tokens = mx.array(images_np), mx.array(tokens_np)
    mx.eval(images, tokens)
    count = itertools.count()

    def step():  # (with model.patch_dropout, run_step draws the step's kept patches, as in a run)
        loss, grad_norm = training.run_step(images, tokens, next(count))
        mx.eval(state, loss, grad_norm)  # the whole update, as the training loop does it
        return loss

    times, losses, load = _time_steps(step, lambda: None, spec["warmup"], spec["steps"], backend)
    peak = mx.get_peak_memory()
    result = {
        "blas": _blas_info(),
        "streams": n_streams,
        "device_name": str(mx.device_info().get("device_name", device)) if backend == "mlx-gpu" else "cpu",
        "num_params": sum(v.size for _, v in tree_flatten(model.parameters())),
        "losses": [x.item() for x in losses],
        "contention": load,
        "peak_memory_bytes": peak if peak > 0 else peak_rss_bytes(),
        "peak_memory_source": "mx.get_peak_memory" if peak > 0 else "peak RSS (VmHWM / getrusage)",
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if backend == "mlx-gpu":  # MLX_ENABLE_TF32 (default on): fp32 matmuls as TF32
        result["tf32"] = os.environ.get("MLX_ENABLE_TF32", "1") != "0"

    if default_threads:  # the device's GEMM peak: OpenBLAS on all its threads again
        _blas.set_threads(default_threads)
    n, peaks, before = spec["gemm_size"], {}, cpu_snapshot()
    for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
        if name == "bfloat16" and backend == "mlx-cpu" and not _bf16_peak_wanted(spec):
            peaks[name] = None
            continue
        a, b = (mx.random.normal((n, n)).astype(dtype) for _ in range(2))
        mx.eval(a, b)
        peaks[name] = _gemm_peak(lambda a=a, b=b: mx.eval(a @ b), lambda: None, n, spec["gemm_reps"])
    result["gemm_contention"] = contention(before, cpu_snapshot())
    return {**result, "step_times_s": times, "gemm_peak_flops": peaks}


def _torch_worker(spec: dict, cfg) -> dict:
    import torch

    from mlx_clip.config import Config
    from mlx_clip.training.optim_rules import decays, lr_at

    backend = spec["backend"]
    framework, dev = backend.rsplit("-", 1)
    device = torch.device(dev)
    torch.manual_seed(spec["seed"])
    if framework == "torch_ref":
        import torch_ref

        model = torch_ref.create_model(cfg, seed=spec["seed"], device=device)
        loss_fn = torch_ref.clip_loss
    else:
        import open_clip

        from mlx_clip.interop.open_clip import open_clip_cfg

        oc = open_clip_cfg(cfg)
        oc["vision_cfg"]["patch_dropout"] = cfg.patch_dropout  # open_clip's own PatchDropout draws
        model = open_clip.model.CLIP(**oc).to(device)
        loss_fn = open_clip.loss.ClipLoss()
    model.train()
    o = Config().optim
    groups: dict[bool, list] = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[decays(name, p.ndim)].append(p)
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(
        [
            {"params": groups[True], "weight_decay": o.weight_decay},
            {"params": groups[False], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    total = spec["warmup"] + spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, total) / o.lr)
    images_np, tokens_np = synthetic_batch(cfg, spec["batch"], spec["seed"])
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(device)  # NHWC -> NCHW
    tokens = torch.from_numpy(tokens_np).long().to(device)
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(dev, lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # bfloat16: autocast around forward and loss, as open_clip's trainer does (fp32 weights, AdamW)
    if spec.get("precision", "float32") == "bfloat16":
        autocast = lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    dropout, count = patch_dropout(cfg, spec["seed"]), itertools.count()  # torch_ref: our draw

    def step():
        inputs = (images, tokens)
        if dropout is not None and framework == "torch_ref":
            keep = dropout.keep(next(count), len(images), *images.shape[2:])  # (B, 3, H, W) images
            inputs = (images, tokens, torch.from_numpy(keep).to(device))
        with autocast():
            loss = loss_fn(*model(*inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        return loss.detach()

    times, losses, load = _time_steps(step, sync, spec["warmup"], spec["steps"], backend)
    result = {
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else dev,
        "num_params": sum(p.numel() for p in model.parameters()),
        "losses": [float(x) for x in losses],
        "contention": load,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if dev == "cuda":
        result.update(
            peak_memory_bytes=torch.cuda.max_memory_allocated(),
            peak_memory_source="torch.cuda.max_memory_allocated",
            tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        result.update(peak_memory_bytes=peak_rss_bytes(), peak_memory_source="peak RSS (VmHWM / getrusage)")

    n, peaks, before = spec["gemm_size"], {}, cpu_snapshot()
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if name == "bfloat16" and dev == "cpu" and not _bf16_peak_wanted(spec):
            peaks[name] = None
            continue
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        peaks[name] = _gemm_peak(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), sync, n, spec["gemm_reps"])
    result["gemm_contention"] = contention(before, cpu_snapshot())
    return {**result, "step_times_s": times, "gemm_peak_flops": peaks}


def run_worker(spec: dict) -> dict:
    """Measure one backend in this process; the result carries `error` instead of numbers on failure."""
    backend = spec["backend"]
    out = {"backend": backend, "framework": backend.rsplit("-", 1)[0], "device": backend.rsplit("-", 1)[1]}
    # Other work on the machine skews every number: record the load average as the worker starts.
    out["load_avg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        cfg = replace(model_config(spec["arch"]), patch_dropout=spec.get("patch_dropout", 0.0))
        t0 = time.perf_counter()
        worker = _mlx_worker if backend.startswith("mlx-") else _torch_worker
        res = worker(spec, cfg)
        times = res["step_times_s"]
        median = statistics.median(times)
        model_flops = clip_flops_per_pair(cfg, spec["batch"])["train"] * spec["batch"]
        peak = res["gemm_peak_flops"][spec.get("precision", "float32")]  # the step's own dtype
        out.update(res)
        out.update(
            median_step_s=median,
            min_step_s=min(times),
            max_step_s=max(times),
            images_per_s=spec["batch"] / median,
            model_flops_per_step=model_flops,
            achieved_flops=model_flops / median,
            mfu=model_flops / median / peak,
            loss_finite=all(math.isfinite(x) for x in res["losses"]),
            wall_s=time.perf_counter() - t0,
            timed_window_monotonic_s=list(TIMED_WINDOW),
        )
    except Exception as e:  # recorded, so that one broken backend does not hide the others
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    return out
