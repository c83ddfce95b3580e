"""Symmetric InfoNCE: hand-computed values and torch_ref parity."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip.training.loss import clip_loss


def test_hand_computed_two_pairs():
    # Orthogonal unit features: logits = scale * I, so each row is softmax([s, 0]).
    f = mx.array([[1.0, 0.0], [0.0, 1.0]])
    s = 2.0
    expected = -math.log(math.exp(s) / (math.exp(s) + 1))
    assert math.isclose(float(clip_loss(f, f, mx.array(s))), expected, rel_tol=1e-6)


def test_asymmetric_case_averages_both_directions():
    img = mx.array([[1.0, 0.0], [0.6, 0.8]])
    txt = mx.array([[1.0, 0.0], [0.0, 1.0]])
    logits = np.array(img) @ np.array(txt).T

    def ce(rows):
        return float(np.mean([-r[i] + np.log(np.exp(r).sum()) for i, r in enumerate(rows)]))

    expected = (ce(logits) + ce(logits.T)) / 2
    assert math.isclose(float(clip_loss(img, txt, mx.array(1.0))), expected, rel_tol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_ref(smoothing):
    torch = pytest.importorskip("torch")
    import torch_ref

    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((2, 7, 5)).astype(np.float32)
    ours = clip_loss(mx.array(img), mx.array(txt), mx.array(3.0), label_smoothing=smoothing)
    theirs = torch_ref.clip_loss(torch.from_numpy(img), torch.from_numpy(txt), torch.tensor(3.0), smoothing)
    assert math.isclose(float(ours), theirs.item(), rel_tol=1e-5)
