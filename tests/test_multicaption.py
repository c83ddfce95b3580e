"""Several captions per image, end to end: every source format can give one image several
captions; training draws one per (seed, epoch, index), the same on resume and on either batch
path; evaluation hits on any of an image's captions and queries with every one of them."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mlx_clip.config import load_config
from mlx_clip.data.pipeline import ArraySource, Loader, read_samples, sample_rng
from mlx_clip.data.run_data import EvalSet, RunData, build_run_data
from mlx_clip.evaluation.metrics import evaluate_run

CAPS = {"a.png": ["a red circle", "a circle that is red", "red round thing"], "b.png": ["a blue square"]}


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), seed * 40, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CAPS):
        (folder / name).write_bytes(png(i))


def rows():
    return [(name, c) for name, caps in CAPS.items() for c in caps]


def tar_member(tf, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


# Each writer lays out the same dataset in one format and returns the source to read.
def csv_repeated_rows(tmp):
    write_images(tmp / "imgs")
    lines = ["image,caption"] + [f"imgs/{n},{c}" for n, c in rows()]
    (tmp / "d.csv").write_text("\n".join(lines) + "\n")
    return tmp / "d.csv"


def tsv_repeated_rows(tmp):
    write_images(tmp)
    (tmp / "d.tsv").write_text("image\tcaption\n" + "".join(f"{n}\t{c}\n" for n, c in rows()))
    return tmp / "d.tsv"


def json_list_value(tmp):
    write_images(tmp)
    (tmp / "d.json").write_text(json.dumps([{"image": n, "caption": caps} for n, caps in CAPS.items()]))
    return tmp / "d.json"


def json_repeated_items(tmp):
    write_images(tmp)
    (tmp / "d.json").write_text(json.dumps([{"image": n, "captions": c} for n, c in rows()]))
    return tmp / "d.json"


def jsonl_list_and_repeated_lines(tmp):
    write_images(tmp)
    items = [{"image": "a.png", "caption": CAPS["a.png"][:2]}, {"image": "b.png", "caption": "a blue square"}]
    items.append({"image": "a.png", "caption": CAPS["a.png"][2]})
    (tmp / "d.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n")
    return tmp / "d.jsonl"


def folder_captions_txt(tmp):
    write_images(tmp)
    (tmp / "captions.txt").write_text("".join(f"{n}\t{c}\n" for n, c in rows()))
    return tmp


def folder_sidecar_lines(tmp):
    write_images(tmp)
    for name, caps in CAPS.items():
        (tmp / name).with_suffix(".txt").write_text("\n".join(caps) + "\n\n")
    return tmp


def tar_txt_lines(tmp):
    with tarfile.open(tmp / "s.tar", "w") as tf:
        for i, (name, caps) in enumerate(CAPS.items()):
            key = name.split(".")[0]
            tar_member(tf, f"{key}.png", png(i))
            tar_member(tf, f"{key}.txt", "\n".join(caps).encode())
    return tmp / "s.tar"


def tar_two_txt_members(tmp):
    with tarfile.open(tmp / "s.tar", "w") as tf:
        for i, (name, caps) in enumerate(CAPS.items()):
            key = name.split(".")[0]
            tar_member(tf, f"{key}.txt", caps[0].encode())
            tar_member(tf, f"{key}.png", png(i))
            if len(caps) > 1:  # appended later, as a second writer would
                tar_member(tf, f"{key}.txt", "\n".join(caps[1:]).encode())
    return tmp / "s.tar"


WRITERS = [
    csv_repeated_rows,
    tsv_repeated_rows,
    json_list_value,
    json_repeated_items,
    jsonl_list_and_repeated_lines,
    folder_captions_txt,
    folder_sidecar_lines,
    tar_txt_lines,
    tar_two_txt_members,
]


@pytest.mark.parametrize("write", WRITERS, ids=[w.__name__ for w in WRITERS])
def test_every_format_gives_one_image_several_captions(tmp_path, write):
    samples = read_samples(write(tmp_path))
    # Image paths end in the file name; tar members read "shard.tar:member".
    by_name = {str(s.image).rsplit("/", 1)[-1].split(":")[-1]: s.captions for s in samples}
    assert by_name == CAPS


# ---------------------------------------------------------------------------
# Training: one caption per (seed, epoch, index)


def drawn(loader, epochs, start_batch=0):
    """{(epoch, index): caption} over `epochs`."""
    out = {}
    for e in epochs:
        for b in loader.epoch(e, start_batch):
            out.update({(e, int(i)): c for i, c in zip(b["index"], b["captions"], strict=True)})
    return out


def test_training_draw_is_per_seed_epoch_index_and_covers_the_captions():
    n, epochs = 40, range(12)
    caps = [[f"image {i} caption {k}" for k in range(3)] for i in range(n)]
    small = ArraySource(np.zeros((n, 16, 16, 3), np.uint8), caps)  # at model size: whole-batch path
    large = ArraySource(np.zeros((n, 20, 20, 3), np.uint8), caps)  # resized: per-sample path
    seen = drawn(Loader(small, 8, 16, train=True, seed=5, num_workers=2), epochs)
    assert len(seen) == n * len(epochs)  # 40 = 5 batches of 8: every sample, every epoch
    for (e, i), c in seen.items():
        assert c == caps[i][int(sample_rng(5, e, i).integers(3))]  # the documented draw
    assert seen == drawn(Loader(large, 8, 16, train=True, seed=5, num_workers=0), epochs)
    assert seen != drawn(Loader(small, 8, 16, train=True, seed=6, num_workers=0), epochs)
    per_image = [{seen[e, i] for e in epochs} for i in range(n)]
    assert all(len(s) >= 2 for s in per_image)  # epochs show an image with different captions
    assert sum(len(s) == 3 for s in per_image) >= 0.9 * n  # 12 epochs reach nearly all of them
    # Resume: a fresh loader from batch 3 of epoch 7 draws what the uninterrupted run drew.
    resumed = drawn(Loader(small, 8, 16, train=True, seed=5, num_workers=0), [7], start_batch=3)
    assert len(resumed) == 16 and all(seen[k] == c for k, c in resumed.items())


# ---------------------------------------------------------------------------
# Evaluation: every caption


def test_evaluate_run_hits_on_any_caption_and_queries_with_every_caption():
    """Four images; each has a good caption and a bad one (that reads like the next image).
    Image i's pixels are all i * 20; a fake text tower reads the caption's image and quality."""
    n = 4
    images = np.stack([np.full((16, 16, 3), 20 * i, np.uint8) for i in range(n)])
    captions = [[f"bad {i}", f"good {i}"] if i % 2 else [f"good {i}", f"bad {i}"] for i in range(n)]

    def encode_image(x):  # normalised pixels -> the image's own axis
        i = np.rint((x[:, 0, 0, 0] * 0.26862954 + 0.48145466) * 255 / 20).astype(int)
        return np.eye(n)[i]

    def tokenize(texts):
        return np.array([[t.startswith("good"), int(t.split()[1])] for t in texts], np.int32)

    def encode_text(tokens):  # good: the own image's axis; bad: mostly the next image's
        own, good = tokens[:, 1], tokens[:, 0].astype(bool)
        # (not exactly the next image's axis: that would tie with its good caption, and a tie is a miss)
        bad = 0.8 * np.eye(n)[(own + 1) % n] + 0.6 * np.eye(n)[own]
        return np.where(good[:, None], np.eye(n)[own], bad)

    loader = Loader(ArraySource(images, captions), 3, 16, train=False, num_workers=0)
    data = RunData(None, None, tokenize, {"val": EvalSet(loader, captions)})
    m = evaluate_run(data, encode_image, encode_text)
    assert m["i2t_R@1"] == 1.0  # the good caption is first for even images, second for odd ones
    assert m["t2i_R@1"] == 0.5  # all 8 captions are queries: the 4 bad ones find the wrong image
    assert m["retrieval_images"] == n


# ---------------------------------------------------------------------------
# The run's data: config keys reach the generator and the loader


def test_run_data_builds_paraphrased_builtin_data_with_the_hard_negative_sampler():
    overrides = {
        "model.image_size": "32",
        "model.patch_size": "8",
        "model.vocab_size": "600",
        "data.builtin_train_size": "64",
        "data.builtin_val_size": "16",
        "data.batch_size": "16",
        "data.builtin_paraphrases": "3",
        "data.sampler": "hard_negative",
    }
    cfg = load_config(None, list(overrides.items()))
    data = build_run_data(cfg, cfg.model_config())
    assert data.train.sampler == "hard_negative"
    assert all(len(c) == len(set(c)) == 3 for c in data.train.captions)
    assert all(len(c) == 5 for c in data.evals["val"].captions)  # the held-out set stays the same
    assert "3 paraphrases" in data.source
    batch = next(data.train.epoch(0))
    assert batch["tokens"].shape == (16, cfg.model_config().context_length)
