"""benchmarks/memory.py: one step per variant on a very small model; the JSON and the table."""

import json
import math

import pytest
import yaml
from conftest import check_schema
from dist_grad_worker import ARCH

from benchmarks import memory

REQUIRED = {
    "schema": str,
    "created": str,
    "machine": {"host": str, "cpu_model": str, "cpu_count": int, "os": str},
    "versions": {"python": str, "mlx": str, "numpy": str},
    "git": {"dirty_files": list},
    "settings": {"arch": str, "batch": int, "warmup": int, "steps": int, "variants": list, "model": dict},
    "results": list,
}
RESULT_KEYS = {
    "variant": str,
    "overrides": list,
    "resident_bytes": int,
    "peak_memory_bytes": int,
    "step_peak_bytes": int,
    "peak_rss_bytes": int,
    "step_times_s": list,
    "median_step_s": float,
    "losses": list,
    "loss_finite": bool,
    "contention": dict,
    "num_params": int,
    "blas": dict,
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    arch = tmp / "small.yaml"  # the distributed tests' 2-layer model: a step is milliseconds
    arch.write_text(yaml.safe_dump({k.split(".", 1)[1]: yaml.safe_load(v) for k, v in ARCH}))
    out = tmp / "result.json"
    doc = memory.main(
        ["--arch", str(arch), "--batch", "16", "--warmup", "0", "--steps", "1", "--out", str(out)]
    )
    return doc, out


def test_every_default_variant_runs_and_saves_memory(bench):
    doc, out = bench
    on_disk = json.loads(out.read_text())
    assert on_disk["schema"] == memory.SCHEMA
    check_schema(on_disk, REQUIRED, "doc")
    results = {r["variant"]: r for r in on_disk["results"]}
    assert list(results) == list(memory.DEFAULT_VARIANTS)
    for r in results.values():
        check_schema(r, RESULT_KEYS, r["variant"])
        assert r["loss_finite"] and all(math.isfinite(x) for x in r["losses"])
        assert len(r["step_times_s"]) == 1 and r["median_step_s"] > 0
        assert 0 < r["resident_bytes"] < r["peak_memory_bytes"] <= r["peak_rss_bytes"]
        assert r["step_peak_bytes"] == r["peak_memory_bytes"] - r["resident_bytes"]
    assert len({r["num_params"] for r in results.values()}) == 1
    # the same fp32 loss: gradient caching changes how, not what, is computed
    assert results["accum2"]["losses"][0] == pytest.approx(results["plain"]["losses"][0], rel=1e-6)
    # one micro-batch's activations at a time. At this size MLX's peak varies by ~0.1 MB from run
    # to run (of ~2 MB); the step's own memory at batch 16 is 0.3-0.55x plain for accum2 and accum4,
    # and which of the two is lower flips from run to run (both ~0.8 MB in one run), so only the
    # saving against plain is asserted.
    plain = results["plain"]["step_peak_bytes"]
    assert max(results["accum2"]["step_peak_bytes"], results["accum4"]["step_peak_bytes"]) < 0.75 * plain


def test_markdown_table(bench):
    doc, _ = bench
    rows = memory.markdown_table(doc).splitlines()
    assert len(rows) == 2 + len(doc["results"])
    assert len({row.count("|") for row in rows}) == 1
    assert rows[2].startswith("| plain |") and "+0%" in rows[2]


def test_unknown_variant_or_indivisible_batch_is_refused():
    with pytest.raises(SystemExit, match="unknown variant"):
        memory.main(["--arch", "tiny", "--variants", "plain,accum3"])
    with pytest.raises(SystemExit, match="not divisible"):
        memory.main(["--arch", "tiny", "--batch", "6", "--variants", "accum4"])
