"""Data-parallel training on `mx.distributed`: the process group, collectives on trees, and a watchdog.

Launched by MLX's own launcher (`mlx.launch -n 2 --backend ring python -m mlx_clip.train ...`, or
`--hosts` / `--hostfile` for several machines); a plain `python -m mlx_clip.train` is a world of one,
for which everything here is a no-op and the trainer runs exactly its single-process code.

Conventions (docs/distributed.md has the whole story):
- `data.batch_size` is the GLOBAL contrastive batch; each rank loads batch_size / world_size samples.
- Rank 0 owns the disk: it reads init weights and checkpoints, writes logs and checkpoints, and
  sends what the other ranks need (tokenizer, weights, optimizer state, run position) over the
  group, so the other machines need the code and the training data but not the run directory.
- Gradients are averaged in buckets (`average_gradients`); features are gathered with a gradient
  (`loss.gather_with_grad`).
- A lost peer: when its process ends, MLX's ring backend often notices the closed sockets and
  raises (re-raised here as PeerLostError, naming the step); but a peer that hangs, or whose host
  vanishes without closing its sockets, leaves a collective waiting forever, and so, depending on
  timing, can a killed one (measured: benchmarks/RESULTS.md#numbers-quoted-in-the-code).
  So every collective the trainer waits on runs under a `Watchdog` deadline: past
  `train.dist_timeout` seconds the process prints what it was waiting for and exits with
  EXIT_PEER_LOST.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# Exit status of a rank that gave up waiting for the others (EX_TEMPFAIL).
EXIT_PEER_LOST = 75
# How MLX's backends start the messages of the errors they raise (e.g. "[ring] connection to a peer
# was lost" when a peer's sockets close).
BACKEND_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]", "[distributed]")


class PeerLostError(RuntimeError):
    """A collective failed because another rank is gone."""


class Watchdog:
    """Exits the process when a guarded section runs past its deadline.

    The main thread is blocked inside MLX (C++) while a collective waits, so neither an exception
    nor a Python signal handler can interrupt it; a daemon thread watching a deadline can, with
    `os._exit`.
    """

    def __init__(self, timeout: float, label: str, poll: float = 0.25):
        self.timeout, self.label, self._poll = timeout, label, poll
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._thread = threading.Thread(target=self._watch, name="mlx_clip-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            outer = self._deadline, self._what
            self._deadline, self._what = time.monotonic() + self.timeout, what
        try:
            yield
        except RuntimeError as e:
            # A peer whose process ended closes its sockets: the backend raises instead of hanging.
            if str(e).startswith(BACKEND_ERRORS):
                raise PeerLostError(
                    f"{self.label}: {what} failed ({e}); another rank has probably died or lost its "
                    "connection"
                ) from e
            raise
        finally:
            with self._lock:
                self._deadline, self._what = outer

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                self._fire(what)

    def _fire(self, what: str) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        msg = (
            f"mlx_clip {self.label}: no progress for {self.timeout:g} s while {what}; another rank has "
            f"probably died or lost its connection (raise train.dist_timeout if rank 0's evaluation "
            f"or checkpoint legitimately takes longer). Exiting with status {EXIT_PEER_LOST}.\n"
        )
        with contextlib.suppress(Exception):
            os.write(2, msg.encode())
        os._exit(EXIT_PEER_LOST)


@dataclass
class World:
    """This process's place in the group. A world of one has no group and does no communication."""

    group: Any = None  # mx.distributed.Group, or None for a single process
    rank: int = 0
    size: int = 1
    bucket_bytes: int = 25 * 2**20
    watchdog: Watchdog | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.size}"

    def guard(self, what: str):
        """A section that waits on the other ranks: bounded by the watchdog (nothing for one process)."""
        return self.watchdog.guard(what) if self.watchdog is not None else contextlib.nullcontext()

    # -- collectives on host values ------------------------------------------------------------

    def barrier(self, what: str) -> None:
        """Every rank reaches this point before any leaves it (a one-element all_sum)."""
        if self.size == 1:
            return
        with self.guard(what):
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def broadcast_bytes(self, data: bytes | None, what: str = "receiving data from rank 0") -> bytes:
        """Rank 0's `data` on every rank (the others pass None): a sum in which only rank 0 is non-zero."""
        with self.guard(what):
            n = mx.array(len(data) if self.is_main else 0, dtype=mx.int64)
            n = int(mx.distributed.all_sum(n, group=self.group).item())
            if n == 0:
                return b""
            buf = np.frombuffer(data, np.uint8) if self.is_main else np.zeros(n, np.uint8)
            return np.asarray(mx.distributed.all_sum(mx.array(buf), group=self.group)).tobytes()

    def broadcast_object(self, obj: Any = None, what: str = "receiving data from rank 0") -> Any:
        """Rank 0's JSON-able `obj` on every rank."""
        if self.size == 1:
            return obj
        payload = json.dumps(obj).encode() if self.is_main else None
        return json.loads(self.broadcast_bytes(payload, what).decode())

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on rank 0 only and return its JSON-able result everywhere.

        If `fn` raises on rank 0, every other rank raises too (instead of waiting for a peer that
        will never answer).
        """
        if self.size == 1:
            return fn()
        if not self.is_main:
            reply = self.broadcast_object(what=f"waiting for rank 0 ({what})")
            if "error" in reply:
                raise RuntimeError(f"{self.label}: rank 0 failed while {what}: {reply['error']}")
            return reply["ok"]
        try:
            result = fn()
        except Exception as e:
            self.broadcast_object({"error": f"{type(e).__name__}: {e}"})
            raise
        self.broadcast_object({"ok": result})
        return result

    def check_same(self, values: dict[str, str]) -> None:
        """Raise on every rank if any rank disagrees on one of `values` (config, data size, ...)."""
        if self.size == 1:
            return
        names = sorted(values)
        digests = np.frombuffer(
            b"".join(hashlib.sha256(str(values[k]).encode()).digest()[:8] for k in names), np.uint8
        )
        with self.guard("comparing the ranks' configurations"):
            every = np.array(mx.distributed.all_gather(mx.array(digests)[None], group=self.group))
        every = every.reshape(self.size, len(names), 8)  # (ranks, names, digest bytes)
        differ = [k for i, k in enumerate(names) if (every[:, i] != every[0, i]).any()]
        if differ:
            shown = ", ".join(f"{k} (here: {values[k]})" for k in differ)
            raise RuntimeError(
                f"{self.label}: the ranks disagree on {shown}; every host must run the same code, "
                "config and data"
            )

    # -- collectives on arrays ------------------------------------------------------------------

    def broadcast_tree(self, tree: Any) -> Any:
        """Rank 0's arrays in `tree` (same structure and shapes everywhere) on every rank."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        zero = [(k, v if self.is_main else mx.zeros_like(v)) for k, v in flat]
        out = _bucketed_all_sum(zero, self.group, self.bucket_bytes)
        with self.guard("receiving weights from rank 0"):
            mx.eval([v for _, v in out])
        return tree_unflatten(out)

    def average_gradients(self, grads: Any) -> Any:
        """The mean of `grads` over the ranks, one all_sum per bucket of about `bucket_bytes`.

        Lazy (no eval), so it can sit inside the compiled step.
        """
        if self.size == 1:
            return grads
        flat = _bucketed_all_sum(tree_flatten(grads), self.group, self.bucket_bytes)
        return tree_unflatten([(k, v / self.size) for k, v in flat])


Flat = list[tuple[str, mx.array]]  # tree_flatten's (path, array) pairs


def _bucketed_all_sum(flat: Flat, group, bucket_bytes: int) -> Flat:
    """Sum each array over the group, packing arrays of one dtype into flat buckets; same order out.

    One all_sum per bucket instead of one per tensor: fewer, larger messages (a ViT-B/32 has ~200
    parameter tensors, many of them small norms and biases). Buckets follow the sorted paths, not
    the tree's order, which can differ between ranks (a tree read back from safetensors is sorted).
    """
    buckets: list[list[int]] = []
    size = 0
    for i in sorted(range(len(flat)), key=lambda i: flat[i][0]):
        v = flat[i][1]
        if not buckets or flat[buckets[-1][0]][1].dtype != v.dtype or size + v.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += v.nbytes
    out: list = [None] * len(flat)
    for bucket in buckets:
        arrays = [flat[i][1] for i in bucket]
        packed = mx.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) > 1 else arrays[0].reshape(-1)
        summed = mx.distributed.all_sum(packed, group=group)  # (sum of sizes,)
        offsets = np.cumsum([a.size for a in arrays])[:-1].tolist()
        for i, a, part in zip(bucket, arrays, mx.split(summed, offsets), strict=True):
            out[i] = (flat[i][0], part.reshape(a.shape))
    return out


def pack_dir(write: Callable[[Path], None]) -> dict[str, str]:
    """The files `write(directory)` puts in an empty directory, as {name: base64} for broadcast_object."""
    with tempfile.TemporaryDirectory(prefix="mlx_clip-") as tmp:
        write(Path(tmp))
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        return {p.name: base64.b64encode(p.read_bytes()).decode() for p in files}


@contextlib.contextmanager
def unpack_dir(files: dict[str, str]) -> Iterator[Path]:
    """`pack_dir`'s files written back into a temporary directory, for the life of the context."""
    with tempfile.TemporaryDirectory(prefix="mlx_clip-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(base64.b64decode(data))
        yield Path(tmp)


def init_world(timeout: float = 300.0, bucket_mb: float = 25.0) -> World:
    """Join the group `mlx.launch` set up (any backend); a plain process is a world of one.

    Ranks other than 0 stop printing to stdout (errors and warnings still reach stderr), so a
    launch shows one log, not one per rank.
    """
    bucket_bytes = max(1, int(bucket_mb * 2**20))
    # mlx.launch sets MLX_RANK for every backend; mpirun sets its own. A plain process never
    # touches mx.distributed, so its path is exactly the single-process one.
    if not any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return World(bucket_bytes=bucket_bytes)
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
        return World(bucket_bytes=bucket_bytes)  # `mlx.launch -n 1`: an empty ring, which MLX rejects
    # Connecting waits for every peer; a peer that never starts must not hang us either.
    watchdog = Watchdog(timeout, f"rank {os.environ.get('MLX_RANK', '?')}")
    with watchdog.guard("connecting to the other ranks"):
        group = mx.distributed.init()
    if group.size() == 1:
        return World(bucket_bytes=bucket_bytes)
    world = World(group, group.rank(), group.size(), bucket_bytes, watchdog)
    watchdog.label = world.label
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    return world
