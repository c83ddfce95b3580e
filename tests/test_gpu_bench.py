"""benchmarks/gpu.sh and benchmarks/gpu_report.py (issue 18), on a machine without a GPU.

What can be checked here: the argument handling, the plan (venv, packages, grid) of a dry run,
the missing-GPU error, the report merging per-cell records (measured, failed, skipped), and the
bf16 step of train_throughput on MLX's CPU backend. The GPU run itself is not tested here.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_report
from benchmarks import train_throughput as tt
from benchmarks.common import REPO_ROOT

GPU_SH = REPO_ROOT / "benchmarks" / "gpu.sh"


def fake_nvidia_smi(tmp_path: Path, cuda: str | None) -> dict:
    """An environment whose PATH starts with a fake nvidia-smi (None: one that lists no GPU) and
    where any network access would fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = "exit 9" if cuda is None else (
        'if [ "$1" = -L ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; '
        f'else echo "| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda} |"; fi'
    )  # fmt: skip
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_MAJOR", "VENV_DIR", "MLX_SPEC", "TORCH_SPEC")
    }
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9"
    )
    env.update(PIP_NO_INDEX="1", UV_OFFLINE="1")
    return env


def gpu_sh(*args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = ["bash", str(GPU_SH), "--python", sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def cells(stdout: str) -> list[str]:
    return re.findall(r"^cell (\S+): \+ ", stdout, re.M)


def test_dry_run_prints_the_full_plan_and_installs_nothing(tmp_path):
    out = tmp_path / "out"
    p = gpu_sh("--dry-run", "--out", str(out), env=fake_nvidia_smi(tmp_path, "13.0"))
    assert p.returncode == 0, p.stderr
    assert cells(p.stdout) == [
        f"{arch}-{dtype}-b{batch}"
        for arch in ("vit_b32", "vit_b16")
        for dtype in ("fp32", "bf16")
        for batch in (128, 256)
    ]
    for line in p.stdout.splitlines():
        if line.startswith("cell "):
            assert "--backends mlx-gpu,torch_ref-cuda,open_clip-cuda --warmup 2 --steps 5" in line
            assert f"--out {out}/cells/" in line
    packages = re.search(r"^packages: (.+)$", p.stdout, re.M).group(1).split()
    assert "mlx[cuda13]" in packages and "open_clip_torch>=2.24" in packages
    assert {"torch>=2.2", "torchvision>=0.17", "mlx-data>=0.1.0"} <= set(packages)
    assert not any(x.startswith("mlx>=") or x.startswith("mlx[cpu]") for x in packages)
    assert "-m benchmarks.gpu_report" in p.stdout and "GPU 0: NVIDIA H100" in p.stdout
    assert not out.exists()  # nothing written, nothing installed


def test_smoke_plan_is_the_reduced_grid_and_old_drivers_get_mlx_cuda12(tmp_path):
    p = gpu_sh("--dry-run", "--smoke", env=fake_nvidia_smi(tmp_path, "12.4"))
    assert p.returncode == 0, p.stderr
    assert cells(p.stdout) == ["vit_b32-fp32-b128", "vit_b32-bf16-b128"]
    assert "--warmup 1 --steps 2" in p.stdout and "mode: smoke" in p.stdout
    assert "mlx[cuda12]" in p.stdout.split() and "mlx[cuda13]" not in p.stdout


def test_unknown_argument_and_missing_gpu_are_usage_errors(tmp_path):
    env = fake_nvidia_smi(tmp_path, None)  # nvidia-smi lists no GPU
    p = gpu_sh("--frobnicate", env=env)
    assert p.returncode == 2 and "unknown argument '--frobnicate'" in p.stderr and "usage:" in p.stderr
    p = gpu_sh("--out", env=env)  # a missing value
    assert p.returncode == 2 and "usage:" in p.stderr
    p = gpu_sh("--smoke", "--out", str(tmp_path / "out"), env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no NVIDIA GPU visible" in p.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# The report


def _result(backend: str, img_s: float, device="NVIDIA H100 80GB HBM3") -> dict:
    return {
        "backend": backend,
        "device_name": device,
        "images_per_s": img_s,
        "median_step_s": 128 / img_s,
        "mfu": 0.5,
        "mfu_device": 0.4,
        "peak_memory_bytes": 3 * 2**30,
    }


def _fake_run(d: Path) -> None:
    """What gpu.sh leaves: two measured cells (one with a failed backend), one cut, one skipped."""
    (d / "cells").mkdir(parents=True)
    plan = ["arch\tdtype\tbatch\tname"]
    for dtype in ("fp32", "bf16"):
        for batch in (128, 256):
            plan.append(f"vit_b32\t{dtype}\t{batch}\tvit_b32-{dtype}-b{batch}")
    (d / "plan.tsv").write_text("\n".join(plan) + "\n")
    ok = [_result("mlx-gpu", 1000.0), _result("torch_ref-cuda", 800.0), _result("open_clip-cuda", 1250.0)]
    (d / "cells/vit_b32-fp32-b128.json").write_text(json.dumps({"results": ok}))
    one_failed = [ok[0], ok[1], {"backend": "open_clip-cuda", "error": "timed out after 150 s"}]
    (d / "cells/vit_b32-fp32-b256.json").write_text(json.dumps({"results": one_failed}))
    (d / "cells/vit_b32-bf16-b128.rc").write_text("124\n")
    (d / "cells/vit_b32-bf16-b128.log").write_text("[mlx-gpu] step 1/7: 50.0 ms\n\n")
    (d / "cells/vit_b32-bf16-b256.skipped").write_text("not started: 450 s of the 460 s budget were spent\n")


def test_report_merges_cells_failures_and_skips(tmp_path):
    _fake_run(tmp_path)
    assert gpu_report.main([str(tmp_path), "--mode", "smoke"]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["schema"] == gpu_report.SCHEMA and doc["settings"]["mode"] == "smoke"
    assert [c["status"] for c in doc["cells"]] == ["ok", "ok", "failed", "skipped"]
    rows = doc["rows"]
    assert len(rows) == 4 * 3 and [r["backend"] for r in rows[:3]] == list(gpu_report.BACKENDS)
    mlx = rows[0]
    assert mlx["mlx_over_torch_ref"] == pytest.approx(1.25) and mlx["mlx_over_open_clip"] == pytest.approx(
        0.8
    )
    assert rows[5]["error"] == "timed out after 150 s" and "mlx_over_open_clip" not in rows[3]
    assert all(r["error"].startswith("exit code 124 (cut at the end of the time budget)") for r in rows[6:9])
    assert all(r["error"].startswith("skipped: not started") for r in rows[9:])

    table = (tmp_path / "gpu.md").read_text().split("\n\n")[-1].strip().splitlines()
    assert table[0] == (
        "| arch | dtype | batch | backend | img/s | step ms | MFU | peak memory "
        "| MLX / torch_ref | MLX / open_clip |"
    )
    assert table[2] == "| vit_b32 | fp32 | 128 | mlx-gpu | 1,000 | 128.0 | 40.0% | 3.0 GiB | 1.25 | 0.80 |"
    assert table[3] == "| vit_b32 | fp32 | 128 | torch_ref-cuda | 800 | 160.0 | 40.0% | 3.0 GiB | - | - |"
    assert (
        table[7]
        == "| vit_b32 | fp32 | 256 | open_clip-cuda | failed: timed out after 150 s | - | - | - | - | - |"
    )
    assert table[8].startswith("| vit_b32 | bf16 | 128 | mlx-gpu | failed: exit code 124")
    assert len(table) == 2 + 12 and len({row.count("|") for row in table}) == 1


def test_report_names_backends_the_preflight_found_broken(tmp_path):
    _fake_run(tmp_path)
    (tmp_path / "cells/vit_b32-fp32-b128.json").write_text(json.dumps({"results": [_result("mlx-gpu", 1e3)]}))
    broken = {"ok": False, "detail": "exit code 1: AssertionError: torch.cuda.is_available() is False"}
    checks = {"mlx-gpu": {"ok": True, "detail": "H100"}, "torch_ref-cuda": broken, "open_clip-cuda": broken}
    (tmp_path / "preflight.json").write_text(json.dumps(checks))
    doc = gpu_report.report(tmp_path, "full", list(gpu_report.BACKENDS))
    assert doc["rows"][1]["error"] == "not available: " + broken["detail"]
    assert "mlx_over_torch_ref" not in doc["rows"][0]


def test_preflight_check_reports_why_a_backend_is_missing():
    assert not gpu_report.check_backend("mlx-tpu")["ok"]
    if sys.platform.startswith("linux"):  # MLX's CPU build here: no CUDA
        check = gpu_report.check_backend("mlx-gpu")
        assert not check["ok"] and "is_available() is False" in check["detail"]


# ---------------------------------------------------------------------------
# --dtype bf16


def test_bf16_step_on_mlx_cpu_records_its_dtype(tmp_path):
    out = tmp_path / "bf16.json"
    argv = ["--arch", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--dtype", "bf16"]
    doc = tt.main(
        [*argv, "--backends", "mlx-cpu", "--gemm-size", "64", "--gemm-reps", "1", "--out", str(out)]
    )
    on_disk = json.loads(out.read_text())
    assert on_disk["settings"]["precision"] == "bfloat16"
    (r,) = on_disk["results"]
    assert "error" not in r and r["loss_finite"] and math.isfinite(r["losses"][0])
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["gemm_peak_flops"]["bfloat16"])
    assert "MFU bf16 (own GEMM)" in tt.markdown_table(doc)
    with pytest.raises(SystemExit):
        tt.parse_args(["--dtype", "fp16"])
