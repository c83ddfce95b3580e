"""What a run reports: OUT/metrics.jsonl, the progress line, OUT/curves.png and TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx


class Logger:
    """One JSON object per event in OUT/metrics.jsonl (and TensorBoard), and the console."""

    def __init__(self, out: Path, total_steps: int, progress: bool, tensorboard: bool = False):
        self.out, self.total_steps, self.progress = out, total_steps, progress
        self.file = open(out / "metrics.jsonl", "a")
        self.tty = progress and sys.stdout.isatty()
        self.tensorboard = open_tensorboard(out) if tensorboard else None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k not in ("event", "step") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def progress_line(self, step: int, loss: float, lr: float, img_s: float, eta_s: float, mem_mb: float):
        if not self.progress:
            return
        width = 24
        done = int(width * step / self.total_steps)
        bar = "#" * done + "-" * (width - done)
        eta = time.strftime("%M:%S", time.gmtime(eta_s)) if eta_s < 3600 else f"{eta_s / 3600:.1f}h"
        line = (
            f"[{bar}] step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
            f"{img_s:.0f} img/s ETA {eta} mem {mem_mb:.0f} MB"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.tty:
            print()
        print(text, flush=True)

    def close(self):
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def read_history(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["event"] == "train"]
    evals = [r for r in history if r["event"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax1.set(xlabel="step", ylabel="train loss", title="loss")
    for key in ("zeroshot_top1", "i2t_R@1", "t2i_R@1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax2.set(xlabel="step", ylabel="accuracy", title="held-out", ylim=(0, 1))
    if evals:
        ax2.legend()
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
