"""Shard a batch over CPU streams, so MLX's CPU backend keeps every core busy.

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

benchmarks/RESULTS.md has the measured effect. On a GPU (Metal, CUDA) one stream already fills
the device, and `auto` means 1.
"""

from __future__ import annotations

import os

import mlx.core as mx
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


_POOL: dict[str, list] = {}  # streams per device, reused: each one is a thread that never exits


def streams_of(device: mx.Device, n: int) -> list:
    pool = _POOL.setdefault(str(device), [])
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
