"""`python -m mlx_clip.eval` against LAION's CLIP_benchmark end to end, and the linear probe
against zero-shot, on one briefly trained small model (conftest.SMALL at 40 px, built-in images).

The parity tests run what a user runs on both sides: our eval CLI (in-process) on sets written to
disk, and CLIP_benchmark's `zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate` on
the same checkpoint exported with `python -m mlx_clip.export --to open_clip`, loaded by open_clip
(`local-dir:`, its own tokenizer and preprocess) and fed by a torch DataLoader over the same files.
The images are built-in renders at the model's input size and larger (square and not), so the
resize and centre-crop paths are compared too. The tests check the steps in between:
- both pipelines give the model the same pixels (to float rounding);
- the unit features differ by float rounding only (MLX against torch kernels), which bounds how
  far apart the two sides' scores can be;
- a correct score within twice that bound of a wrong one (a near-tie) could count as a hit on one
  side only (ties: metrics.label_ranks); there is none in these sets, and each one there were
  would allow one row's worth of difference. Otherwise the metrics must agree to 1e-6.

They skip only when torch, open_clip or clip_benchmark (+ scikit-learn) cannot be imported; the dev
set-up (scripts/setup.sh dev) installs them all. The linear-probe test needs none of them.
"""

import json

import numpy as np
import pytest
from conftest import TRAINED_GRID, TRAINED_SIZE, clip_benchmark_float
from PIL import Image

from mlx_clip.data.synthetic import generate
from mlx_clip.data.synthetic_captions import TEMPLATES
from mlx_clip.data.synthetic_scene import CLASSNAMES
from mlx_clip.evaluation.metrics import l2_normalize
from mlx_clip.evaluation.suite import class_text_features
from mlx_clip.evaluation.templates import load_templates

SIZE, GRID = TRAINED_SIZE, TRAINED_GRID


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "checkpoints" / "latest"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(open_clip model, tokenizer, preprocess) of the checkpoint, exported as a user does."""
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from mlx_clip.export import main as export_main

    out = tmp_path_factory.mktemp("exported") / "open_clip"
    export_main(["--checkpoint", str(checkpoint), "--to", "open_clip", "--out", str(out)])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{out}"), preprocess


def templates_file(path) -> list[str]:
    """The built-in prompts written in CLIP_benchmark's `{c}` form; returns them in that form."""
    templates = [t.replace("{}", "{c}") for t in TEMPLATES]
    path.write_text("\n".join(templates) + "\n")
    return templates


def built_in_images(n, part, seed=0, sizes=True):
    """n single-object built-in images (labels, captions). sizes=True draws three shapes in turn:
    SIZE x SIZE (no resize), 1.5 SIZE square (a resize) and 1.5 SIZE x 1.25 SIZE (a resize and a
    centre crop); sizes=False keeps them all SIZE x SIZE, as the model was trained on."""
    kw = dict(seed=seed, part=part, split="single", grid=GRID, paraphrases=4)
    small, large = generate(n, SIZE, **kw), generate(n, 3 * SIZE // 2, **kw)
    shape = np.arange(n) % 3 if sizes else np.zeros(n, int)
    pick = [small if k == 0 else large for k in shape]
    images = [
        d.images[i][:, : 5 * SIZE // 4] if k == 2 else d.images[i]
        for i, (d, k) in enumerate(zip(pick, shape, strict=True))
    ]
    labels = np.array([d.labels[i] for i, d in enumerate(pick)])
    return images, labels, [d.captions[i] for i, d in enumerate(pick)]


def image_folder(root, classes, per_class, part, seed=0, sizes=True):
    """root/<class_name>/<i>.png: per_class[k] built-in images of CLASSNAMES[classes[k]]."""
    images, labels, _ = built_in_images(3 * max(per_class) * len(CLASSNAMES), part, seed, sizes)
    for k, count in zip(classes, per_class, strict=True):
        picks = np.flatnonzero(labels == k)[:count]
        assert len(picks) == count, f"too few built-in images of class {k}"
        folder = root / CLASSNAMES[k].replace(" ", "_")
        folder.mkdir(parents=True)
        for i in picks:
            Image.fromarray(np.ascontiguousarray(images[i])).save(folder / f"{i}.png")
    return root


def eval_cli(checkpoint, out, *sets):
    from mlx_clip.eval import main as eval_main

    eval_main(["--checkpoint", str(checkpoint), *map(str, sets), "--batch-size", "8", "--out", str(out)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ours(checkpoint):
    """(encode_image, encode_text, tokenize) of the checkpoint in MLX, on numpy, as the CLI runs it."""
    import mlx.core as mx

    from mlx_clip import load

    model, tokenizer, _ = load(checkpoint)
    return (
        lambda x: np.array(model.encode_image(mx.array(x))),
        lambda t: np.array(model.encode_text(mx.array(t))),
        tokenizer,
    )


def our_pixels(path):
    """What our eval pipeline feeds the model for the image at `path` (HWC float32)."""
    from mlx_clip.evaluation.eval_images import eval_batches, eval_loader
    from mlx_clip.evaluation.retrieval_sets import CaptionedImages

    ds = CaptionedImages("one", [str(path)], [["caption"]])
    (images, _, _), *_ = eval_batches(eval_loader(ds, SIZE, batch_size=1, num_workers=1))
    return images[0]


def image_gap(encode_image, model, preprocess, paths) -> float:
    """Largest distance between our unit image feature and open_clip's, over `paths`, after
    checking that both pipelines give the model the same pixels (to float rounding)."""
    import torch

    mine = np.stack([our_pixels(p) for p in paths])
    theirs = torch.stack([preprocess(Image.open(p)) for p in paths])  # (N, 3, S, S)
    np.testing.assert_allclose(mine, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    with torch.no_grad():
        theirs = model.encode_image(theirs, normalize=True).numpy()
    return unit_gap(encode_image(mine), theirs)


def unit_gap(mine, theirs) -> float:
    """max_i |mine_i / |mine_i| - theirs_i| (theirs already unit rows)."""
    return float(np.linalg.norm(l2_normalize(np.asarray(mine, np.float64)) - theirs, axis=1).max())


def near_ties(scores, positive, margin) -> np.ndarray:
    """Rows (bool) where a correct score (`positive`, a mask over `scores`) lies within `margin`
    of a wrong one: the only rows where features that differ by rounding can turn a hit into a
    miss. Elsewhere both sides must count the same hits."""
    return np.array(
        [
            np.abs(r[p][:, None] - r[~p][None, :]).min() <= margin
            for r, p in zip(scores, positive, strict=True)
        ]
    )


# ---------------------------------------------------------------------------
# Zero-shot classification


def test_zero_shot_equals_clip_benchmark_end_to_end(checkpoint, ours, exported, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    datasets = pytest.importorskip("torchvision.datasets")
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    monkeypatch.setattr(zsc, "float", clip_benchmark_float, raising=False)
    model, tokenizer, preprocess = exported
    # 7 classes (top-5 is scored and not trivial), 25 images: no batch of 8 is full at the end.
    root = image_folder(tmp_path / "folder", [0, 5, 9, 11, 14, 18, 23], [4, 3, 4, 3, 4, 3, 4], part="test")
    templates = templates_file(tmp_path / "templates.txt")

    result = eval_cli(
        checkpoint,
        tmp_path / "eval.json",
        "--zeroshot",
        f"shapes={root}",
        "--templates",
        tmp_path / "templates.txt",
    )

    folder = datasets.ImageFolder(str(root), transform=preprocess)
    classnames = [c.replace("_", " ") for c in folder.classes]  # the ImageFolder naming rule
    assert classnames == result["details"]["shapes"]["classnames"]
    loader = torch.utils.data.DataLoader(folder, batch_size=8)
    theirs = zsc.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False)

    # Both sides' scores differ by at most the image features' gap plus the class weights' gap.
    encode_image, encode_text, tokenize = ours
    classifier = zsc.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
    mine = class_text_features(classnames, load_templates(tmp_path / "templates.txt"), encode_text, tokenize)
    gap = image_gap(encode_image, model, preprocess, [p for p, _ in folder.samples])
    gap += unit_gap(mine, classifier.T.numpy())
    assert gap < 1e-4  # the exported model and its tokenizer compute our features
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    near = near_ties(logits.numpy() / 100, np.eye(len(classnames), dtype=bool)[target], 2 * gap).sum()
    assert near <= 2, f"{near} of {len(target)} images near a tie: the comparison says little"
    counts = np.bincount(target, minlength=len(classnames))
    m = result["metrics"]
    assert 0 < m["shapes/top1"] < 1  # neither all right nor all wrong
    # Equal to 1e-6, up to ties: a near-tie row may count as a hit on one side only.
    assert abs(m["shapes/top1"] - theirs["acc1"]) <= near / len(target) + 1e-6
    assert abs(m["shapes/top5"] - theirs["acc5"]) <= near / len(target) + 1e-6
    recall = m["shapes/mean_per_class_recall"] - theirs["mean_per_class_recall"]
    assert abs(recall) <= near / (len(classnames) * counts.min()) + 1e-6


# ---------------------------------------------------------------------------
# Retrieval


def karpathy_set(root, n_test=13):
    """root/karpathy.json: n_test "test" images with 1 to 4 distinct captions each, and one
    "train" image that must be left out. Returns the JSON's path."""
    images, _, captions = built_in_images(n_test + 1, part="test", seed=3)
    seen, entries = set(), []
    for i, (image, caps) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(np.ascontiguousarray(image)).save(root / f"{i}.png")
        # Identical captions of two images would tie: keep each text once in the set.
        kept = [c for c in caps[: 1 + i % 4] if c not in seen]
        seen.update(kept)
        assert kept, f"image {i}: every caption already belongs to an earlier image"
        split = "train" if i == n_test else "test"
        entries.append({"filename": f"{i}.png", "split": split, "sentences": [{"raw": c} for c in kept]})
    path = root / "karpathy.json"
    path.write_text(json.dumps({"images": entries}))
    return path


class KarpathyImages:
    """The torch side's reader: (preprocessed image, its captions) of each "test" image."""

    def __init__(self, path, transform):
        entries = json.loads(path.read_text())["images"]
        self.items = [
            (path.parent / e["filename"], [s["raw"] for s in e["sentences"]])
            for e in entries
            if e["split"] == "test"
        ]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, captions = self.items[i]
        return self.transform(Image.open(path)), captions


def test_retrieval_equals_clip_benchmark_end_to_end(checkpoint, ours, exported, tmp_path):
    torch = pytest.importorskip("torch")
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    model, tokenizer, preprocess = exported
    path = karpathy_set(tmp_path)

    result = eval_cli(checkpoint, tmp_path / "eval.json", "--retrieval", f"caps={path}")

    dataset = KarpathyImages(path, preprocess)
    captions = [c for _, caps in dataset.items for c in caps]
    assert result["details"]["caps"]["images"] == len(dataset) == 13
    assert result["details"]["caps"]["captions"] == len(captions)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=5, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b])
    )
    theirs = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])

    # Both sides' scores differ by at most the image features' gap plus the caption features' gap.
    encode_image, encode_text, tokenize = ours
    with torch.no_grad():
        texts = model.encode_text(tokenizer(captions), normalize=True)
        images = torch.cat([model.encode_image(x, normalize=True) for x, _ in loader])
    gap = image_gap(encode_image, model, preprocess, [p for p, _ in dataset.items])
    gap += unit_gap(encode_text(tokenize(captions)), texts.numpy())
    assert gap < 1e-4
    scores = (images @ texts.T).numpy()  # (images, captions)
    owner = np.repeat(np.arange(len(dataset)), [len(c) for _, c in dataset.items])
    positive = owner[None, :] == np.arange(len(dataset))[:, None]
    near_i2t = near_ties(scores, positive, 2 * gap).sum()
    near_t2i = near_ties(scores.T, positive.T, 2 * gap).sum()
    assert near_i2t + near_t2i <= 2, "too many near-ties: the comparison says little"
    m = result["metrics"]
    assert 0 < m["caps/t2i_R@1"] < 1 and 0 < m["caps/i2t_R@1"] < 1
    for k in (1, 5, 10):  # equal to 1e-6, up to ties
        i2t = m[f"caps/i2t_R@{k}"] - theirs[f"text_retrieval_recall@{k}"]
        t2i = m[f"caps/t2i_R@{k}"] - theirs[f"image_retrieval_recall@{k}"]
        assert abs(i2t) <= near_i2t / len(dataset) + 1e-6
        assert abs(t2i) <= near_t2i / len(captions) + 1e-6


# ---------------------------------------------------------------------------
# Linear probe


def test_linear_probe_beats_zero_shot_on_built_in_data(checkpoint, tmp_path):
    """Held-out built-in images of all 24 classes: a probe fitted on other unseen built-in images
    classifies them better than the prompts do."""
    every = list(range(len(CLASSNAMES)))
    val = image_folder(tmp_path / "val", every, [6] * len(every), part="val", sizes=False)
    train = image_folder(tmp_path / "train", every, [10] * len(every), part="test", seed=1, sizes=False)
    templates_file(tmp_path / "templates.txt")

    result = eval_cli(
        checkpoint,
        tmp_path / "eval.json",
        *("--zeroshot", f"shapes={val}", "--linear-probe", f"probe={train},{val}"),
        *("--templates", tmp_path / "templates.txt"),
    )
    m, probe = result["metrics"], result["details"]["probe"]
    assert probe["images"] == 144 and probe["train_images"] == 240
    assert m["shapes/top1"] > 2 / 24  # the model learned something: over twice chance
    assert m["probe/probe_top1"] > m["shapes/top1"]
