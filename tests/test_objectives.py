"""The objectives of docs/objectives.md: torch_ref parity of values and gradients, hand-computed
cases, what the hard-negative selection selects, the dispatcher, and the local (data-parallel) forms."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip.config import LossConfig
from mlx_clip.training.loss import (
    batch_loss,
    clip_loss,
    contrastive_loss,
    hard_negative_loss,
    hard_negative_mask,
    multi_scale_loss,
    num_hard,
    siglip_loss,
)

B, E = 12, 24
SCALE, BIAS = 8.0, -4.0
# ratio 0.25 of 11 negatives: k = 3; with margin 0.5 the semi-hard bands hold 0 to 8 negatives
# (seeds 0-2): empty rows, partly filled rows and capped rows all occur
HARD = dict(ratio=0.25, weight=2.0, margin=0.5)
STRATEGIES = ["hard", "semi-hard", "weighted"]


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def features(seed: int = 0, n: int = B, dim: int = E) -> tuple[np.ndarray, np.ndarray]:
    """Unit features, each text near its image, so positives beat most (not all) negatives."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim))
    return normalise(img), normalise(img + rng.standard_normal((n, dim)))


def mlx_value_and_grads(cfg: LossConfig, *inputs: np.ndarray):
    """contrastive_loss and its gradients w.r.t. every input (features, scale[, bias])."""
    fn = lambda *xs: contrastive_loss(cfg, *xs)
    value, grads = mx.value_and_grad(fn, argnums=tuple(range(len(inputs))))(*map(mx.array, inputs))
    return float(value), [np.array(g) for g in grads]


def torch_value_and_grads(cfg: LossConfig, *inputs: np.ndarray):
    import torch

    import torch_ref.loss

    xs = [torch.tensor(x, requires_grad=True) for x in inputs]
    value = torch_ref.loss.contrastive_loss(cfg, *xs)
    value.backward()
    return value.item(), [x.grad.numpy() for x in xs]


PARITY = [
    *[LossConfig(type="clip", label_smoothing=ls) for ls in (0.0, 0.1)],
    LossConfig(type="siglip"),
    *[
        LossConfig(type="hard_negative", strategy=s, label_smoothing=ls, **HARD)
        for s in STRATEGIES
        for ls in (0.0, 0.1)
    ],
    *[
        LossConfig(
            type="multi_scale", scales=[0.5, 1.0, 2.0], scale_weights=[1.0, 3.0, 0.5], label_smoothing=ls
        )
        for ls in (0.0, 0.1)
    ],
]


@pytest.mark.parametrize(
    "cfg",
    PARITY,
    ids=[
        c.type + (f"-{c.strategy}" if c.type == "hard_negative" else "") + f"-ls{c.label_smoothing}"
        for c in PARITY
    ],
)
def test_value_and_gradients_match_torch_ref(cfg):
    """Loss and gradients w.r.t. image and text features, logit_scale (and logit_bias for siglip):
    |mlx - torch| <= 1e-5 * max(1, |torch|) elementwise, i.e. absolute below magnitude 1 and
    relative above (observed worst: 2.4e-7, siglip's logit_bias gradient; float32 rounding)."""
    pytest.importorskip("torch")
    img, txt = features()
    inputs = [img, txt, np.float32(SCALE)] + ([np.float32(BIAS)] if cfg.type == "siglip" else [])
    ours, our_grads = mlx_value_and_grads(cfg, *inputs)
    theirs, their_grads = torch_value_and_grads(cfg, *inputs)
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))
    for name, a, b in zip(
        ["image", "text", "logit_scale", "logit_bias"], our_grads, their_grads, strict=False
    ):
        assert a.shape == np.shape(b)
        np.testing.assert_array_less(np.abs(a - b), 1e-5 * np.maximum(1.0, np.abs(b)) + 1e-12, err_msg=name)
        assert np.abs(b).max() > 0, name  # every input takes part


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_matches_torch_ref(strategy):
    torch = pytest.importorskip("torch")
    import torch_ref.loss

    img, txt = features()
    sim = img @ txt.T
    args = (strategy, HARD["ratio"], HARD["margin"])
    ours = np.array(hard_negative_mask(mx.array(sim), mx.arange(B), *args, mx.array(SCALE)))
    theirs = torch_ref.loss.hard_negative_mask(
        torch.from_numpy(sim), torch.arange(B), *args, torch.tensor(SCALE)
    )
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-7)  # 0/1 exactly, but weighted


# ---------------------------------------------------------------------------
# Hand-computed cases


def test_siglip_two_orthogonal_pairs():
    # logits = s*I + b = [[s+b, b], [b, s+b]]: two positive and two negative terms, divided by 2 images
    f = mx.array([[1.0, 0.0], [0.0, 1.0]])
    for s, b in ((10.0, -10.0), (2.0, -1.0)):
        expected = (math.log1p(math.exp(-(s + b))) + math.log1p(math.exp(b))) * 2 / 2
        assert math.isclose(float(siglip_loss(f, f, mx.array(s), mx.array(b))), expected, rel_tol=1e-6)


def test_siglip_is_stable_for_large_logits():
    f = mx.array([[1.0, 0.0], [0.0, 1.0]])
    value = float(siglip_loss(f, f, mx.array(100.0), mx.array(-200.0)))  # logits -100 and -200
    assert math.isclose(value, 100.0, rel_tol=1e-6)  # -log sigmoid(-100) = 100 + log1p(e^-100)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hard_negative_weight_zero_is_clip_exactly(strategy):
    img, txt = map(mx.array, features())
    scale = mx.array(SCALE)
    hard = dict(HARD, weight=0.0)
    f_hard = lambda i, t, s: hard_negative_loss(i, t, s, strategy, **hard, label_smoothing=0.1)
    f_clip = lambda i, t, s: clip_loss(i, t, s, label_smoothing=0.1)
    (v_hard, g_hard), (v_clip, g_clip) = (
        mx.value_and_grad(f, (0, 1, 2))(img, txt, scale) for f in (f_hard, f_clip)
    )
    for x, y in zip([v_hard, *g_hard], [v_clip, *g_clip], strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def ce_both_directions(logits: np.ndarray) -> float:
    def ce(rows):
        return float(np.mean([-r[i] + np.log(np.exp(r).sum()) for i, r in enumerate(rows)]))

    return (ce(logits) + ce(logits.T)) / 2


def test_hard_selecting_every_negative_shifts_every_negative_logit():
    """ratio 1: every negative is hard, so each negative logit moves by log(1 + w)."""
    img, txt = features()
    w = 3.0
    logits = SCALE * img.astype(np.float64) @ txt.T + math.log1p(w) * (1 - np.eye(B))
    value = hard_negative_loss(mx.array(img), mx.array(txt), mx.array(SCALE), "hard", 1.0, w, 0.2)
    assert math.isclose(float(value), ce_both_directions(logits), rel_tol=1e-6)


def test_mask_on_a_hand_row():
    # positive 0.9 at column 0; 5 negatives, margin 0.2: the semi-hard band is (0.7, 0.9)
    sim = mx.array([[0.9, 0.85, 0.8, 0.3, 0.95, 0.6]])
    label = mx.array([0])
    mask = lambda strategy, ratio: np.array(
        hard_negative_mask(sim, label, strategy, ratio, 0.2, mx.array(1.0))
    )
    assert num_hard(0.4, 5) == 2 and num_hard(0.1, 5) == 1 and num_hard(0.5, 5) == 3  # 2.5 rounds up
    np.testing.assert_array_equal(mask("hard", 0.4), [[0, 1, 0, 0, 1, 0]])  # 0.95 and 0.85
    np.testing.assert_array_equal(mask("semi-hard", 0.4), [[0, 1, 1, 0, 0, 0]])  # 0.85, 0.8: in the band
    np.testing.assert_array_equal(mask("semi-hard", 0.1), [[0, 1, 0, 0, 0, 0]])  # capped at k = 1
    q = np.exp([0.85, 0.8, 0.3, 0.95, 0.6])
    expected = np.minimum(1.0, 2 * q / q.sum())
    np.testing.assert_allclose(mask("weighted", 0.4), [[0, *expected]], rtol=1e-6)


def test_ties_at_the_kth_similarity_are_all_selected():
    sim = mx.array([[1.0, 0.5, 0.5, 0.5, 0.1]])
    m = hard_negative_mask(sim, mx.array([0]), "hard", 0.25, 0.2, mx.array(1.0))  # k = 1
    np.testing.assert_array_equal(np.array(m), [[0, 1, 1, 1, 0]])


def test_multi_scale_with_one_scale_is_clip_exactly():
    img, txt = map(mx.array, features())
    scale = mx.array(SCALE)
    ours = multi_scale_loss(img, txt, scale, [1.0], label_smoothing=0.1)
    np.testing.assert_array_equal(np.array(ours), np.array(clip_loss(img, txt, scale, 0.1)))


def test_multi_scale_weights_are_normalised():
    img, txt = map(mx.array, features())
    scale = mx.array(SCALE)
    values = [float(multi_scale_loss(img, txt, scale, [0.5, 2.0], w)) for w in ([2.0, 2.0], [1.0, 1.0], None)]
    assert values[0] == values[1] == values[2]
    mixed = float(multi_scale_loss(img, txt, scale, [0.5, 2.0], [1.0, 3.0]))
    expected = 0.25 * float(clip_loss(img, txt, 0.5 * scale)) + 0.75 * float(clip_loss(img, txt, 2.0 * scale))
    assert math.isclose(mixed, expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match="one weight per scale"):
        multi_scale_loss(img, txt, scale, [0.5, 2.0], [1.0])


# ---------------------------------------------------------------------------
# The selection does what it says


def masks(img: np.ndarray, txt: np.ndarray, strategy: str, ratio=HARD["ratio"], margin=HARD["margin"]):
    """Both directions' masks as numpy (n, n): image rows over texts, text rows over images."""
    sim = img @ txt.T
    m = lambda s: np.array(
        hard_negative_mask(mx.array(s), mx.arange(len(s)), strategy, ratio, margin, mx.array(SCALE))
    )
    return sim, m(sim), m(sim.T)


@pytest.mark.parametrize("seed", range(3))
def test_hard_and_semi_hard_select_what_they_say(seed):
    img, txt = features(seed)
    k = num_hard(HARD["ratio"], B - 1)
    sim, *hard = masks(img, txt, "hard")
    _, *semi = masks(img, txt, "semi-hard")
    n_capped = 0
    for s, h, m in ((sim, hard[0], semi[0]), (sim.T, hard[1], semi[1])):
        for i, row in enumerate(s):
            neg = np.delete(np.arange(B), i)
            by_similarity = neg[np.argsort(row[neg])[::-1]]  # most similar first
            assert set(np.flatnonzero(h[i])) == set(by_similarity[:k])  # exactly the k hardest
            band = [j for j in by_similarity if row[i] - HARD["margin"] < row[j] < row[i]]
            assert set(np.flatnonzero(m[i])) == set(band[:k])  # the band, capped at its k hardest
            n_capped += len(band) > k
        assert m.sum() > 0
    assert n_capped > 0  # bands wider than k occur in every seed


def test_weighted_is_a_soft_top_k():
    img, txt = features()
    k = num_hard(HARD["ratio"], B - 1)
    sim, m_img, m_txt = masks(img, txt, "weighted")
    for s, m in ((sim, m_img), (sim.T, m_txt)):
        assert np.all(np.diag(m) == 0) and np.all((m >= 0) & (m <= 1))
        assert np.all(m.sum(1) <= k + 1e-5)
        for i in range(B):  # grows with the similarity within a row
            neg = np.delete(np.arange(B), i)
            order = neg[np.argsort(s[i, neg])]
            assert np.all(np.diff(m[i, order]) >= 0)
    assert (m_img == 1).any() and ((m_img > 0) & (m_img < 1)).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selected_negatives_are_pushed_harder(strategy):
    """d loss / d s_ij for a negative is scale * p'_ij / (2B) per direction; the weight multiplies it by
    (1 + w m_ij) / (1 + w sum_l m_il p_il): in (1, 1 + w] for a selected negative (m = 1), below 1
    for an unselected one (m = 0) of a row that selects any; the positive's pull grows.
    With image features = I, the gradient w.r.t. text[j, i] is d loss / d s_ij."""
    rng = np.random.default_rng(1)
    txt = normalise(np.eye(B) + 0.3 * rng.standard_normal((B, B)))
    img = np.eye(B, dtype=np.float32)
    sim, m_img, m_txt = masks(img, txt, strategy)
    m_txt = m_txt.T  # as entries (i, j) of sim

    def grad_sim(weight):
        f = lambda t: hard_negative_loss(
            mx.array(img), t, mx.array(SCALE), strategy, HARD["ratio"], weight, 0.5
        )
        return np.array(mx.grad(f)(mx.array(txt))).T  # (i, j) -> d loss / d s_ij

    g0, gw = grad_sim(0.0), grad_sim(HARD["weight"])
    off = ~np.eye(B, dtype=bool)
    both = (m_img == 1) & (m_txt == 1)  # fully selected in both directions
    neither = (m_img == 0) & (m_txt == 0) & off
    assert both.sum() >= 3 and (strategy == "weighted" or neither.sum() >= 3)
    assert np.all(gw[off] > 0) and np.all(np.diag(gw) < 0)  # negatives pushed, positives pulled
    assert np.all(gw[both] > g0[both]) and np.all(gw[both] <= (1 + HARD["weight"]) * g0[both] * (1 + 1e-5))
    # a row without a selection (semi-hard: an empty band) keeps its softmax: equal, not smaller
    touched = (m_img.sum(1)[:, None] > 0) | (m_txt.sum(0)[None, :] > 0)  # row i or column j selects
    assert np.all(gw[neither & touched] < g0[neither & touched])
    assert np.all(gw[neither & ~touched] == g0[neither & ~touched])
    diag_touched = np.diag(touched)
    assert np.all(np.diag(gw)[diag_touched] < np.diag(g0)[diag_touched]) and diag_touched.sum() >= B // 2


# ---------------------------------------------------------------------------
# Dispatcher


def test_dispatcher_picks_each_loss():
    img, txt = map(mx.array, features())
    s, b = mx.array(SCALE), mx.array(BIAS)
    cases = [
        (LossConfig(type="clip", label_smoothing=0.1), clip_loss(img, txt, s, 0.1)),
        (LossConfig(type="siglip"), siglip_loss(img, txt, s, b)),
        (
            LossConfig(type="hard_negative", strategy="semi-hard", **HARD),
            hard_negative_loss(img, txt, s, "semi-hard", **HARD),
        ),
        (
            LossConfig(type="multi_scale", scales=[1.0, 3.0], scale_weights=[1.0, 2.0]),
            multi_scale_loss(img, txt, s, [1.0, 3.0], [1.0, 2.0]),
        ),
    ]
    for cfg, expected in cases:
        assert float(contrastive_loss(cfg, img, txt, s, b)) == float(expected), cfg.type


def test_siglip_without_a_bias_names_the_config_key():
    img, txt = map(mx.array, features())
    with pytest.raises(ValueError, match="model.init_logit_bias"):
        contrastive_loss(LossConfig(type="siglip"), img, txt, mx.array(SCALE))


def test_torch_ref_dispatcher_is_single_process():
    torch = pytest.importorskip("torch")
    import torch_ref.loss

    img, txt = (torch.from_numpy(x) for x in features())
    with pytest.raises(ValueError, match="model.init_logit_bias"):
        torch_ref.loss.contrastive_loss(LossConfig(type="siglip"), img, txt, torch.tensor(SCALE))
    with pytest.raises(NotImplementedError, match="group must be None"):
        torch_ref.loss.contrastive_loss(LossConfig(), img, txt, torch.tensor(SCALE), group=object())


# ---------------------------------------------------------------------------
# Local forms (loss.local_loss): the mean over ranks of each rank's rows is the global loss


@pytest.mark.parametrize("cfg", [c for c in PARITY if c.label_smoothing == 0.1] + [LossConfig(type="siglip")])
def test_local_forms_average_to_the_global_loss(cfg):
    """W = 3 simulated ranks of b = 4 rows, columns = the whole batch (what gather_with_grad gives):
    the mean of the 3 local losses is the global loss, as a function, so its gradients are the
    global gradients too. tests/test_distributed.py checks the same through real collectives."""
    img, txt = map(mx.array, features())
    s, bias = mx.array(SCALE), mx.array(BIAS)
    W, b = 3, B // 3

    def one_rank(i, t, s, bias, r):
        rows = slice(r * b, (r + 1) * b)
        columns = (None if cfg.type == "siglip" else i, t, r * b)  # siglip gathers only the texts
        return batch_loss(cfg, i[rows], t[rows], s, bias, columns=columns)

    local = lambda i, t, s, bias: sum(one_rank(i, t, s, bias, r) for r in range(W)) / W
    full = lambda i, t, s, bias: contrastive_loss(cfg, i, t, s, bias)
    argnums = (0, 1, 2, 3) if cfg.type == "siglip" else (0, 1, 2)
    (v_local, g_local), (v_full, g_full) = (
        mx.value_and_grad(f, argnums)(img, txt, s, bias) for f in (local, full)
    )
    assert math.isclose(float(v_local), float(v_full), rel_tol=1e-6)
    for a, c in zip(g_local, g_full, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Every objective trains from the CLI on the built-in data


CLI_OBJECTIVES = {
    "clip-smoothing": ["--loss.label_smoothing", "0.1"],
    "siglip": ["--loss.type", "siglip"],
    "hard_negative-semi-hard": ["--loss.type", "hard_negative", "--loss.strategy", "semi-hard"],
    "hard_negative-hard": ["--loss.type", "hard_negative", "--loss.strategy", "hard"],
    "hard_negative-weighted": ["--loss.type", "hard_negative", "--loss.strategy", "weighted"],
    "multi_scale": [
        "--loss.type",
        "multi_scale",
        "--loss.scales",
        "[0.5, 1, 2]",
        "--loss.scale_weights",
        "[1, 2, 1]",
    ],
}


@pytest.mark.parametrize("name", list(CLI_OBJECTIVES))
def test_every_objective_trains_from_the_cli(tmp_path, name):
    import json
    import math

    from conftest import SMALL

    from mlx_clip.train import main as train_main

    out = tmp_path / name
    summary = train_main(
        ["--out", str(out), *SMALL, *CLI_OBJECTIVES[name], "--steps", "4", "--eval.every", "0",
         "--train.save_every", "0", "--train.log_every", "1"]
    )  # fmt: skip
    assert summary["step"] == 4 and math.isfinite(summary["val_loss"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert not any(r["event"] == "skip" for r in records)
