"""Who may write a run directory: one training process at a time, and one run per directory.

    with claim(out, resume, world):   # refuses, or holds OUT/.lock until the block ends
        ...train...

- A fresh run (no --resume) into a directory that already holds checkpoints is refused before
  anything in it is written: its checkpoints would mix with the other run's.
- While a run trains it holds an exclusive `flock` on OUT/.lock, with its PID and host written in
  the file for the message a second process gets. The OS drops the lock when the process dies, so
  a lock file left by a killed run is simply taken over (and the takeover is reported).
- The directory must be writable: checked here, before the data is read or a step is run.
- Once the lock is held, unfinished checkpoint directories a killed run left are removed.

Under mlx.launch only rank 0 touches OUT, so only rank 0 claims it; the other ranks wait for its
answer and fail with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import checkpoint_steps, remove_stale_temps
from .distributed import World

LOCK_FILE = ".lock"
# flock's answers on a file system that does not lock (rather than "held by another process").
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class RunDirError(OSError):
    """The run directory cannot be used: another process holds it, another run's checkpoints are
    in it, or it is not writable. The message says what to do."""


class RunLock:
    """An exclusive, non-blocking flock on OUT/.lock, held until `release`."""

    def __init__(self, out: Path, log=print):
        self.path = out / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(_read(self.fd))
            os.close(self.fd)
            raise RunDirError(
                f"{out} is in use: {holder} is training there (it holds {self.path}); wait for it to "
                "finish, stop it, or use another --out"
            ) from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(self.fd)
                raise
            # Some cluster file systems (Lustre without flock, ...) refuse locks: train anyway.
            log(f"warning: {out} cannot be locked ({e.strerror}); a second run into it would not be stopped")
        # A clean exit empties the file: anything left in it belongs to a process that died.
        left = _read(self.fd)
        if left:
            log(f"taking over the lock of {describe(left)}, which is no longer running")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me, 0)

    def release(self) -> None:
        # The file stays: deleting it would let a process that opened it just before take a lock
        # on a file nobody else sees.
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def describe(holder: str) -> str:
    """'pid N on host H' from a lock file's content (or the raw content, if it is not ours)."""
    try:
        who = json.loads(holder)
        return f"pid {who['pid']} on host {who['host']}"
    except (ValueError, TypeError, KeyError):
        return f"another process ({holder or 'unknown pid'})"


def check_fresh(out: Path) -> None:
    """A run without --resume: refuse a directory holding checkpoints (of any run)."""
    found = checkpoint_steps(out / "checkpoints")
    if found:
        names = ", ".join(p.name for p in found[-3:])
        raise RunDirError(
            f"{out} already holds checkpoints of an earlier run ({names}); add --resume to continue "
            f"that run, or pass a new --out to start another (nothing in {out} was changed)"
        )


def check_writable(out: Path) -> None:
    """Create OUT (and its parents) and write a probe file in it, so a read-only or impossible
    --out stops the run here with one line, before any data is read."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise RunDirError(
            f"cannot write to the run directory {out}: {reason}; choose a writable --out"
        ) from None


@contextlib.contextmanager
def claim(out: Path, resume: bool, world: World, log=print) -> Iterator[None]:
    """Check and lock `out` for a run (rank 0), hold the lock for the block, release it at the end
    (also on errors). Every rank raises RunDirError's message if rank 0 refuses."""
    held = []

    def on_main():
        if not resume:
            check_fresh(out)  # before anything is written
        check_writable(out)
        try:
            lock = RunLock(out, log)
        except RunDirError:
            raise
        except OSError as e:
            raise RunDirError(f"cannot lock {out / LOCK_FILE}: {e.strerror or e}") from None
        try:
            if not resume:
                check_fresh(out)  # again under the lock: a run may have finished in between
        except RunDirError:
            lock.release()
            raise
        held.append(lock)
        remove_stale_temps(out / "checkpoints", log)  # ours now: no one else is writing there

    world.on_main(on_main, "claiming the run directory")
    try:
        yield
    finally:
        for lock in held:
            lock.release()
