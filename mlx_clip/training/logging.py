"""What a run reports: OUT/metrics.jsonl, the progress line, OUT/curves.png, TensorBoard and
OUT/eval_sets.json (the eval sets' details at the latest evaluation)."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..evaluation.spec import HEADLINE


class RunWriteError(OSError):
    """A run output (summary.json) could not be written; the message says what was saved."""


class Logger:
    """One JSON object per event in OUT/metrics.jsonl (and TensorBoard), and the console.

    Each record is one whole line, written with a single write; a write that fails (a full disk)
    is undone, so the file never holds half a line. Training goes on: the record is dropped with a
    warning, since the checkpoints, not the log, are what a run must keep (a save on the full disk
    stops the run with its own message), and the disk may have room again by then."""

    def __init__(self, out: Path, total_steps: int, progress: bool, tensorboard: bool = False):
        self.out, self.total_steps, self.progress = out, total_steps, progress
        self.path = out / "metrics.jsonl"
        self.fd = open_metrics(self.path)
        self.dropped = 0  # records lost to failed writes since the last one that worked
        self.tty = progress and sys.stdout.isatty()
        self.tensorboard = open_tensorboard(out) if tensorboard else None

    def log(self, record: dict) -> None:
        try:
            append_line(self.fd, (json.dumps(record) + "\n").encode())
        except OSError as e:
            self.dropped += 1
            if self.dropped == 1:
                self.message(
                    f"warning: could not append to {self.path} ({e}); training goes on, "
                    "its records are dropped until the disk has room"
                )
        else:
            if self.dropped:
                self.message(f"{self.path}: written again; {self.dropped} records were dropped")
                self.dropped = 0
        if self.tensorboard is not None:  # "eval/zeroshot_top1"; an eval set's "NAME/top1" as is
            for k, v in record.items():
                if k not in ("event", "step") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(
                        k if "/" in k else f"{record['event']}/{k}", v, record["step"]
                    )

    def progress_line(
        self, step: int, epoch: int, loss: float, lr: float, img_s: float, eta_s: float, mem_mb: float
    ):
        if not self.progress:
            return
        width = 24
        done = int(width * step / self.total_steps)
        bar = "#" * done + "-" * (width - done)
        eta = time.strftime("%M:%S", time.gmtime(eta_s)) if eta_s < 3600 else f"{eta_s / 3600:.1f}h"
        line = (
            f"[{bar}] step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
            f"{img_s:.0f} img/s ETA {eta} mem {mem_mb:.0f} MB"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.tty:
            print()
        print(text, flush=True)

    def close(self):
        os.close(self.fd)
        if self.tensorboard is not None:
            self.tensorboard.close()


def open_metrics(path: Path) -> int:
    """metrics.jsonl opened for appending (a raw descriptor: one os.write per record). A torn last
    line, left by a kill or a full disk mid-write, is cut off first, so the next record does not
    run on from it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as f:
            f.seek(max(0, size - (1 << 16)))
            tail = f.read()
            if b"\n" not in tail and size > len(tail):  # a very long line: look at all of it
                f.seek(0)
                tail = f.read()
        if not tail.endswith(b"\n"):
            keep = size - len(tail) + tail.rfind(b"\n") + 1  # just after the last newline, or 0
            os.ftruncate(fd, keep)
            print(
                f"warning: {path}: removed a torn last line ({size - keep} bytes) left by an "
                "interrupted write",
                flush=True,
            )
    return fd


def append_line(fd: int, line: bytes) -> None:
    """Append one line in a single write; on failure cut the file back to where it was."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a short write: the disk filled up part way
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise


class Throughput:
    """Images per second since the last reading, and the time left at the mean step time so far."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.started = self.window_start = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self, step: int, stop_at: int) -> tuple[float, float]:
        """(images per second over the window, seconds to stop_at); starts a new window."""
        now = time.perf_counter()
        rate = self.images / (now - self.window_start)
        eta = (now - self.started) / max(1, step - self.start_step) * (stop_at - step)
        self.window_start, self.images = now, 0
        return rate, eta


def memory_mb() -> float:
    """MLX's active memory where it counts it (Metal/CUDA/CPU), else the process peak RSS."""
    try:
        active = mx.get_active_memory()
        if active:
            return active / 2**20
    except AttributeError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_history(out: Path, log=print) -> list[dict]:
    """The records of OUT/metrics.jsonl. An unterminated last line (a write cut short) is skipped
    with a warning; any other line that is not a JSON object is a ValueError naming it."""
    path = out / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if number == len(lines):
                log(f"warning: {path}: line {number} is incomplete (an interrupted write); skipped")
                continue
            raise ValueError(f"{path}: line {number} is not a JSON record ({e}); remove or fix it") from None
        records.append(record)
    return records


def write_curves(out: Path, log=print) -> None:
    """OUT/curves.png from metrics.jsonl; a failure is a warning, as the plot is only a view of it."""
    try:
        plot_curves(read_history(out, log), out / "curves.png")
    except (OSError, ValueError) as e:
        log(f"warning: {out / 'curves.png'} not written: {e}")


def write_eval_sets(out: Path, step: int, scalars: dict, details: dict, log=print) -> None:
    """OUT/eval_sets.json: {"step", "metrics" ("NAME/metric" scalars), "details" (per set: counts,
    per-class recall, confusion, ...)} of the latest evaluation, replacing the previous one
    atomically (every step's scalars are in metrics.jsonl). A failed write is a warning."""
    path = out / "eval_sets.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"step": step, "metrics": scalars, "details": details}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log(f"warning: {path} not written ({e}); the eval sets' scalars are in metrics.jsonl")


def write_summary(path: Path, summary: dict, final: Path) -> None:
    """OUT/summary.json; a failed write (a full disk) is a RunWriteError naming the saved checkpoint."""
    try:
        path.write_text(json.dumps(summary, indent=1))
    except OSError as e:
        path.unlink(missing_ok=True)  # no half-written JSON
        raise RunWriteError(
            f"could not write {path} ({e}); training finished and its final checkpoint {final} is saved"
        ) from e


def set_headlines(evals: list[dict]) -> list[str]:
    """The eval sets' headline scalars in the eval records, in order of first appearance:
    "NAME/top1" (zero-shot), "NAME/i2t_R@1" (retrieval), "NAME/probe_top1" (linear probe)."""
    suffixes = tuple(f"/{m}" for m in HEADLINE.values())
    return list(dict.fromkeys(k for r in evals for k in r if "/" in k and k.endswith(suffixes)))


def plot_curves(history: list[dict], path: Path) -> None:
    """Train loss and held-out accuracy; with eval sets, a third panel with one line per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["event"] == "train"]
    evals = [r for r in history if r["event"] == "eval"]
    sets = set_headlines(evals)
    fig, (ax1, ax2, *ax3) = plt.subplots(1, 3 if sets else 2, figsize=(15 if sets else 10, 3.5))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax1.set(xlabel="step", ylabel="train loss", title="loss")
    for key in ("zeroshot_top1", "i2t_R@1", "t2i_R@1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax2.set(xlabel="step", ylabel="accuracy", title="held-out", ylim=(0, 1))
    if evals:
        ax2.legend()
    for key in sets:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax3[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    if sets:
        ax3[0].set(xlabel="step", ylabel="accuracy / R@1", title="eval sets", ylim=(0, 1))
        ax3[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def open_tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        try:
            from tensorboardX import SummaryWriter
        except Exception:
            raise RuntimeError(
                "train.tensorboard=true needs the `tensorboard` package (with torch) or `tensorboardX`; "
                "pip install tensorboardX"
            ) from None
    return SummaryWriter(str(out / "tensorboard"))
