"""Shard a batch over CPU streams, so MLX's CPU backend keeps every core busy: in the training step
(`Lanes`) and in every encoder call of evaluation and inference (`Encoders`).

MLX's CPU backend runs each elementwise or reduction kernel on one thread; only the GEMMs
(OpenBLAS) use several. On a 2-core machine that left one core idle for every LayerNorm, softmax,
GELU, residual add and their gradients, which together cost about as much as the matmuls at CLIP's
sizes. Each MLX stream has its own worker thread, so the training step splits the batch into
`train.streams` shards and runs each shard's towers, forward and backward, on a stream of its own,
with OpenBLAS at one thread per stream. The shards meet at the loss, which sees the whole batch's
features; the weight gradients of the shards are summed by autodiff where the shards' backward
passes meet. The result is the same step up to float rounding (tests/test_streams.py), and it is
bit-reproducible, as single-threaded OpenBLAS is.

Two things make the shards really overlap:

- MLX orders the operations of one evaluation breadth-first, at most MLX_BFS_MAX_WIDTH (default
  20) branches at a time, and enqueues them in that order. At 20, one shard's backward fills the
  queue for long stretches while the other stream idles. `widen_evaluation` sets 1000 for a run
  with several streams. libmlx reads the variable once per process, at its first evaluation, so
  it is set before the run evaluates anything (a process that already evaluated keeps its width:
  results are the same, only the overlap differs). Gradient checkpointing keeps the default: with
  a wide evaluation the recomputed activations of many blocks are alive at once and the memory
  saving is gone. Measured, both: benchmarks/RESULTS.md#numbers-quoted-in-the-code.
- A custom VJP's Python runs when the backward graph is built, on the default stream of that
  moment; mlx_clip.models.kernels pins its VJPs to the forward's stream.

Inference and evaluation (`Encoders`) shard each encoder call the same way, forward only: every
caller (the run's evaluations, eval sets, `mlx_clip.eval`, predict, the index, embed, the web app)
goes through `Encoders.of(model)`, which runs each shard through the tower compiled with mx.compile,
and OpenBLAS at one thread while the call runs (its count restored after). A forward pass
overlaps at MLX's default evaluation width.

benchmarks/RESULTS.md has the measured effect. On a GPU (Metal, CUDA) one stream already fills
the device, and `auto` means 1.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .. import _blas

WIDE_EVALUATION = "1000"


def setup_process(n_streams: int, grad_checkpointing: bool, deterministic: bool) -> None:
    """Process-wide settings of a run with `n_streams` streams; call before anything is evaluated.

    One OpenBLAS thread when the run is deterministic (multi-threaded OpenBLAS is not
    bit-reproducible, see _blas.set_threads) or runs several streams (the cores are already shared
    out, one GEMM per stream); else OpenBLAS's own default. Several streams also widen MLX's
    evaluation (widen_evaluation).
    """
    widen_evaluation(n_streams, grad_checkpointing)
    if deterministic or n_streams > 1:
        _blas.set_threads(1)


def widen_evaluation(n_streams: int, grad_checkpointing: bool) -> bool:
    """Raise MLX_BFS_MAX_WIDTH for a run with several streams (see above), unless the user set it
    or the run checkpoints gradients; True when it was set here."""
    if n_streams < 2 or grad_checkpointing or "MLX_BFS_MAX_WIDTH" in os.environ:
        return False
    os.environ["MLX_BFS_MAX_WIDTH"] = WIDE_EVALUATION
    return True


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve(setting: int | str, device: mx.Device | None = None) -> int:
    """train.streams: a positive int, or "auto" (one per core on the CPU backend, 1 on a GPU)."""
    device = device or mx.default_device()
    if setting == "auto":
        return cpu_cores() if device == mx.cpu else 1
    return int(setting)


_POOL = threading.local()  # streams per device and thread, reused: each one is a thread that never exits


def streams_of(device: mx.Device, n: int) -> list:
    """n streams on `device` for the calling thread (MLX refuses a stream made in another thread)."""
    pools = _POOL.__dict__.setdefault("pools", {})
    pool = pools.setdefault(str(device), [])
    while len(pool) < n:
        pool.append(mx.new_stream(device))
    return pool[:n]


class Lanes:
    """The CPU streams of one training step: the batch split into shards, and per-tensor work spread.

    `shard(fn, *arrays)` runs a function of batch arrays shard by shard, each on a stream of its
    own (the towers, forward and backward). `run(fn, *arrays)` / `map(fn, tree)` put per-tensor
    elementwise work (gradient clipping, the optimizer, the finite-step guard) on the stream with
    the fewest bytes so far: elementwise results do not depend on the stream, so that changes
    nothing but the time. With one lane every call runs as it is, on the default stream.
    """

    def __init__(self, n: int, device: mx.Device | None = None):
        self.streams = streams_of(device or mx.default_device(), n) if n > 1 else []
        self.loads = [0] * len(self.streams)

    def __len__(self) -> int:
        return max(1, len(self.streams))

    def bounds(self, batch: int) -> list[tuple[int, int]]:
        """Contiguous row ranges, sizes differing by at most one; never an empty shard."""
        n = min(len(self), batch)
        cuts = [batch * k // n for k in range(n + 1)]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def shard(self, fn, *arrays: mx.array):
        """fn(*arrays) computed shard by shard; its outputs (a tuple of arrays with the batch first)
        concatenated back in order. One lane (or a batch of one): fn(*arrays) as it is."""
        batch = arrays[0].shape[0]
        if len(self) == 1 or batch < 2:
            return fn(*arrays)
        outputs = []
        for stream, (a, b) in zip(self.streams, self.bounds(batch), strict=False):
            with mx.stream(stream):
                outputs.append(fn(*(x[a:b] for x in arrays)))
        return tuple(mx.concatenate(parts) for parts in zip(*outputs, strict=True))

    def run(self, fn, *arrays: mx.array):
        """fn(*arrays) on the least-loaded stream (the first array's size is its load)."""
        if not self.streams:
            return fn(*arrays)
        lane = self.loads.index(min(self.loads))
        self.loads[lane] += arrays[0].nbytes
        with mx.stream(self.streams[lane]):
            return fn(*arrays)

    def map(self, fn, tree, *rest):
        """tree_map(fn, tree, *rest), each leaf on its own stream."""
        return tree_map(lambda *leaves: self.run(fn, *leaves), tree, *rest)


class Encoders:
    """A model's towers as numpy -> numpy functions for evaluation and inference: `image(images)`
    (B, S, S, 3) float32 and `text(tokens)` (B, context_length) int32 -> (B, E) L2-normalised
    features, as model.encode_image / encode_text give them, up to float rounding.

    Each call splits its batch over `n` CPU streams (one shard per core; "auto" = train.streams's
    auto: one per core on the CPU backend, 1 on a GPU) and runs each shard through the tower compiled
    with mx.compile. The compiled towers read the model's parameters as inputs at every call
    (`inputs=model.state`), so weights that change between calls (a run's evaluations, load_weights)
    are seen; a change of structure (quantize_model, a LoRA merge) changes the inputs and MLX traces
    again. Training and eval mode are traced apart (LoRA dropout). Get them with `Encoders.of`.
    """

    def __init__(self, model, n: int | str = "auto"):
        self.model, self.n = model, resolve(n)
        self._towers: dict = {}

    @classmethod
    def of(cls, model, n: int | str = "auto") -> Encoders:
        """The Encoders of `model` with `n` streams, made once and kept on the model object (a plain
        attribute, not a parameter: nothing in its state or checkpoints changes), so repeated calls
        (a web app's requests, a run's evaluations) do not trace the towers again."""
        cache = model.__dict__.setdefault("_mlx_clip_encoders", {})
        n = resolve(n)
        if n not in cache:
            cache[n] = cls(model, n)
        return cache[n]

    def image(self, images) -> np.ndarray:
        return self._run("image", images)

    def text(self, tokens) -> np.ndarray:
        return self._run("text", tokens)

    def _tower(self, kind: str):
        key = (kind, self.model.training)
        if key not in self._towers:
            encode = self.model.encode_image if kind == "image" else self.model.encode_text
            self._towers[key] = mx.compile(lambda x: encode(x), inputs=self.model.state)
        return self._towers[key]

    def _run(self, kind: str, batch) -> np.ndarray:
        tower = self._tower(kind)
        x = mx.array(batch)
        if self.n == 1 or x.shape[0] < 2:
            return np.array(tower(x))
        lanes = Lanes(self.n)  # the calling thread's streams (a web app encodes on its own thread)
        # One GEMM per stream at a time: OpenBLAS's own threads would oversubscribe the cores.
        with _blas.threads(1):
            (features,) = lanes.shard(lambda shard: (tower(shard),), x)
            return np.array(features)  # evaluated here, while OpenBLAS is at one thread
