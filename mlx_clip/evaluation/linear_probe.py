"""Linear probe: multinomial logistic regression on frozen image features (numpy, L-BFGS).

As in the CLIP paper (appendix A.3): logistic regression fitted with L-BFGS, its L2 strength
chosen by a sweep on a held-out split of the training features, then refitted on all of them.
Features are L2-normalised first, as CLIP_benchmark does by default (`normalize=True`); the
CLIP paper's own code feeds raw features to scikit-learn. Deterministic for a given seed on
one machine (the BLAS thread count can move the last bits of a fit).

The objective is mean cross-entropy + l2/2 * |W|^2 (the bias is not penalised), which is
scikit-learn's LogisticRegression(C=1 / (l2 * N)) for N training rows.
"""

from __future__ import annotations

import numpy as np

from .classification import classification_metrics
from .metrics import l2_normalize

# The sweep: decades from strong to weak (each fit starts from the previous solution), then the
# half-decades either side of the best, as CLIP_benchmark's search narrows around its peak.
L2_GRID = tuple(10.0**e for e in range(0, -7, -1))


def _loss_and_grad(w: np.ndarray, x: np.ndarray, onehot: np.ndarray, l2: float):
    """Mean cross-entropy + l2/2 |W|^2 and its gradient; w (D+1, C) with the bias as the last row.

    The matmuls run in float32; the softmax and the loss in float64, so that the line search can
    still see the loss fall near the optimum."""
    logits = (x @ w[:-1] + w[-1]).astype(np.float64)  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(axis=1, keepdims=True)
    n = len(x)
    loss = float(np.log(total).sum() - (logits * onehot).sum()) / n
    delta = ((exp / total - onehot) / n).astype(np.float32)  # (N, C): d loss / d logits
    grad = np.empty_like(w)
    grad[:-1] = x.T @ delta + l2 * w[:-1]
    grad[-1] = delta.sum(axis=0)
    loss += 0.5 * l2 * float((w[:-1].astype(np.float64) ** 2).sum())
    return loss, grad


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    l2: float,
    init: np.ndarray | None = None,
    max_iter: int = 500,
    tol: float = 1e-4,
    ftol: float = 1e-9,
    memory: int = 10,
) -> np.ndarray:
    """(D+1, C) weights (bias last) minimising the objective with L-BFGS and a backtracking
    (Armijo) line search. Stops when the gradient's norm falls below `tol` times its norm at zero
    weights (scale-free: the gradient of normalised features over many classes is small), when a
    step lowers the loss by less than `ftol` relative (as scipy's L-BFGS-B), or after `max_iter`."""
    x = np.asarray(x, dtype=np.float32)
    onehot = np.eye(n_classes, dtype=np.float32)[y]
    zero = np.zeros((x.shape[1] + 1, n_classes), np.float32)
    loss, grad = _loss_and_grad(zero, x, onehot, l2)
    stop = tol * np.linalg.norm(grad)
    w = zero
    if init is not None:
        w = init.astype(np.float32)
        loss, grad = _loss_and_grad(w, x, onehot, l2)
    steps, changes = [], []  # the last `memory` (s, y) pairs of L-BFGS
    for _ in range(max_iter):
        if np.linalg.norm(grad) <= stop:
            break
        # Two-loop recursion: direction = -H grad with H the L-BFGS inverse-Hessian estimate.
        q = grad.copy()
        alphas = []
        for s, dg in reversed(list(zip(steps, changes, strict=True))):
            a = (s * q).sum() / (dg * s).sum()
            alphas.append(a)
            q -= a * dg
        if steps:
            q *= (steps[-1] * changes[-1]).sum() / (changes[-1] ** 2).sum()
        else:
            q /= max(np.linalg.norm(grad), 1.0)  # first step: at most unit length
        for (s, dg), a in zip(zip(steps, changes, strict=True), reversed(alphas), strict=True):
            q += s * (a - (dg * q).sum() / (dg * s).sum())
        direction = -q
        slope = float((grad * direction).sum())
        if slope >= 0:  # not a descent direction (curvature lost to rounding): restart
            steps, changes, direction = [], [], -grad
            slope = -float((grad**2).sum())
        t = 1.0
        for _ in range(30):
            new_loss, new_grad = _loss_and_grad(w + t * direction, x, onehot, l2)
            if new_loss <= loss + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break  # no decrease left at this precision
        done = loss - new_loss <= ftol * max(abs(loss), 1.0)
        s, dg = t * direction, new_grad - grad
        if (s * dg).sum() > 1e-10:  # keep the pair only with positive curvature
            steps, changes = [*steps[-memory + 1 :], s], [*changes[-memory + 1 :], dg]
        w, loss, grad = w + s, new_loss, new_grad
        if done:
            break
    return w


def _scores(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ w[:-1] + w[-1]


def held_out_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices: `fraction` of every class held out, at random (seeded); a class
    keeps at least one training row."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(fraction * len(rows))), len(rows) - 1)
        val.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _top1(w: np.ndarray, x: np.ndarray, y: np.ndarray, classnames: list[str]) -> float:
    return classification_metrics(_scores(w, x), y, classnames, topk=(1,))["top1"]


def sweep_l2(x, y, classnames, grid=L2_GRID, val_fraction=0.2, seed=0, max_iter=150):
    """Choose the L2 strength by top-1 on a held-out split of (x, y); a tie goes to the stronger.

    Returns (best l2, {l2: held-out top-1} for every strength tried, the weights fitted with it)."""
    train, val = held_out_split(y, val_fraction, seed)
    if len(val) == 0:
        raise ValueError(f"{len(y)} training rows leave none to hold out for the L2 sweep; give more")
    n = len(classnames)
    tried, fits = {}, {}
    w = None
    for l2 in sorted(grid, reverse=True):  # strong to weak, each fit warm-started from the last
        w = fit_logistic(x[train], y[train], n, l2, init=w, max_iter=max_iter)
        tried[l2], fits[l2] = _top1(w, x[val], y[val], classnames), w
    best = max(sorted(tried, reverse=True), key=tried.get)  # max keeps the first (strongest) on a tie
    for l2 in (best * 10**0.5, best / 10**0.5):  # refine: the half-decades either side
        w = fit_logistic(x[train], y[train], n, l2, init=fits[best], max_iter=max_iter)
        tried[l2], fits[l2] = _top1(w, x[val], y[val], classnames), w
    best = max(sorted(tried, reverse=True), key=tried.get)
    return best, tried, fits[best]


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    classnames: list[str],
    grid=L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 150,
) -> dict:
    """Fit on the training features (L2 strength from sweep_l2), score the test features.

    `max_iter` bounds each L-BFGS fit: weakly penalised fits on separable features would run on
    while the weights grow and the held-out accuracy no longer changes.
    Returns classification_metrics of the test set (top1, top5, mean_per_class_recall,
    per_class_recall, confusion) plus "l2" (the strength chosen) and "l2_sweep" ({l2: held-out top-1})."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for name, feats, labels in (
        ("train", train_features, train_labels),
        ("test", test_features, test_labels),
    ):
        if len(feats) != len(labels) or len(feats) == 0:
            raise ValueError(f"linear probe {name} set: {len(feats)} feature rows and {len(labels)} labels")
        if not 0 <= labels.min() <= labels.max() < len(classnames):
            raise ValueError(f"linear probe {name} set: labels must be 0..{len(classnames) - 1}")
    x_train = l2_normalize(np.asarray(train_features, dtype=np.float32))
    x_test = l2_normalize(np.asarray(test_features, dtype=np.float32))
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise ValueError("linear probe: a feature row is not finite (or all zero); check the encoder")
    l2, tried, w = sweep_l2(x_train, train_labels, classnames, grid, val_fraction, seed, max_iter)
    # the refit on every training row starts from the held-out fit: the same optimum, sooner
    w = fit_logistic(x_train, train_labels, len(classnames), l2, init=w, max_iter=max_iter)
    out = classification_metrics(_scores(w, x_test), test_labels, classnames)
    out["l2"] = float(l2)
    out["l2_sweep"] = {float(k): v for k, v in sorted(tried.items(), reverse=True)}
    return out
