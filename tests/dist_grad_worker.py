"""Gradients of one batch, saved per rank: run by tests/test_distributed.py.

    python tests/dist_grad_worker.py OUT                                  # one process, the whole batch
    mlx.launch -n 2 --backend ring python tests/dist_grad_worker.py OUT   # each rank its half

For each variant of VARIANTS: the clip loss `global` (every rank computes the whole loss), `local`
(loss.local_loss) and `naive` (the global loss through MLX's plain all_gather, whose VJP does not
sum over the ranks: wrong on purpose, to show the test can tell), then the other loss types, global
and local, each rank writes OUT/{variant}_rank{R}_of{W}.safetensors with its loss and averaged
gradients, exactly as the trainer's compiled step would use them.
"""

# ruff: noqa: I001  (mlx_clip must be imported before mlx.core: it picks the BLAS on Linux)
import sys
from pathlib import Path

import mlx_clip  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_clip.training import loss as loss_mod
from mlx_clip.config import load_config
from mlx_clip.training.distributed import init_world
from mlx_clip.models.model import create_model
from mlx_clip.training.build import make_grad_fn

BATCH = 8  # the global batch
ARCH = [
    ("model.image_size", "16"), ("model.patch_size", "8"), ("model.vision_width", "32"),
    ("model.vision_heads", "2"), ("model.vision_layers", "2"), ("model.text_width", "32"),
    ("model.text_heads", "2"), ("model.text_layers", "2"), ("model.context_length", "8"),
    ("model.vocab_size", "64"), ("model.embed_dim", "16"),
]  # fmt: skip


def batch(cfg) -> tuple[np.ndarray, np.ndarray]:
    """A fixed global batch: random images, token rows ending in EOT (the largest id)."""
    m = cfg.model_config()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, m.image_size, m.image_size, 3)).astype(np.float32)
    tokens = np.zeros((BATCH, m.context_length), np.int32)
    for i in range(BATCH):
        n = int(rng.integers(1, m.context_length - 1))
        tokens[i, :n] = rng.integers(1, m.vocab_size - 1, size=n)
        tokens[i, n] = m.vocab_size - 1
    return images, tokens


# name -> loss-section overrides; "naive" swaps the gather
HARD = [
    ("loss.type", "hard_negative"),
    ("loss.strategy", "hard"),
    ("loss.ratio", "0.3"),
    ("loss.weight", "2"),
]
VARIANTS = {
    "global": [],
    "local": [("loss.local_loss", "true")],
    "naive": [],
    "siglip_global": [("loss.type", "siglip")],
    "siglip_local": [("loss.type", "siglip"), ("loss.local_loss", "true")],
    "hard_negative_global": HARD,
    "hard_negative_local": [*HARD, ("loss.local_loss", "true")],
}


def naive_gather(x, group):
    """MLX's all_gather as is: its VJP is this rank's slice of its own cotangent, no sum over ranks."""
    return mx.distributed.all_gather(x, group=group)


def main(out: Path) -> None:
    world = init_world(timeout=60)
    gather = loss_mod.gather_with_grad
    for variant, overrides in VARIANTS.items():
        cfg = load_config(None, [*ARCH, *overrides])
        loss_mod.gather_with_grad = naive_gather if variant == "naive" else gather
        model = create_model(cfg.model_config(), seed=0)
        images, tokens = batch(cfg)
        b = BATCH // world.size
        rows = slice(world.rank * b, (world.rank + 1) * b)  # this rank's contiguous part
        with world.guard(f"computing the {variant} gradients"):
            loss, grads = make_grad_fn(model, cfg, world)(mx.array(images[rows]), mx.array(tokens[rows]))
            mx.eval(loss, grads)
        arrays = {f"grad.{k}": v for k, v in tree_flatten(grads)} | {"loss": loss}
        name = f"{variant}_rank{world.rank}_of{world.size}.safetensors"
        mx.save_safetensors(str(out / name), arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
