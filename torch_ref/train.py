"""`python -m torch_ref.train`: the same run as `python -m mlx_clip.train`, in PyTorch.

Same config, CLI, tokenizer, batches (mlx_clip.data.run_data), schedule, weight-decay groups,
gradient clipping and metrics, on cpu, mps or cuda (`--device`, default: best available).
It writes config.yaml, metrics.jsonl, summary.json and model.safetensors (canonical keys).
Resume is not supported here; it is the reference path, not the product.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mlx_clip  # noqa: F401  (BLAS fix before anything imports mlx.core via mlx.data)
from mlx_clip.config import config_to_yaml, load_config
from mlx_clip.data.run_data import build_run_data
from mlx_clip.evaluation.metrics import evaluate_run
from mlx_clip.models.locate import resolve_init
from mlx_clip.run_args import parse_args
from mlx_clip.schema import ConfigError
from mlx_clip.training.optim_rules import decays, is_locked, lr_at, param_lr
from mlx_clip.training.patch_dropout import patch_dropout
from mlx_clip.training.temperature import Temperature

from .accum import accum_backward
from .lora import apply_lora
from .loss import contrastive_loss
from .model import LOGIT_SCALE_MAX, create_model
from .weights import load_weights, save_weights


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """The MLX grouping: (tower x layer-wise learning rate) x (decay or not); locked parameters get
    no gradient."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or is_locked(name, cfg, model.config):  # (LoRA froze it already)
            p.requires_grad_(False)
            continue
        # torch keeps the conv as (out, in, kh, kw): 4-D either way, so the rule is the same
        groups.setdefault((param_lr(name, cfg, model.config), decays(name, p.ndim)), []).append(p)
    return [
        {"params": ps, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (lr, decay), ps in groups.items()
    ]


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous().to(device)  # NHWC -> NCHW
    return images, torch.from_numpy(batch["tokens"]).long().to(device)


def check_mirrored(cfg) -> None:
    """The MLX trainer's options this reference path does not mirror: refused, not ignored."""
    if cfg.optim.optimizer != "adamw" or cfg.train.ema_decay or cfg.eval.use_ema:
        raise ConfigError(
            "torch_ref.train mirrors AdamW without an EMA: run it with optim.optimizer adamw and "
            "train.ema_decay 0 (the schedules and layer-wise decay are mirrored)"
        )
    if cfg.loss.distill.enabled:
        raise ConfigError(
            "torch_ref.train does not mirror loss.distill (only its loss is mirrored, in torch_ref/loss.py): "
            "train with python -m mlx_clip.train, or drop loss.distill.embeddings"
        )
    if cfg.data.resolution_schedule is not None:
        raise ConfigError(
            f"torch_ref.train trains at the model's image size only: data.resolution_schedule "
            f"{cfg.data.resolution_schedule} is not mirrored; set it to null (mlx_clip.train has it)"
        )


def train(cfg, out: Path, device: str | None = None) -> dict:
    check_mirrored(cfg)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = cfg.model_config()
    t0 = time.perf_counter()
    init_weights, init_tokenizer = resolve_init(cfg.model.init_from)
    data = build_run_data(cfg, mcfg, tokenizer_dir=init_tokenizer)
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    model = create_model(mcfg, seed=cfg.train.seed, device=device)
    dev = next(model.parameters()).device
    if init_weights:
        load_weights(model, init_weights)
    if cfg.finetune.lora.enabled:  # adapters on the loaded base, which they freeze (torch_ref/lora.py)
        if cfg.finetune.bits is not None:
            raise ValueError("torch_ref trains LoRA on a float base only: set finetune.quantize_base none")
        apply_lora(model, cfg.finetune.lora, seed=cfg.train.seed)
        model.to(dev)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    temperature = Temperature(cfg.loss.temperature, cfg.train.steps)
    if not temperature.learnable:  # the schedule writes logit_scale before every step
        model.logit_scale.requires_grad_(False)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bfloat16")

    def loss_fn(image_features, text_features, logit_scale):
        bias = getattr(model, "logit_bias", None)
        return contrastive_loss(cfg.loss, image_features.float(), text_features.float(), logit_scale, bias)

    def forward(images, tokens, keep):
        with autocast:
            return model(images, tokens, keep)

    dropout = patch_dropout(mcfg, cfg.train.seed)  # the MLX trainer's draw (one process)

    def kept_patches(images, step):  # None without patch dropout
        if dropout is None:
            return None
        B, _, H, W = images.shape
        return torch.from_numpy(dropout.keep(step, B, H, W)).to(images.device)

    print(f"torch_ref on {dev}; data: {data.describe()}", flush=True)

    o = cfg.optim
    total = cfg.train.steps
    opt = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    # lr_at(s) / lr multiplies each group's own base rate, as the MLX schedule does
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, total) / o.lr)

    def encode(fn, x):
        with torch.no_grad():
            return fn(x).float().cpu().numpy()

    def evaluate() -> dict:
        model.eval()
        metrics = evaluate_run(
            data,
            encode_image=lambda im: encode(
                model.encode_image, torch.from_numpy(im).permute(0, 3, 1, 2).to(dev)
            ),
            encode_text=lambda tok: encode(model.encode_text, torch.from_numpy(tok).long().to(dev)),
        )
        if "val" in data.evals:
            with torch.no_grad():
                losses = [
                    (loss_fn(*model(*to_device({"images": im, "tokens": tok}, dev))).item(), len(tok))
                    for im, tok in data.val_pairs()
                ]
            metrics["val_loss"] = float(np.average([x for x, _ in losses], weights=[n for _, n in losses]))
        if temperature.observe(metrics.get("val_loss", math.nan)):
            print(f"val loss plateaued: temperature lowered to {temperature.tau:.4g}")
        model.train()
        return metrics

    log = open(out / "metrics.jsonl", "w")

    def logged_eval(step: int) -> dict:
        """evaluate(), written as an eval record with its timing fields, as mlx_clip's loop writes it."""
        started = time.perf_counter()
        metrics = evaluate()
        timing = {"elapsed_s": round(started - t0, 3), "eval_s": round(time.perf_counter() - started, 3)}
        log.write(json.dumps({"event": "eval", "step": step, **metrics, **timing}) + "\n")
        return metrics

    step, epoch = 0, 0
    window_t, window_n = time.perf_counter(), 0
    while step < total:
        for batch in data.train.epoch(epoch):
            images, tokens = to_device(batch, dev)
            if not temperature.learnable:
                with torch.no_grad():
                    model.logit_scale.fill_(temperature.logit_scale_param(step))
            tau = math.exp(-min(model.logit_scale.item(), LOGIT_SCALE_MAX))  # the one this step uses
            opt.zero_grad(set_to_none=True)
            keep = kept_patches(images, step)
            if o.accum_steps > 1:
                with autocast:  # (casts the towers' forward ops; loss_fn works in float32)
                    loss = accum_backward(model, images, tokens, o.accum_steps, loss_fn, keep)
            else:
                loss = loss_fn(*forward(images, tokens, keep))
                loss.backward()
            log.write(json.dumps({"event": "temperature", "step": step + 1, "temperature": tau}) + "\n")
            if o.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            else:
                grad_norm = torch.sqrt(
                    sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)
                )
            lr = lr_at(step, o, total)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            step += 1
            window_n += len(tokens)
            if step % cfg.train.log_every == 0 or step == total:
                now = time.perf_counter()
                record = {
                    "event": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": loss.item(),
                    "lr": lr,
                    "img_per_s": window_n / (now - window_t),
                    "grad_norm": float(grad_norm),
                    "logit_scale": math.exp(model.logit_scale.item()),
                    "temperature": tau,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if cfg.train.progress:
                    rate = record["img_per_s"]
                    print(f"step {step}/{total} loss {record['loss']:.4f} lr {lr:.2e} {rate:.0f} img/s")
                window_t, window_n = now, 0
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                logged_eval(step)
            if step >= total:
                break
        epoch += 1
    metrics = logged_eval(step)
    log.close()
    save_weights(model, out / "model.safetensors")
    data.tokenizer.save(out)
    summary = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "device": str(dev), **metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    device = None
    if "--device" in argv:
        i = argv.index("--device")
        device = argv[i + 1]
        del argv[i : i + 2]
    args, overrides = parse_args(argv)
    if args.resume or args.stop_after:
        sys.exit("error: torch_ref.train does not support --resume / --stop-after")
    out = Path(args.out) if args.out else Path("runs") / ("torch-" + time.strftime("%Y%m%d-%H%M%S"))
    try:
        cfg = load_config(args.config, overrides)
        check_mirrored(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    summary = train(cfg, out, device=device)
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith(("R@5", "R@10"))}, indent=1))
    return summary


if __name__ == "__main__":
    main()
