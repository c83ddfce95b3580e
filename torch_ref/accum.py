"""PyTorch mirror of mlx_clip/training/accum.py: gradient caching (GradCache) over micro-batches."""

from __future__ import annotations

import torch


def accum_backward(
    model, images: torch.Tensor, tokens: torch.Tensor, steps: int, loss_fn, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Accumulate into every parameter's .grad what `loss_fn(*model(images, tokens, keep)).backward()`
    would, running the towers on `steps` micro-batches at a time; returns the (detached) loss.
    `keep`: patch dropout's kept patches (B, K), split with the batch.

    loss_fn(image_features, text_features, logit_scale) -> scalar, e.g. torch_ref.clip_loss (it
    may use other parameters, such as a logit bias, directly). The batch must split evenly.
    """
    if images.shape[0] % steps:
        raise ValueError(f"batch {images.shape[0]} is not divisible by accum steps {steps}")
    keeps = [None] * steps if keep is None else keep.chunk(steps)
    parts = list(zip(images.chunk(steps), tokens.chunk(steps), keeps, strict=True))
    # 1. features of every micro-batch, no graph kept
    with torch.no_grad():
        outputs = [model(i, t, k) for i, t, k in parts]  # (image_features, text_features, logit_scale)
    image_features = torch.cat([o[0] for o in outputs]).requires_grad_()
    text_features = torch.cat([o[1] for o in outputs]).requires_grad_()
    # 2. the whole batch's loss on leaf features: their .grad are the cotangents. The logit scale
    # comes out of the model's forward (clamp, exp), so it is a leaf here too and its gradient
    # reaches the parameter in phase 3; parameters loss_fn reads itself get theirs now.
    scale = outputs[0][2].requires_grad_()
    del outputs
    loss = loss_fn(image_features, text_features, scale)
    loss.backward()
    b = images.shape[0] // steps
    d_image, d_text = image_features.grad.split(b), text_features.grad.split(b)
    # 3. per micro-batch: forward with graph, back-propagate its slice of the cotangents
    for k, (i, t, kept) in enumerate(parts):
        image_k, text_k, scale_k = model(i, t, kept)
        outputs, cotangents = [image_k, text_k], [d_image[k], d_text[k]]
        if k == 0 and scale_k.requires_grad:  # the scale's gradient, once (unless frozen)
            outputs.append(scale_k)
            cotangents.append(scale.grad)
        torch.autograd.backward(outputs, cotangents)
    return loss.detach()
