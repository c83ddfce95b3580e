"""The benchmark instrument: FLOP counter vs torch's, one step per backend, JSON schema, table.

Speed targets live in the benchmark (benchmarks/RESULTS.md), not here: these tests only check that
the numbers are computed correctly and recorded completely.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ODD_ARCH, check_schema

from benchmarks import train_throughput as tt
from benchmarks.common import synthetic_batch
from benchmarks.cpu_profile import perf_unusable
from benchmarks.data_throughput import loader_rate, write_sources
from benchmarks.flops import clip_flops_per_pair
from mlx_clip.data.pipeline import Loader
from mlx_clip.data.readers import read_samples
from mlx_clip.models.config import ModelConfig, model_config

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import torch_ref  # noqa: E402

ARCHS = {
    "tiny": model_config("tiny"),
    "odd": ModelConfig.from_dict(ODD_ARCH),
    # SigLIP's options: attention pool, no class token, no image projection, a text head
    "siglip_odd": ModelConfig.from_dict(
        {**ODD_ARCH, "vision_pool": "map", "patch_bias": True, "vision_pre_norm": False,
         "vision_proj": False, "embed_dim": ODD_ARCH["vision_width"], "text_causal": False,
         "text_pool": "last", "text_proj": "head", "vision_mlp_dim": 70, "init_logit_bias": -10.0}
    ),
}  # fmt: skip


def _torch_batch(cfg, batch: int):
    images, tokens = synthetic_batch(cfg, batch, seed=1)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(tokens).long()


# ---------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_equal_torch_flop_counter(arch):
    """Exact: FlopCounterMode counts every mm/addmm/bmm/conv of a torch_ref forward independently.

    The math SDPA kernel is forced because torch 2.x has no FLOP formula for the fused CPU kernel
    (aten._scaled_dot_product_flash_attention_for_cpu): with it, attention would count as 0. The
    math kernel is two bmms over the full (T, T) scores, causal or not, as flops.py counts them.
    """
    cfg = ARCHS[arch]
    B = 3
    model = torch_ref.create_model(cfg, device="cpu")
    images, tokens = _torch_batch(cfg, B)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    assert counter.get_total_flops() == B * clip_flops_per_pair(cfg)["forward"]


@pytest.mark.parametrize("arch", ARCHS)
def test_train_flops_are_three_forwards(arch):
    """Forward + loss + backward, counted by torch, is 3 x forward less one patch-embedding forward.

    Each matmul's backward is two matmuls of its size (input and weight gradients); the patch
    embedding needs no input gradient because the pixels need none. The logits of the loss,
    (B, E) @ (E, B), are in `logits` when clip_flops_per_pair gets the batch size.
    """
    cfg = ARCHS[arch]
    B = 4
    model = torch_ref.create_model(cfg, device="cpu")
    images, tokens = _torch_batch(cfg, B)
    flops = clip_flops_per_pair(cfg, batch_size=B)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        torch_ref.clip_loss(*model(images, tokens)).backward()
    assert flops["logits"] == 2 * B * cfg.embed_dim
    assert counter.get_total_flops() == B * (flops["train"] - flops["image"]["patch_embed"])
    # the convention's error at ViT-B/32 (documented in flops.py)
    b32 = clip_flops_per_pair(model_config("vit_b32"))
    assert 0.005 < b32["image"]["patch_embed"] / b32["train"] < 0.006


def test_flops_hand_computed_vit_b32():
    """ViT-B/32 by hand: image 8.82 GFLOP, text 5.96 GFLOP per pair forward.

    In MACs (what fvcore / timm / open_clip's profiles call "GFLOPs") that is the usual 4.4 + 3.0.
    """
    f = clip_flops_per_pair(model_config("vit_b32"))
    patch = 2 * 49 * 3072 * 768  # 49 patches x (32*32*3) inputs x 768 outputs
    assert f["image"]["patch_embed"] == patch
    # one block at (T tokens, width W): qkv 6TW^2 + out_proj 2TW^2 + MLP 16TW^2 + attention 4T^2W
    block = lambda T, W: 24 * T * W**2 + 4 * T**2 * W
    assert f["image"]["total"] == patch + 12 * block(50, 768) + 2 * 768 * 512
    assert f["text"]["total"] == 12 * block(77, 512) + 2 * 512 * 512
    assert round(f["image"]["total"] / 2e9, 2) == 4.41 and round(f["text"]["total"] / 2e9, 2) == 2.98
    assert f["train"] == 3 * f["forward"] and f["logits"] == 0


# ---------------------------------------------------------------------------
# One run of the CLI over every backend present (one fast step each)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = ["--arch", "tiny", "--batch", "4", "--warmup", "1", "--steps", "2"]
    argv += ["--gemm-size", "256", "--gemm-reps", "2", "--plot", "--out", str(out)]
    doc = tt.main(argv)
    return doc, out


def test_one_step_per_backend_runs_and_is_finite(bench):
    doc, _ = bench
    here = tt.available_backends()
    assert {"mlx-cpu", "torch_ref-cpu"} <= set(here)
    assert [r["backend"] for r in doc["results"]] == here
    for r in doc["results"]:
        assert "error" not in r, r
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["loss_finite"] and all(math.isfinite(x) for x in r["losses"])
        assert r["images_per_s"] == pytest.approx(4 / r["median_step_s"])
        assert r["gemm_peak_flops"]["float32"] > 0
        # MFU = model FLOPs / step time / the GEMM peak the worker measured right after: the same
        # number, not a bound, and on a busy machine (other processes during the GEMMs) it can pass 1;
        # a factor error in the FLOP count (3x forward, the batch) would put it far outside (0, 10).
        assert r["mfu"] == pytest.approx(
            r["model_flops_per_step"] / r["median_step_s"] / r["gemm_peak_flops"]["float32"]
        )
        assert 0 < r["mfu"] < 10 and r["peak_memory_bytes"] > 0
        assert 0 < r["mfu_device"] <= r["mfu"]  # the best GEMM peak on the device is at least the own one
        assert r["model_flops_per_step"] == 4 * clip_flops_per_pair(model_config("tiny"), 4)["train"]
        start, end = r["timed_window_monotonic_s"]  # the timed steps on the clock perf samples with
        assert 0 < end - start < r["wall_s"] and end - start >= sum(r["step_times_s"])
    # the same model everywhere: identical parameter counts
    assert len({r["num_params"] for r in doc["results"]}) == 1


REQUIRED = {
    "schema": str,
    "created": str,
    "machine": {"host": str, "cpu_model": str, "cpu_count": int, "memory_bytes": int, "os": str},
    "versions": {"python": str, "mlx": str, "numpy": str, "torch": str},
    "git": {"commit": str, "dirty": bool, "dirty_files": list},
    "settings": {"arch": str, "batch": int, "warmup": int, "steps": int, "precision": str, "backends": list},
    "flops": {"forward_per_pair": int, "train_per_pair": int, "train_per_step": int},
    "results": list,
}
RESULT_KEYS = {
    "backend": str,
    "framework": str,
    "device": str,
    "device_name": str,
    "step_times_s": list,
    "median_step_s": float,
    "images_per_s": float,
    "peak_memory_bytes": int,
    "peak_memory_source": str,
    "peak_rss_bytes": int,
    "gemm_peak_flops": dict,
    "model_flops_per_step": int,
    "mfu": float,
    "mfu_device": float,
    "contention": dict,
    "load_avg_at_start": list,
    "num_params": int,
    "timed_window_monotonic_s": list,
}


def test_json_schema(bench):
    doc, out = bench
    on_disk = json.loads(Path(out).read_text())  # what was written, not the in-memory dict
    assert on_disk["schema"] == tt.SCHEMA
    check_schema(on_disk, REQUIRED, "doc")
    for r in on_disk["results"]:
        check_schema(r, RESULT_KEYS, r["backend"])
        assert set(r["gemm_peak_flops"]) == {"float32", "bfloat16"}
    if any(b.startswith("open_clip") for b in on_disk["settings"]["backends"]):
        assert isinstance(on_disk["versions"]["open_clip_torch"], str)


def test_markdown_table_and_plot(bench):
    doc, out = bench
    table = tt.markdown_table(doc)
    rows = table.splitlines()
    assert len(rows) == 2 + len(doc["results"])
    assert len({row.count("|") for row in rows}) == 1  # every row has the header's columns
    for r in doc["results"]:
        assert any(row.startswith(f"| {r['backend']} |") for row in rows)
    assert "x torch_ref-cpu" in rows[0]
    assert Path(out).with_suffix(".png").stat().st_size > 0


def test_unknown_or_missing_backend_is_refused():
    with pytest.raises(SystemExit, match="unknown backend"):
        tt.main(["--arch", "tiny", "--backends", "mlx-tpu"])


def test_synthetic_batch_pools_at_eot():
    cfg = model_config("tiny")
    images, tokens = synthetic_batch(cfg, 6)
    assert images.shape == (6, cfg.image_size, cfg.image_size, 3) and images.dtype == np.float32
    assert tokens.shape == (6, cfg.context_length) and tokens.dtype == np.int32
    assert (tokens.max(axis=1) == cfg.vocab_size - 1).all()  # EOT has the largest id: the pooled token
    np.testing.assert_array_equal(tokens, synthetic_batch(cfg, 6)[1])  # seeded


def test_data_pipeline_rate_from_jpeg_tar_parquet_and_hf(tmp_path):
    kinds = ("jpeg", "tar", "parquet", "hf")
    sources = write_sources(tmp_path, 12, 64, 48, kinds=kinds, row_group=4)
    for kind in kinds:
        samples = read_samples(sources[kind])
        assert len(samples) == 12
        r = loader_rate(Loader(samples, 4, 32, train=True, num_workers=0))
        assert r["images"] == 12 and r["images_per_s"] > 0 and 0 < r["first_batch_s"] <= r["seconds"]


def test_memory_fine_tuning_variants_run_and_train_less():
    """benchmarks.memory's lit / lora / qlora variants (issue 16) build and step on tiny: each holds
    fewer trainable tensors in the optimizer than the full step, so its resident memory is lower."""
    from benchmarks import memory

    spec = dict(arch="tiny", batch=4, seed=0, warmup=0, steps=1)
    full, *others = (memory.run_worker({**spec, "variant": v}) for v in ("plain", "lit", "lora", "qlora"))
    for r in (full, *others):
        assert "error" not in r and r["loss_finite"], r
    assert all(r["resident_bytes"] < full["resident_bytes"] for r in others)


def test_rounds_table_reports_every_round_and_the_ratio_of_the_medians():
    def result(backend, medians):
        rounds = [{"median_step_s": m} for m in medians]
        return {"backend": backend, "median_step_s": min(medians), "rounds": rounds}

    doc = {"results": [result("mlx-cpu", [0.2, 0.18, 0.3]), result("torch_ref-cpu", [0.1, 0.2, 0.15])]}
    rows = tt.rounds_table(doc).splitlines()
    assert rows[0].startswith("| backend | round 1 ms | round 2 ms | round 3 ms | median of rounds ms |")
    assert rows[2] == "| mlx-cpu | 200.0 | 180.0 | 300.0 | 200.0 | 0.75 |"  # 0.15 / 0.2, not 0.1 / 0.18
    assert rows[3] == "| torch_ref-cpu | 100.0 | 200.0 | 150.0 | 150.0 | 1.00 |"
    assert tt.rounds_table({"results": [{"backend": "mlx-cpu", "median_step_s": 0.1}]}) is None  # one round


# ---------------------------------------------------------------------------
# benchmarks/cpu_profile.py: perf samples sorted into categories

PERF_LINES = """\
 3373  7f6a98c1a2b0 sgemm_kernel_COOPERLAKE (/usr/lib/x86_64-linux-gnu/libopenblasp-r0.3.21.so)
 3373  7f6a98c1a2b0 sgemm_kernel_COOPERLAKE (/usr/lib/x86_64-linux-gnu/libopenblasp-r0.3.21.so)
 3374  7f6a808e7611 Cf4IAddABDf4OSubtractCB_VV_f4f4_614_strided_1 (/tmp/mlx/libCf4IAddAB_strided_1.so)
 3374  7f6a808e1000 mlx::core::(anonymous namespace)::copy_general_general<float, float> (/x/libmlx.so)
 3366  7f6a808e2000 mlx::core::eval_impl (/x/site-packages/mlx/lib/libmlx.so)
 3366  ffffffff815a4f21 futex_wake ([kernel.kallsyms])
 3366  7f6a98faf848 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)
 3381  7f7479c1de62 [unknown] (/x/site-packages/torch/lib/libgomp.so.1)
 3381  7f7479c1de00 at::native::cpu_flash_attention<float, 32l>(at::Tensor const&) (/x/libtorch_cpu.so)
 3381  7f7479c1de00 mkl_blas_def_sgemm_kernel_0_zen (/x/torch/lib/libtorch_cpu.so)
 3366  7f6a98faa027 _PyEval_EvalFrameDefault (/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0)
 3366  7f6a98faa027 [unknown] ([unknown])

"""


def test_cpu_profile_sorts_perf_samples_into_categories():
    from benchmarks.cpu_profile import OTHER, aggregate

    got = aggregate(PERF_LINES, freq=1000, steps=2)  # a sample is 1 ms; per step: 0.5 ms
    ms = got["categories_ms_per_step"]
    assert got["samples"] == 12 and got["cpu_ms_per_step"] == pytest.approx(6.0)
    assert ms == pytest.approx({
        "GEMM (BLAS kernels and packing)": 1.5,  # OpenBLAS twice, MKL once
        "elementwise and fused kernels": 1.0,  # an mx.compile kernel, torch's flash attention
        "layout copies": 0.5,
        "framework bookkeeping (graph, scheduling, dispatch)": 0.5,
        "OS kernel (wake-ups, scheduling, page faults)": 0.5,
        "malloc / free and the C++ runtime": 0.5,
        "thread pools waiting for work": 0.5,
        "Python interpreter": 0.5,
        OTHER: 0.5,
    })  # fmt: skip
    assert got["threads_ms_per_step"] == pytest.approx([2.5, 1.5, 1.0, 1.0])  # 3366, 3381, 3373, 3374


@pytest.mark.skipif(perf_unusable() is not None, reason="needs Linux perf, allowed to sample")
def test_cpu_profile_runs_the_mlx_step_under_perf(tmp_path):
    from benchmarks import cpu_profile

    out = tmp_path / "profile.json"
    argv = ["--batch", "4", "--warmup", "1", "--steps", "3", "--backends", "mlx-cpu", "--out", str(out)]
    doc = cpu_profile.main(argv)
    (r,) = json.loads(out.read_text())["results"]
    assert "error" not in r, r
    assert r["samples"] > 0 and r["cpu_ms_per_step"] > 0
    ms = r["categories_ms_per_step"]
    assert ms["GEMM (BLAS kernels and packing)"] > 0 and ms["elementwise and fused kernels"] > 0
    assert sum(ms.values()) == pytest.approx(r["cpu_ms_per_step"])
    assert "| GEMM (BLAS kernels and packing) |" in cpu_profile.table(doc["results"])


def test_cpu_profile_refuses_by_name_where_perf_may_not_sample(tmp_path, monkeypatch):
    from benchmarks import cpu_profile

    paranoid = tmp_path / "perf_event_paranoid"
    paranoid.write_text("3\n")
    monkeypatch.setattr(cpu_profile, "PARANOID", paranoid)
    monkeypatch.setattr(cpu_profile.shutil, "which", lambda name: "/usr/bin/perf")
    with pytest.raises(SystemExit, match=rf"{paranoid} is 3: perf may not sample user processes"):
        cpu_profile.main(["--steps", "1"])
    monkeypatch.setattr(cpu_profile.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="`perf` is not on PATH"):
        cpu_profile.main(["--steps", "1"])
