"""Evaluation sets during training (config `eval:`): the sets are read once before step 1 and
evaluated with the run's own held-out metrics, into metrics.jsonl, eval_sets.json, summary.json,
curves.png and the best-checkpoint choice; the deprecated train.eval_every / train.best_metric."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from mlx_clip.config import load_config
from mlx_clip.data.samples import DataError
from mlx_clip.schema import ConfigError

TINY = [
    "--model.image_size", "32", "--model.patch_size", "8", "--model.vision_width", "32",
    "--model.vision_heads", "2", "--model.vision_layers", "1", "--model.text_width", "32",
    "--model.text_layers", "1", "--model.context_length", "16", "--model.vocab_size", "600",
    "--model.embed_dim", "16", "--data.builtin_train_size", "64", "--data.builtin_val_size", "16",
    "--data.batch_size", "16", "--optim.warmup_steps", "1", "--train.log_every", "1",
    "--train.progress", "false", "--steps", "4", "--train.save_every", "2",
]  # fmt: skip
COLOURS = {"red_square": (220, 40, 30), "green_circle": (30, 200, 60), "blue_triangle": (40, 60, 220)}


def solid(path, colour, seed):
    noise = np.random.default_rng(seed).integers(-20, 21, (24, 24, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


def image_folder(root, per_class, seed):
    for k, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            solid(root / name / f"{i}.png", colour, seed + 10 * k + i)
    return root


def caption_csv(root):
    rows = ["image,caption"]
    for k, (name, colour) in enumerate(COLOURS.items()):
        solid(root / "img" / f"{k}.png", colour, 50 + k)
        rows.append(f"img/{k}.png,a {name.replace('_', ' ')}")
    (root / "caps.csv").write_text("\n".join(rows) + "\n")
    return root / "caps.csv"


def eval_sets(root) -> list[dict]:
    return [
        {"name": "colours", "kind": "zeroshot", "path": str(image_folder(root / "zs", 2, 0)),
         "templates": "short"},
        {"name": "caps", "kind": "retrieval", "path": str(caption_csv(root / "ret"))},
        {"name": "probe", "kind": "linear_probe", "path": str(image_folder(root / "tr", 3, 1)),
         "test_path": str(root / "zs")},
    ]  # fmt: skip


def write_config(path, sets, **eval_keys) -> str:
    path.write_text(yaml.safe_dump({"eval": {"sets": sets, **eval_keys}}))
    return str(path)


def train(out, *argv):
    from mlx_clip.train import main as train_main

    return train_main(["--out", str(out), *TINY, *map(str, argv)])


def records(out, event="eval"):
    return [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(with sets: 4 steps, eval every 2, best colours/top1; without sets: 2 steps, then --resume
    with the sets added for the last 2) and the sets' config file."""
    root = tmp_path_factory.mktemp("train_eval_sets")
    config = write_config(root / "sets.yaml", eval_sets(root), every=2, best="colours/top1")
    with_sets = train(root / "with", "--config", config)
    train(root / "plain", "--eval.every", "2", "--stop-after", "2")
    resumed = train(root / "plain", "--config", config, "--resume")
    return {"with": (root / "with", with_sets), "plain": (root / "plain", resumed), "root": root}


def test_sets_in_every_eval_record_summary_and_eval_sets_json(runs):
    out, summary = runs["with"]
    evals = records(out)
    assert [r["step"] for r in evals] == [2, 4]
    names = {"colours/top1", "colours/mean_per_class_recall", "caps/i2t_R@1", "caps/t2i_median_rank"}
    names |= {"probe/probe_top1", "zeroshot_top1", "val_loss"}  # the run's own metrics stay
    for r in evals:
        assert names <= r.keys() and "colours/top5" not in r  # top5 needs 5+ classes
    assert {k: summary[k] for k in names} == {k: evals[-1][k] for k in names}
    saved = json.loads((out / "eval_sets.json").read_text())
    assert saved["step"] == 4 and saved["metrics"] == {k: v for k, v in evals[-1].items() if "/" in k}
    assert saved["details"]["colours"]["images"] == 6 and saved["details"]["probe"]["train_images"] == 9
    assert np.array(saved["details"]["colours"]["confusion"]).sum() == 6
    assert saved["details"]["caps"]["captions"] == 3
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_best_naming_a_set_picks_the_checkpoint(runs):
    out, _ = runs["with"]
    evals = records(out)
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    values = [r["colours/top1"] for r in evals]
    first_max = evals[values.index(max(values))]["step"]
    assert state["best"] == {"name": "colours/top1", "value": max(values), "checkpoint": f"step_{first_max}"}


def test_sets_do_not_change_training_and_resume_may_add_them(runs):
    """The run without sets trains and evaluates exactly as the one with them (same losses, same
    held-out metrics), and --resume accepts the added eval section and evaluates the sets."""
    (a, _), (b, resumed) = runs["with"], runs["plain"]
    assert [r["loss"] for r in records(a, "train")] == [r["loss"] for r in records(b, "train")]
    own = ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "val_loss")
    ea, eb = records(a), records(b)
    assert [[r[k] for k in own] for r in ea] == [[r[k] for k in own] for r in eb]
    assert not any("/" in k for k in eb[0]) and eb[1]["colours/top1"] == ea[1]["colours/top1"]
    assert resumed["probe/probe_top1"] == ea[1]["probe/probe_top1"]


def test_bad_set_path_fails_before_step_one_naming_the_set(runs, tmp_path):
    sets = eval_sets(runs["root"])
    sets[1]["path"] = str(tmp_path / "missing.csv")
    with pytest.raises(SystemExit, match=r"retrieval set 'caps': .*missing\.csv: no such file"):
        train(tmp_path / "bad", "--config", write_config(tmp_path / "bad.yaml", sets))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # no step was taken
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_deprecated_keys_warn_map_and_conflict(tmp_path, capsys):
    cfg = load_config(None, [("train.eval_every", "50"), ("train.best_metric", "val_loss")])
    assert (cfg.eval.every, cfg.eval.best) == (50, "val_loss")
    said = capsys.readouterr().out
    assert "train.eval_every is deprecated, use eval.every" in said and "use eval.best" in said
    # the command line's old key still overrides a file's new one (presets now use eval.every)
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  every: 500\n")
    assert load_config(path, [("train.eval_every", "0")]).eval.every == 0
    path.write_text("train:\n  eval_every: 100\neval:\n  every: 500\n")
    with pytest.raises(ConfigError, match=r"train.eval_every=100 and eval.every=500 disagree"):
        load_config(path)
    path.write_text("train:\n  eval_every: 500\neval:\n  every: 500\n")
    assert load_config(path).eval.every == 500 and "deprecated" in capsys.readouterr().out
    assert load_config(path, log=None).eval.every == 500  # a checkpoint's own config.yaml: quiet
    assert "deprecated" not in capsys.readouterr().out


def zs(name="a"):
    return {"name": name, "kind": "zeroshot", "path": "p"}


@pytest.mark.parametrize(
    "sets, best, says",
    [
        ([], "nope", r"eval.best='nope' .* valid: auto, zeroshot_top1, .*val_loss"),
        ([], "pets/top1", r"no set is named 'pets' \(eval.sets: none\)"),
        ([{"name": "pets", "kind": "zeroshot", "path": "p"}], "pets/i2t_R@1",
         r"set 'pets' \(zeroshot\) reports pets/top1, pets/top5, pets/mean_per_class_recall"),
        ([{"name": "pets", "kind": "zs", "path": "p"}], "auto",
         r"eval.sets\[0\].kind must be 'zeroshot', 'retrieval' or 'linear_probe', got 'zs'"),
        ([{"name": "a", "kind": "zeroshot", "path": "p"}, {"name": "b", "kind": "retrieval"}], "auto",
         r"eval.sets\[1\]: missing key 'path' \(required: name, kind, path\)"),
        ([{"name": "a", "kind": "zeroshot", "path": "p", "oops": 1}], "auto", r"'eval.sets\[0\].oops'"),
        ([{"name": "a b", "kind": "zeroshot", "path": "p"}], "auto", r"eval.sets\[0\] .* no '/' or space"),
        ([zs(), zs()], "auto", r"eval.sets\[1\]: the name 'a' is used twice"),
        ([{"name": "a", "kind": "linear_probe", "path": "p"}], "auto", r"test_path is required"),
        ([{**zs(), "kind": "retrieval", "test_path": "q"}], "auto", r"linear_probe sets only"),
        ([{**zs(), "kind": "retrieval", "templates": "short"}], "auto", r"zeroshot sets only"),
    ],
)  # fmt: skip
def test_bad_eval_section_is_a_config_error(tmp_path, sets, best, says):
    with pytest.raises(ConfigError, match=says):
        load_config(write_config(tmp_path / "c.yaml", sets, best=best))


def test_eval_keys_from_the_command_line_and_lower_is_better():
    from mlx_clip.training.state import RunState

    sets = "[{name: pets, kind: zeroshot, path: p}]"
    cfg = load_config(None, [("eval.sets", sets), ("eval.every", "50"), ("eval.best", "pets/top1")])
    assert (cfg.eval.every, cfg.eval.best, cfg.eval.sets[0].templates) == (50, "pets/top1", "openai")
    state = RunState()
    assert state.observe("val_loss", {"val_loss": 2.0}, "step_1", lower=True)
    assert not state.observe("val_loss", {"val_loss": 3.0}, "step_2", lower=True)
    assert state.observe("val_loss", {"val_loss": 1.0}, "step_3", lower=True)
    assert state.observe("top1", {"top1": 0.1}, "step_4")  # another metric: a new best


def test_bad_images_of_a_set_go_to_the_run_skip_log(tmp_path):
    """A set's undecodable image is dropped and logged like training data's (data.* checks)."""
    from mlx_clip.data.checks import SkipLog
    from mlx_clip.training.evaluate import load_eval_sets

    folder = image_folder(tmp_path / "zs", 3, 0)
    (folder / "red_square" / "broken.png").write_bytes(b"not a png")
    sets = [{"name": "colours", "kind": "zeroshot", "path": str(folder)}]
    overrides = [("model.image_size", "32"), ("model.patch_size", "8"), ("data.max_bad_fraction", "0.2")]
    cfg = load_config(write_config(tmp_path / "c.yaml", sets), overrides)
    log = SkipLog(tmp_path / "skipped.jsonl")
    with pytest.warns(Warning, match="colours"):
        (loaded,) = load_eval_sets(cfg, log)
    log.close()
    assert len(loaded.data) == 9 and log.count == 1
    assert "broken.png" in (tmp_path / "skipped.jsonl").read_text()
    cfg = load_config(write_config(tmp_path / "c.yaml", sets), overrides[:2])  # 1 of 10 > 5%
    with pytest.warns(Warning), pytest.raises(DataError, match="broken.png"):
        load_eval_sets(cfg, None)


def test_curves_panel_lines_are_the_sets_headlines():
    from mlx_clip.training.logging import set_headlines

    evals = [{"step": 2, "zeroshot_top1": 0.1, "a/top1": 0.5, "a/top5": 0.9, "b/i2t_R@1": 0.2},
             {"step": 4, "c/probe_top1": 1.0, "b/t2i_R@1": 0.3}]  # fmt: skip
    assert set_headlines(evals) == ["a/top1", "b/i2t_R@1", "c/probe_top1"]


def test_tensorboard_tags_of_eval_sets_are_their_names(tmp_path):
    from mlx_clip.training.logging import Logger

    class Writer:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append((tag, value, step))

        def close(self):
            pass

    logger = Logger(tmp_path, 4, progress=False)
    logger.tensorboard = Writer()
    logger.log({"event": "eval", "step": 2, "zeroshot_top1": 0.5, "pets/top1": 0.25})
    assert logger.tensorboard.tags == [("eval/zeroshot_top1", 0.5, 2), ("pets/top1", 0.25, 2)]
    logger.close()


def test_a_bad_templates_file_names_its_set(tmp_path):
    from mlx_clip.training.evaluate import load_eval_sets

    sets = [{"name": "colours", "kind": "zeroshot", "path": str(image_folder(tmp_path / "zs", 1, 0)),
             "templates": str(tmp_path / "prompts.txt")}]  # fmt: skip
    cfg = load_config(write_config(tmp_path / "c.yaml", sets), [("model.image_size", "32")])
    with pytest.raises(
        DataError, match=r"^eval.sets 'colours' \(zeroshot\): templates .*prompts.txt': no such file"
    ):
        load_eval_sets(cfg, None)
