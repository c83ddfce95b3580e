"""Gradient caching (GradCache; open_clip's --accum-freq): one contrastive batch in micro-batches.

A contrastive loss couples every pair of the batch, so it cannot be summed over micro-batches
the way a per-sample loss can. It only touches the towers through the features, though, so

    dL/dθ = Σ_k (∂f_k/∂θ)ᵀ · dL/df_k  (+ the loss's own parameters: logit scale and bias)

and the step runs in three phases, each over one micro-batch of B/K pairs at a time:

1. features of every micro-batch, forward only (no graph kept for backprop);
2. the loss of the whole batch's features, and its gradient w.r.t. those features (the
   "cotangents", (B, E) each) and w.r.t. the loss's own parameters;
3. per micro-batch, the forward again with gradients, back-propagating its slice of the
   cotangents; the parameter gradients are summed over the micro-batches.

Same gradients as the whole batch (up to float rounding), for about one extra forward pass,
with the activations of one micro-batch alive at a time instead of all B.

Compile boundaries. In one compiled graph holding all K micro-batches, MLX's scheduler does not
finish (and free) one micro-batch's backward before starting the next one's forward, so most of
the saving is lost. benchmarks/memory.py compares the memory a step allocates beyond weights,
optimizer state and batch for a plain step, one compiled graph, one graph ordered with
mx.depends, and separate pieces (as here); measured: benchmarks/RESULTS.md#memory.

Separate pieces use the least memory, and ran as fast as the ordered graph, without depending on
how the scheduler treats mx.depends. So each phase is its own compiled function and the host
evaluates between them; only
the update (`finish`) is compiled with the model / optimizer state as inputs and outputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

# The top-level modules that produce the features; every other trainable parameter (the logit
# scale, SigLIP's bias) belongs to the loss and is differentiated in phase 2.
TOWERS = ("visual", "text")


@contextmanager
def _parameters_kept(model: nn.Module):
    """Put the model's own arrays back after a transform swapped tracers in.

    nn.value_and_grad leaves its tracers in the model. Inside an mx.compile whose outputs do not
    include the model state, they would outlive the trace and poison the next call.
    """
    saved = model.parameters()
    try:
        yield
    finally:
        model.update(saved)


def _head_parameters(model: nn.Module) -> dict:
    return {k: v for k, v in model.trainable_parameters().items() if k not in TOWERS}


def add_head_grads(grads: dict, head_grads: dict) -> dict:
    """Phase 3's gradients (zero for the loss's own parameters) plus phase 2's for those."""
    return {k: tree_map(mx.add, v, head_grads[k]) if k in head_grads else v for k, v in grads.items()}


def accum_phases(model: nn.Module, encode, features_loss):
    """The three phases as plain (uncompiled, traceable) functions of one micro-batch each:

    features(images, tokens, keep=None) -> (image_features, text_features), with no gradient path;
    loss_and_cotangents(image_features, text_features) -> (loss, head_grads, d_image, d_text);
    micro_grads(images, tokens, d_image, d_text, keep=None) -> gradients of every trainable
        parameter of Σ features · cotangents, i.e. this micro-batch's share of dL/dθ through the towers.
    `keep`: the micro-batch's rows of patch dropout's kept patches (B, K).
    """

    def features(images, tokens, keep=None):
        return tuple(mx.stop_gradient(f) for f in encode(model, images, tokens, keep))

    def loss_and_cotangents(image_features, text_features):
        def loss_fn(head, image_features, text_features):
            model.update(head)
            return features_loss(model, image_features, text_features)

        with _parameters_kept(model):
            grad_fn = mx.value_and_grad(loss_fn, argnums=(0, 1, 2))
            head = _head_parameters(model)
            loss, (head_grads, d_image, d_text) = grad_fn(head, image_features, text_features)
        return loss, head_grads, d_image, d_text

    def micro_grads(images, tokens, d_image, d_text, keep=None):
        # A surrogate whose gradient w.r.t. θ is (∂f/∂θ)ᵀ · cotangent (the cotangents are constants).
        def surrogate(model):
            image_features, text_features = encode(model, images, tokens, keep)
            return mx.sum(image_features * d_image) + mx.sum(text_features * d_text)

        with _parameters_kept(model):
            _, grads = nn.value_and_grad(model, surrogate)(model)
        return grads

    return features, loss_and_cotangents, micro_grads


def make_accum_grad_fn(model: nn.Module, steps: int, encode, features_loss):
    """(images, tokens, keep=None) -> (loss, gradients of the trainable parameters) of the whole
    batch, computed `steps` micro-batches at a time; the host evaluates after every micro-batch."""
    features, loss_and_cotangents, micro_grads = accum_phases(model, encode, features_loss)
    params = [model.state]  # read, not written: the weights are inputs, never baked-in constants
    features = mx.compile(features, inputs=params)
    loss_and_cotangents = mx.compile(loss_and_cotangents, inputs=params)
    first_grads = mx.compile(micro_grads, inputs=params)

    @partial(mx.compile, inputs=params)
    def add_grads(images, tokens, d_image, d_text, keep, acc):  # the sum stays inside the compiled graph
        return tree_map(mx.add, acc, micro_grads(images, tokens, d_image, d_text, keep))

    def loss_and_grads(images, tokens, keep=None):
        if images.shape[0] % steps:
            raise ValueError(f"batch {images.shape[0]} is not divisible by optim.accum_steps={steps}")
        b = images.shape[0] // steps
        parts = [slice(k * b, (k + 1) * b) for k in range(steps)]
        image_features, text_features = [], []
        micro_keep = [None if keep is None else keep[rows] for rows in parts]
        for rows, k in zip(parts, micro_keep, strict=True):  # phase 1
            fi, ft = features(images[rows], tokens[rows], k)
            mx.eval(fi, ft)
            image_features.append(fi)
            text_features.append(ft)
        # phase 2: (B, E) features -> loss, (B, E) cotangents, gradients of scale / bias
        loss, head_grads, d_image, d_text = loss_and_cotangents(
            mx.concatenate(image_features), mx.concatenate(text_features)
        )
        mx.eval(loss, head_grads, d_image, d_text)
        del image_features, text_features
        grads = None
        for rows, k in zip(parts, micro_keep, strict=True):  # phase 3: one micro-batch at a time
            args = (images[rows], tokens[rows], d_image[rows], d_text[rows], k)
            grads = first_grads(*args) if grads is None else add_grads(*args, grads)
            mx.eval(grads)
        return loss, add_head_grads(grads, head_grads)

    return loss_and_grads


def make_accum_step(model: nn.Module, optimizer, steps: int, encode, features_loss, rank_mean, finish):
    """The training step of mlx_clip.training.build.make_step with gradient caching over `steps`
    micro-batches: step(images, tokens, keep=None) -> (loss, grad_norm), and the state to evaluate
    after it.

    The averaging over data-parallel ranks, clipping and optimizer update run as one compiled
    function over the model, optimizer and random state, as in the plain step.
    """
    loss_and_grads = make_accum_grad_fn(model, steps, encode, features_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(loss, grads):
        return finish(*rank_mean(loss, grads))

    def step(images, tokens, keep=None):
        return update(*loss_and_grads(images, tokens, keep))

    return step, state
