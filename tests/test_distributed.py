"""Data parallel on mx.distributed: 2 ranks on loopback (`mlx.launch -n 2 --backend ring`) against 1 process.

Every launch runs under a subprocess timeout, so a hang fails the test instead of the CI job.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL as SMALL_RUN
from safetensors.numpy import load_file

from mlx_clip.config import load_config
from mlx_clip.data.run_data import build_run_data
from mlx_clip.train import main as train_main
from mlx_clip.training.distributed import EXIT_PEER_LOST

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "dist_grad_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TIMEOUT = 120  # per launch; a healthy one takes a few seconds

# conftest's small run, with one loader worker per rank.
SMALL = [*SMALL_RUN, "--data.num_workers", "1"]
TEN_STEPS = ["--steps", "10", "--eval.every", "5", "--train.save_every", "5"]


def free_port_pair() -> int:
    """A port p with p and p + 1 free (mlx.launch gives rank i the port starting_port + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launch(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring python ARGS...` on loopback."""
    # The launcher forwards its stdin to the ranks and polls it; a closed stdin would make that
    # poll spin, so hand it a pipe that stays open and silent.
    stdin_r, stdin_w = os.pipe()
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair())]
    try:
        return subprocess.run(
            [*cmd, sys.executable, *args],
            stdin=stdin_r,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    finally:
        os.close(stdin_r)
        os.close(stdin_w)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # mlx.launch exits 0 even when a rank fails; its warning is the tell.
    assert "[WARN]" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------
# Same gradients


def test_gradients_match_single_process(tmp_path):
    """2 ranks x B/2 == 1 process x B, per parameter, for the clip loss (global and local) and for
    siglip and hard_negative (hard, k = 2 of 7 negatives), each global and local.

    Tolerance: 1e-5 absolute, relative for gradients larger than 1 (float32 sums in another order;
    the observed worst is ~1e-6 relative). MLX's plain all_gather (VJP without the sum over ranks)
    gives the tower gradients divided by the world size, which is why gather_with_grad exists.
    """
    single = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert single.returncode == 0, single.stderr
    check(launch(str(WORKER), str(tmp_path)))
    variants = ["global", "local", "naive"]
    variants += [f"{t}_{form}" for t in ("siglip", "hard_negative") for form in ("global", "local")]
    for variant in variants:
        ref = load_file(str(tmp_path / f"{variant}_rank0_of1.safetensors"))
        r0 = load_file(str(tmp_path / f"{variant}_rank0_of2.safetensors"))
        r1 = load_file(str(tmp_path / f"{variant}_rank1_of2.safetensors"))
        assert ref.keys() == r0.keys() == r1.keys() and len(ref) > 10
        for k in ref:
            np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{variant}: ranks disagree on {k}")
            scale = max(1.0, float(np.abs(ref[k]).max()))
            if variant == "naive" and k.startswith("grad.") and k != "grad.logit_scale":
                np.testing.assert_allclose(2 * r0[k], ref[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
            elif variant != "naive":
                err = float(np.abs(r0[k] - ref[k]).max())
                assert err <= 1e-5 * scale, f"{variant} {k}: |2 ranks - 1 process| = {err:.2e}"


# ---------------------------------------------------------------------------
# Training: smoke, resume with the same world size, same weights as one process, refusals


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """2 ranks: 10 steps as 4 + resume 6 (eval and checkpoint at 5), and 10 steps with the local
    loss; 1 process: 10 steps."""
    root = tmp_path_factory.mktemp("dist")
    out = root / "two"
    ema = ["--train.ema_decay", "0.8"]  # the EMA is restored on rank 0 and broadcast on resume
    first = launch("-m", "mlx_clip.train", "--out", str(out), *SMALL, *TEN_STEPS, *ema, "--stop-after", "4")
    ckpt4 = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    resumed = launch("-m", "mlx_clip.train", "--out", str(out), "--resume", *SMALL, *TEN_STEPS, *ema)
    local_args = ["--out", str(root / "local"), *SMALL, *TEN_STEPS, "--loss.local_loss", "true"]
    local = launch("-m", "mlx_clip.train", *local_args)
    train_main(["--out", str(root / "one"), *SMALL, *TEN_STEPS, *ema])
    return dict(
        out=out,
        one=root / "one",
        local=root / "local",
        first=first,
        resumed=resumed,
        local_proc=local,
        ckpt4=ckpt4,
    )


def test_smoke_rank0_logs_and_checkpoints(dist_run):
    out = check(dist_run["first"])
    assert dist_run["ckpt4"] == ["step_4"]
    assert out.count("data parallel: 2 ranks x 8 = global batch 16") == 1
    assert out.count("\ndata: ") + out.startswith("data: ") == 1  # rank 1 prints nothing
    check(dist_run["resumed"])
    ckpts = dist_run["out"] / "checkpoints"
    state = json.loads((ckpts / "step_10" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 10
    records = [json.loads(x) for x in (dist_run["out"] / "metrics.jsonl").read_text().splitlines()]
    # One writer: each step logged once, evaluations at 5 and at the end.
    assert [r["step"] for r in records if r["event"] == "train"] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in records if r["event"] == "eval"] == [5, 10]


@pytest.mark.parametrize("run", ["out", "local"])
def test_training_matches_single_process(dist_run, run):
    """10 steps on 2 ranks (global loss stopped and resumed at 4; local loss) == 10 steps in
    1 process with the same global batch: weights within 1e-5 (observed ~2e-6)."""
    check(dist_run["resumed" if run == "out" else "local_proc"])
    for name in ("model.safetensors", "ema.safetensors") if run == "out" else ("model.safetensors",):
        a = load_file(str(dist_run[run] / "checkpoints" / "step_10" / name))
        b = load_file(str(dist_run["one"] / "checkpoints" / "step_10" / name))
        assert a.keys() == b.keys()
        worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        assert worst < 1e-5, f"{name}: max |2 ranks - 1 process| weight difference {worst:.2e}"


def test_resume_with_another_world_size_is_refused(dist_run):
    check(dist_run["resumed"])
    with pytest.raises(SystemExit, match="trained by 2 rank"):  # one line, no traceback
        train_main(["--out", str(dist_run["out"]), "--resume", *SMALL, *TEN_STEPS])


def test_global_batch_must_divide_by_ranks():
    cfg = load_config(None, [("data.batch_size", "15"), ("data.builtin_train_size", "64")])
    with pytest.raises(ValueError, match="global batch and must be divisible"):
        build_run_data(cfg, cfg.model_config(), rank=0, world_size=2)


# ---------------------------------------------------------------------------
# Failure: bounded, with a message


def test_watchdog_exits_with_a_message():
    code = (
        "import time\nfrom mlx_clip.training.distributed import Watchdog\n"
        "w = Watchdog(0.5, 'rank 1/2')\nwith w.guard('training step 7'):\n    time.sleep(30)\n"
    )
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_PEER_LOST
    assert "rank 1/2: no progress for 0.5 s while training step 7" in proc.stderr
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_lost_rank_makes_the_other_exit(tmp_path, how):
    """Rank 1 dies (SIGKILL) or freezes (SIGSTOP, like a machine cut off): rank 0 exits, bounded.

    Killed: its sockets close and the ring backend raises (or, depending on timing, stops serving
    rank 0's requests). Frozen: nothing closes and the collective would wait forever. Either way
    rank 0 exits with a message naming the step, at the latest after train.dist_timeout.

    The ranks are started by hand with the environment mlx.launch gives them (MLX_RANK,
    MLX_HOSTFILE), so the bound is this code's, not the launcher's (which also stops the others
    when a rank exits, but not when a rank hangs or its host is cut off).
    """
    port = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    out = tmp_path / "run"
    args = [*SMALL, "--steps", "100000", "--train.log_every", "1", "--train.dist_timeout", "5"]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mlx_clip.train", "--out", str(out), *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT
        while not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read() + procs[1].stderr.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - lost
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Killed: the ring backend usually raises at once (PeerLostError); when the kill lands while
    # rank 0 is between collectives, its next one can still wait forever and the watchdog ends it.
    assert procs[0].returncode not in (0, None), err[-3000:]
    assert "rank 0/2" in err and "training step" in err, err[-3000:]
    assert "another rank has probably died or lost its connection" in err, err[-3000:]
    if how == "frozen":
        assert procs[0].returncode == EXIT_PEER_LOST, err[-3000:]
        assert "no progress for 5 s while training step" in err, err[-3000:]
    assert waited < 5 + 10
