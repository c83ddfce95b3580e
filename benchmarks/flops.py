"""Analytic matmul FLOPs of one CLIP image-text pair.

Convention (the usual one for MFU, as in the PaLM / nanoGPT MFU estimates):

- Only matrix products count: a (M, K) @ (K, N) product costs 2 * M * N * K FLOPs (one multiply
  and one add per MAC). LayerNorm, activations, softmax, residual adds, biases, embedding lookups
  and the optimizer are left out: they are memory-bound and a few % of the total at ViT-B sizes.
- Attention counts both products over the full (T, T) score matrix, q @ k^T and scores @ v, also
  in the causal text tower: the kernels compute the masked half too, and it is what
  `torch.utils.flop_counter` counts.
- The patch embedding (a stride-p conv) is the matmul (N, p*p*3) @ (p*p*3, W).
- Only the pooled token goes through the output projections (vision `proj`, `text_projection`).
- With model.patch_dropout, the count is a training step's: every patch is embedded, then only
  the kept ones (mlx_clip/training/patch_dropout.py num_kept) go through the image transformer and
  the attention pool.
- The contrastive logits (B, E) @ (E, B) are counted only when `batch_size` is given: 2 * B * E
  FLOPs per pair, under 0.01% of a ViT-B/32 pair at batch 32.
- train = 3 * forward: the backward pass of every matmul is two matmuls of the same size (the
  gradient w.r.t. the input and w.r.t. the weight). The one exact exception is the first layer
  of the image tower, whose input (the pixels) needs no gradient, so a framework's exact count
  is lower by one patch-embedding forward (0.5% at ViT-B/32); tests/test_benchmarks.py checks
  this against torch's FlopCounterMode.
"""

from __future__ import annotations

from mlx_clip.models.config import ModelConfig
from mlx_clip.training.patch_dropout import num_kept


def _tower(tokens: int, width: int, layers: int, mlp_hidden: int) -> dict[str, int]:
    """Matmul FLOPs of one sequence of `tokens` through `layers` pre-LN transformer blocks."""
    T, W, H = tokens, width, mlp_hidden
    return {
        "qkv": layers * 2 * T * W * 3 * W,  # (T, W) @ (W, 3W)
        "attn_scores": layers * 2 * T * T * W,  # heads * (T, hd) @ (hd, T), heads * hd = W
        "attn_av": layers * 2 * T * T * W,  # heads * (T, T) @ (T, hd)
        "out_proj": layers * 2 * T * W * W,  # (T, W) @ (W, W)
        "mlp": layers * 2 * (2 * T * W * H),  # (T, W) @ (W, H), then (T, H) @ (H, W)
    }


def _attention_pool(tokens: int, width: int, mlp_hidden: int) -> int:
    """SigLIP's attention-pooling head: one probe query attends over `tokens`, then a residual MLP."""
    T, W = tokens, width
    return 2 * W * W + 2 * T * W * 2 * W + 2 * 2 * T * W + 2 * W * W + 2 * 2 * W * mlp_hidden


def clip_flops_per_pair(cfg: ModelConfig, batch_size: int | None = None) -> dict:
    """Forward matmul FLOPs per image-text pair, by part, plus `forward` and `train` totals.

    Follows the tower options: a class token adds one token, SigLIP's attention pool (MAP) is
    counted as its own part, and a tower without projection has none.
    Returns {"image": {part: flops, ..., "total"}, "text": {...}, "logits", "forward", "train"}
    (all Python ints; `train` = 3 * `forward`, see the module docstring).
    """
    p, E = cfg.patch_size, cfg.embed_dim
    Wv, Wt = cfg.vision_width, cfg.text_width
    N = cfg.num_patches
    kept = num_kept(N, cfg.patch_dropout) if cfg.patch_dropout else N  # patch dropout: training's
    tokens = kept + (cfg.vision_pool == "cls")  # the patches (+ the class token)
    image = {
        "patch_embed": 2 * N * (p * p * 3) * Wv,
        **_tower(tokens, Wv, cfg.vision_layers, cfg.mlp_hidden("vision")),
    }
    if cfg.vision_pool == "map":
        image["attn_pool"] = _attention_pool(kept, Wv, cfg.mlp_hidden("vision"))
    image["proj"] = 2 * Wv * E if cfg.vision_proj else 0  # the pooled token only
    image["total"] = sum(image.values())
    text = {
        **_tower(cfg.context_length, Wt, cfg.text_layers, cfg.mlp_hidden("text")),
        "proj": 0 if cfg.text_proj == "none" else 2 * Wt * E,  # the pooled token only
    }
    text["total"] = sum(text.values())
    logits = 2 * batch_size * E if batch_size else 0  # this pair's row of (B, E) @ (E, B)
    forward = image["total"] + text["total"] + logits
    return {"image": image, "text": text, "logits": logits, "forward": forward, "train": 3 * forward}


def format_flops(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}FLOP"
    return f"{flops:.0f} FLOP"
