"""`python -m mlx_clip.train`: placeholder until the training loop lands (issue 3).

Runs one forward/backward/AdamW step of `tiny` on random data, so the README's main
command exercises the whole stack (BLAS, model, loss, optimizer) end to end.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import mlx_clip  # noqa: F401  (package init already loaded the BLAS fix)

from .loss import clip_loss
from .model import create_model


def main() -> None:
    model = create_model("tiny")
    cfg = model.config
    images = mx.random.normal((8, cfg.image_size, cfg.image_size, 3))
    tokens = mx.random.randint(1, cfg.vocab_size, (8, cfg.context_length))
    opt = optim.AdamW(learning_rate=1e-3)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: clip_loss(*m(x, y)))
    for step in range(3):
        loss, grads = loss_and_grad(model, images, tokens)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        print(f"smoke step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
