"""Temperature: the schedules' values, the adaptive plateau rule, config checks, and a training run
that uses and logs the scheduled temperature at every step."""

import json
import math

import pytest
from conftest import train_run

from mlx_clip.config import TemperatureConfig, load_config
from mlx_clip.schema import ConfigError
from mlx_clip.training.temperature import Temperature


def schedule(name, total=100, **kw):
    return Temperature(TemperatureConfig(schedule=name, **kw), total)


def test_constant_and_learnable_start_value():
    assert schedule("constant", start=0.05).at(0) == schedule("constant", start=0.05).at(99) == 0.05
    assert schedule("learnable").learnable and not schedule("constant").learnable


def test_warmup_is_linear_then_flat():
    t = schedule("warmup", start=0.1, end=0.02, warmup_steps=10)
    assert t.at(0) == pytest.approx(0.1)
    assert t.at(5) == pytest.approx(0.06)
    assert t.at(10) == t.at(60) == pytest.approx(0.02)
    assert schedule("warmup", start=0.1, end=0.02, warmup_steps=0).at(0) == pytest.approx(0.02)


def test_cosine_and_exponential_endpoints_and_midpoints():
    c = schedule("cosine", start=0.1, end=0.02)
    assert c.at(0) == pytest.approx(0.1) and c.at(100) == pytest.approx(0.02)
    assert c.at(50) == pytest.approx(0.06)
    assert all(c.at(s) >= c.at(s + 1) for s in range(100))
    e = schedule("exponential", start=0.1, end=0.01)
    assert e.at(0) == pytest.approx(0.1) and e.at(100) == pytest.approx(0.01)
    assert e.at(50) == pytest.approx(math.sqrt(0.1 * 0.01))  # geometric midpoint


def test_logit_scale_param_is_log_inverse_tau():
    t = schedule("constant", start=0.07)
    assert t.logit_scale_param(3) == pytest.approx(math.log(1 / 0.07))


def test_adaptive_lowers_after_patience_plateaus_with_floor():
    t = schedule("adaptive", start=0.08, end=0.03, patience=2, factor=0.5, threshold=0.01)
    assert not t.observe(2.0)  # first value: an improvement over inf
    assert not t.observe(1.5) and t.at(10) == 0.08  # improved
    assert not t.observe(1.499)  # < 1% better: plateau 1 of 2
    assert t.observe(1.6) and t.at(10) == pytest.approx(0.04)  # plateau 2 of 2: halved
    assert not t.observe(1.7) and t.observe(1.8) and t.at(10) == pytest.approx(0.03)  # floor = end
    assert not t.observe(1.9) and not t.observe(2.0)  # at the floor: no change reported
    state = t.state_dict()
    u = schedule("adaptive", start=0.08, end=0.03, patience=2, factor=0.5, threshold=0.01)
    u.load_state_dict(json.loads(json.dumps(state)))  # checkpoints keep it as JSON
    assert u.state_dict() == state


def test_non_adaptive_ignores_val_loss():
    t = schedule("cosine")
    assert not any(t.observe(x) for x in (3.0, 3.0, 3.0))


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("loss.temperature.schedule", "linear", "loss.temperature.schedule"),
        ("loss.temperature.start", "0.001", "loss.temperature.start"),
        ("loss.temperature.end", "200", "loss.temperature.end"),
        ("loss.temperature.factor", "1.5", "loss.temperature.factor"),
        ("loss.temperature.patience", "0", "patience"),
        ("loss.temperature.warmup_steps", "-1", "warmup_steps"),
        ("loss.temperature.start", "cold", "loss.temperature.start"),
    ],
)
def test_bad_temperature_config_names_the_key(key, value, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, [(key, value)])


def test_training_uses_and_logs_the_scheduled_temperature(tmp_path):
    out, _ = train_run(
        tmp_path,
        "cosine",
        "--steps", "6", "--eval.every", "3", "--train.save_every", "0",
        "--loss.temperature.schedule", "cosine", "--loss.temperature.start", "0.1",
        "--loss.temperature.end", "0.02",
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    taus = {r["step"]: r["temperature"] for r in records if r["event"] == "temperature"}
    expected = schedule("cosine", total=6, start=0.1, end=0.02)
    assert sorted(taus) == [1, 2, 3, 4, 5, 6]  # every step
    for step, tau in taus.items():
        assert tau == pytest.approx(expected.at(step - 1), rel=1e-6)
    assert all("val_loss" in r and math.isfinite(r["val_loss"]) for r in records if r["event"] == "eval")
    # The frozen logit_scale is not trained: the final checkpoint holds the last step's value.
    from safetensors.numpy import load_file

    w = load_file(str(out / "checkpoints" / "step_6" / "model.safetensors"))
    assert float(w["logit_scale"]) == pytest.approx(math.log(1 / expected.at(5)), rel=1e-6)


def test_learnable_temperature_is_logged_and_moves(tmp_path):
    out, _ = train_run(tmp_path, "learn", "--steps", "4", "--eval.every", "0", "--train.save_every", "0")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    taus = [r["temperature"] for r in records if r["event"] == "temperature"]
    assert len(taus) == 4 and taus[0] == pytest.approx(0.07, rel=1e-6)
    assert taus[-1] != taus[0]  # trained


def test_adaptive_run_lowers_temperature_on_plateau_and_resumes(tmp_path):
    # threshold 1.0: no val-loss drop counts as an improvement, so every evaluation after the first
    # is a plateau (patience 1) and halves tau.
    args = [
        "--steps", "6", "--eval.every", "2", "--train.save_every", "2",
        "--loss.temperature.schedule", "adaptive", "--loss.temperature.start", "0.08",
        "--loss.temperature.end", "0.01", "--loss.temperature.threshold", "1.0",
    ]  # fmt: skip
    out, _ = train_run(tmp_path, "adaptive", *args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    taus = {r["step"]: r["temperature"] for r in records if r["event"] == "temperature"}
    assert taus[1] == taus[2] == taus[3] == taus[4] == pytest.approx(0.08)  # eval @2: first val loss
    assert taus[5] == taus[6] == pytest.approx(0.04)  # eval @4: plateau -> halved
    state = json.loads((out / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["temperature"]["tau"] == pytest.approx(0.04)
