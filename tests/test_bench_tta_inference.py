"""benchmarks.time_to_accuracy and benchmarks.inference_throughput: arguments, the timing arithmetic,
and one tiny run of each that checks the record's fields (the speed targets live in RESULTS.md)."""

import json

import pytest
from conftest import SMALL, train_run

from benchmarks import inference_throughput as it
from benchmarks import time_to_accuracy as tta

pytest.importorskip("torch")

# a tiny architecture with the OpenAI tokenizer's vocabulary, which both inference backends use
TINY_OPENAI = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 2,
    "vision_heads": 2, "context_length": 16, "vocab_size": 49408, "text_width": 64, "text_layers": 2,
    "text_heads": 2, "mlp_ratio": 4.0, "activation": "quick_gelu",
}  # fmt: skip


def test_tta_arguments():
    args, overrides = tta.parse_args(["--steps", "6", "--optim.lr", "1e-3", "--model.vision_layers=2"])
    assert (args.steps, args.eval_every, args.target, args.backends) == (6, 25, 0.9, ["mlx", "torch_ref"])
    assert overrides == ["--optim.lr", "1e-3", "--model.vision_layers", "2"]
    for bad in (["--backends", "mlx,jax"], ["--target", "1.5"], ["--eval.every", "5"], ["--lr", "1"]):
        with pytest.raises(SystemExit):
            tta.parse_args(bad)


def test_training_time_leaves_earlier_evaluations_out():
    records = [
        {"event": "train", "step": 2, "loss": 4.0},
        {"event": "eval", "step": 2, "zeroshot_top1": 0.5, "elapsed_s": 10.0, "eval_s": 3.0},
        {"event": "eval", "step": 4, "zeroshot_top1": 0.92, "elapsed_s": 20.0, "eval_s": 4.0},
        {"event": "eval", "step": 6, "zeroshot_top1": 0.95, "elapsed_s": 30.0, "eval_s": 1.0},
    ]
    points = tta.timeline(records)
    assert [p["train_s"] for p in points] == [10.0, 17.0, 23.0]  # minus 0, 3, 3 + 4
    assert tta.first_reaching(points, 0.9) == {"step": 4, "train_s": 17.0}
    assert tta.first_reaching(points, 0.99) is None
    with pytest.raises(ValueError, match="elapsed_s"):
        tta.timeline([{"event": "eval", "step": 2, "zeroshot_top1": 0.5}])


def losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def test_tta_both_trainers_from_one_init(tmp_path):
    """Two evaluations per trainer; both start from the init the script saved, which is the one
    mlx_clip.train builds on its own (same loss at step 2 as a run without init_from), and both see
    the same batches (torch_ref's loss within 1e-3)."""
    argv = ["--steps", "4", "--eval-every", "2", "--target", "0.01", "--workdir", str(tmp_path / "w")]
    doc = tta.main([*argv, "--out", str(tmp_path / "tta.json"), *SMALL])
    assert json.loads((tmp_path / "tta.json").read_text()) == doc
    assert doc["schema"] == tta.SCHEMA and doc["settings"]["init"]["sha256"]
    for r in doc["results"]:
        assert "error" not in r, r
        assert [p["step"] for p in r["evals"]] == [2, 4] and r["steps"] == 4
        # (summary.json's seconds, hence run_s, are rounded to 0.1 s)
        assert 0 < r["evals"][0]["train_s"] <= r["evals"][1]["train_s"] <= r["run_without_eval_s"] + 0.05
        assert r["run_without_eval_s"] + r["eval_total_s"] == pytest.approx(r["run_s"], abs=1e-3)
        assert r["process_wall_s"] > r["process_wall_without_eval_s"] > 0
        assert r["target_reached"]["step"] == 2 and r["final_top1"] == r["evals"][-1]["zeroshot_top1"]
        assert 0 <= r["contention"]["others_share"] <= 1
    assert set(doc["comparison"]) >= {"first_to_target", "mlx_run_without_eval_le_torch_ref"}
    mlx, torch_ref = (losses(tmp_path / "w" / b) for b in ("mlx", "torch_ref"))
    assert torch_ref[2] == pytest.approx(mlx[2], rel=1e-3)
    _, _ = train_run(tmp_path, "plain", "--steps", "2", "--eval.every", "0")
    assert losses(tmp_path / "plain")[2] == mlx[2]
    table = tta.markdown_tables(doc)
    assert "| mlx | cpu | 2 |" in table and "| 4 |" in table


def test_inference_arguments_and_vocab_check(tmp_path):
    with pytest.raises(SystemExit):
        it.parse_args(["--backends", "mlx,onnx"])
    with pytest.raises(SystemExit, match="OpenAI CLIP tokenizer"):
        it.main(["--arch", "tiny"])  # 2048 tokens
    assert len(it.prompts(10)) == 10 and it.prompts(2)[0] == "a photo of a tench."


def test_inference_tiny_run(tmp_path):
    """Both backends' rows, in this process (the CLI runs each in its own: same run_worker)."""
    (tmp_path / "arch.yaml").write_text("".join(f"{k}: {v}\n" for k, v in TINY_OPENAI.items()))
    it.write_images(tmp_path / "images", 6)
    spec = dict(arch=str(tmp_path / "arch.yaml"), batch=4, images=6, texts=5, rounds=1)
    spec["image_dir"] = str(tmp_path / "images")
    mlx, open_clip = (it.run_worker({**spec, "backend": b}) for b in it.BACKENDS)
    for r, rows in ((mlx, it.ROWS), (open_clip, it.ROWS[:-1])):
        assert "error" not in r, r
        assert set(r["rows"]) == set(rows) and all(row["per_s"] > 0 for row in r["rows"].values())
        assert len(r["rows"]["image_model"]["times_s"]) == 1  # the warm-up calls are not timed
        assert len(r["rows"]["image_decode"]["times_s"]) == 2  # 6 images in batches of 4
    assert mlx["rows"]["index_folder"]["images"] == 6
    doc = {"settings": {**spec, "backends": list(it.BACKENDS)}, "results": [mlx, open_clip]}
    table = it.markdown_table(doc)
    assert "| image_decode |" in table and "mlx / open_clip" in table
