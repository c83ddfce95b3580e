"""Zero-shot, retrieval and linear-probe numbers against CLIP_benchmark's and scikit-learn's own code.

The parity tests need `clip-benchmark` (installed without its dependencies) and scikit-learn:
    pip install scikit-learn && pip install --no-deps clip-benchmark==1.6.2
They feed CLIP_benchmark's evaluators a stand-in model whose "tokenizer" returns the text features
and whose encoders are the identity, so both sides see the same features.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import clip_benchmark_float

from mlx_clip.evaluation.classification import (
    classification_metrics,
    write_confusion_png,
    zero_shot_metrics,
)
from mlx_clip.evaluation.linear_probe import fit_logistic, held_out_split, linear_probe
from mlx_clip.evaluation.metrics import retrieval_metrics, zero_shot_accuracy, zero_shot_classifier


class Identity:
    """CLIP_benchmark's model interface over precomputed features."""

    def encode_image(self, x):
        return x

    def encode_text(self, x):
        return x


class Batches(list):
    """A list of batches that takes a `dataset` attribute, as a DataLoader has."""


def lookup(features: dict):
    """A 'tokenizer' that maps each text to its precomputed feature row."""
    torch = pytest.importorskip("torch")
    return lambda texts: torch.tensor(np.stack([features[t] for t in texts]))


def zero_shot_problem(n_classes=12, n_templates=3, n=300, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_classes, n_templates, dim))
    labels = rng.integers(0, n_classes, n)
    images = text[labels].mean(axis=1) + 1.5 * rng.normal(size=(n, dim))  # some right, some wrong
    return text, images, labels


def clip_benchmark_zero_shot(text, images, labels, classnames, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    monkeypatch.setattr(zsc, "float", clip_benchmark_float, raising=False)
    templates = [f"template {t}: {{c}}" for t in range(text.shape[1])]
    feats = {tpl.format(c=c): text[i, t] for i, c in enumerate(classnames) for t, tpl in enumerate(templates)}
    batches = [
        (torch.tensor(images[i : i + 64]), torch.tensor(labels[i : i + 64]))
        for i in range(0, len(labels), 64)
    ]
    loader = Batches(batches)
    loader.dataset = SimpleNamespace(classes=classnames)  # what CLIP_benchmark reads the class count from
    return zsc.evaluate(Identity(), loader, lookup(feats), classnames, templates, "cpu", amp=False)


def test_zero_shot_equals_clip_benchmark_on_tie_free_data(monkeypatch):
    text, images, labels = zero_shot_problem()
    classnames = [f"class {i}" for i in range(text.shape[0])]
    theirs = clip_benchmark_zero_shot(text, images, labels, classnames, monkeypatch)
    ours = zero_shot_metrics(images, zero_shot_classifier(text), labels, classnames)
    assert 0.2 < ours["top1"] < 0.9  # neither trivial nor hopeless
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)
    # the training-time metric is the same number
    acc = zero_shot_accuracy(images, zero_shot_classifier(text), labels)
    assert acc == {"zeroshot_top1": ours["top1"], "zeroshot_top5": ours["top5"]}


def test_zero_shot_differs_from_clip_benchmark_only_on_exact_ties(monkeypatch):
    text, _, _ = zero_shot_problem(n_classes=6)
    images = np.ones((6, text.shape[2]))  # every image the same: its scores tie across images...
    text = np.repeat(text[:1], 6, axis=0)  # ...and every class embeds alike: all scores tie
    labels, classnames = np.arange(6), [f"c{i}" for i in range(6)]
    theirs = clip_benchmark_zero_shot(text, images, labels, classnames, monkeypatch)
    ours = zero_shot_metrics(images, zero_shot_classifier(text), labels, classnames)
    assert ours["top1"] == 0.0 and ours["top5"] == 0.0  # a tie is a miss
    assert theirs["acc1"] > 0  # torch's order gives some class the hit


def test_per_class_recall_and_confusion_by_hand():
    logits = np.array([[3.0, 1, 0], [0, 2, 1], [1, 0, 0.5], [0, 1, 1]])  # last row: label 2 ties class 1
    labels = np.array([0, 1, 1, 2])
    m = classification_metrics(logits, labels, ["cat", "dog", "owl"], topk=(1, 2, 5))
    assert m["top1"] == 0.5 and m["top2"] == 0.75 and "top5" not in m  # k above C is left out
    assert m["per_class_recall"] == {"cat": 1.0, "dog": 0.5, "owl": 0.0}
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    # rows true, columns predicted; the tie predicts the rival (dog), not a hit for owl
    np.testing.assert_array_equal(m["confusion"], [[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    # a class with no images has no recall and does not enter the mean (as balanced_accuracy_score)
    m = classification_metrics(logits[:3], labels[:3], ["cat", "dog", "owl"])
    assert m["per_class_recall"]["owl"] is None and m["mean_per_class_recall"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="label 3 is not one of the 3 classes"):
        classification_metrics(logits, np.array([0, 1, 3, 2]), ["cat", "dog", "owl"])
    with pytest.raises(ValueError, match="3 classes scored but 2 class names"):
        classification_metrics(logits, labels, ["cat", "dog"])
    nan = classification_metrics(np.full_like(logits, np.nan), labels, ["cat", "dog", "owl"])
    assert np.isnan(nan["top1"]) and np.isnan(nan["mean_per_class_recall"])


def test_confusion_png(tmp_path):
    from PIL import Image

    for n in (3, 60):  # labelled and annotated; too many classes for labels
        confusion = np.random.default_rng(n).integers(0, 9, size=(n, n))
        path = tmp_path / f"confusion_{n}.png"
        write_confusion_png(confusion, [f"class {i}" for i in range(n)], path, title="zero-shot")
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 200
    with pytest.raises(ValueError, match="for 2 class names"):
        write_confusion_png(np.zeros((3, 3)), ["a", "b"], tmp_path / "bad.png")


def retrieval_problem(n_images=40, dim=16, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim))
    per_image = rng.integers(1, 6, n_images)  # 1 to 5 captions each
    owner = np.repeat(np.arange(n_images), per_image)
    texts = images[owner] + 1.2 * rng.normal(size=(len(owner), dim))
    return images, texts, owner


def test_retrieval_equals_clip_benchmark_with_several_captions_per_image():
    torch = pytest.importorskip("torch")
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    images, texts, owner = retrieval_problem()
    captions = [f"caption {j}" for j in range(len(owner))]
    batches = []
    for start in range(0, len(images), 16):
        idx = range(start, min(start + 16, len(images)))
        batches.append(
            (
                torch.tensor(images[list(idx)]),
                [[captions[j] for j in np.flatnonzero(owner == i)] for i in idx],
            )
        )
    feats = dict(zip(captions, texts, strict=True))
    theirs = zsr.evaluate(Identity(), batches, lookup(feats), "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = retrieval_metrics(images, texts, owner)  # no `texts=`: CLIP_benchmark has no same-text rule
    for k in (1, 5, 10):
        assert ours[f"i2t_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"t2i_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
    assert 0.1 < ours["t2i_R@1"] < 0.9


def test_median_rank():
    images = np.eye(3)
    # text->image: captions 0 and 1 rank their image 1st, caption 2 ranks its image 3rd
    texts = np.array([[1.0, 0, 0], [0.5, 0.6, 0.0], [0.5, 0.45, 0.4]])
    m = retrieval_metrics(images, texts, np.array([0, 1, 2]))
    assert m["t2i_mean_rank"] == pytest.approx(5 / 3) and m["t2i_median_rank"] == 1.0
    assert m["i2t_median_rank"] == 1.0 and m["i2t_mean_rank"] == 1.0  # own captions score highest


def separable(n_classes=5, n=400, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = 4 * np.eye(n_classes, dim)
    labels = rng.integers(0, n_classes, n)
    return centres[labels] + 0.3 * rng.normal(size=(n, dim)), labels


def test_linear_probe_separates_separable_features_deterministically():
    x, y = separable()
    xt, yt = separable(seed=1)
    names = [f"c{i}" for i in range(5)]
    a = linear_probe(x, y, xt, yt, names, seed=3)
    assert a["top1"] == 1.0 and a["top5"] == 1.0 and a["mean_per_class_recall"] == 1.0
    assert a["l2"] in a["l2_sweep"] and len(a["l2_sweep"]) == 9  # 7 decades + 2 half-decades
    b = linear_probe(x, y, xt, yt, names, seed=3)
    assert a["l2"] == b["l2"] and a["l2_sweep"] == b["l2_sweep"]
    np.testing.assert_array_equal(a["confusion"], b["confusion"])
    with pytest.raises(ValueError, match="labels must be 0..4"):
        linear_probe(x, y + 1, xt, yt, names)


def test_held_out_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(4), [10, 5, 1, 20])
    train, val = held_out_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(len(y)))
    assert np.bincount(y[val], minlength=4).tolist() == [2, 1, 0, 4]  # the single row stays in train
    assert np.array_equal(val, held_out_split(y, 0.2, seed=0)[1])


def test_logistic_regression_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    n_classes, dim, n = 6, 20, 600
    centres = rng.normal(size=(n_classes, dim))
    y, yt = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
    x = centres[y] + 1.5 * rng.normal(size=(n, dim))
    xt = centres[yt] + 1.5 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xt /= np.linalg.norm(xt, axis=1, keepdims=True)
    l2 = 1e-3
    w = fit_logistic(x, y, n_classes, l2, max_iter=1000, tol=1e-6)
    ours = np.mean((xt @ w[:-1] + w[-1]).argmax(axis=1) == yt)
    # the same objective: mean cross-entropy + l2/2 |W|^2  <=>  C = 1 / (l2 * N)
    ref = linear_model.LogisticRegression(C=1 / (l2 * n), max_iter=5000, tol=1e-8).fit(x, y)
    assert 0.4 < ours and abs(ours - ref.score(xt, yt)) <= 0.01
    # the penalty makes each feature's weights sum to zero over the classes, so they compare directly
    assert np.abs(w[:-1] - ref.coef_.T).max() < 0.02 * np.abs(ref.coef_).max()
