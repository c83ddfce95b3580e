"""Zero-shot and retrieval metrics on hand-computed cases."""

import numpy as np
import pytest

from mlx_clip.evaluation.metrics import retrieval_metrics, zero_shot_accuracy, zero_shot_classifier


def test_zero_shot_top1_top5_hand_computed():
    classifier = np.eye(6)  # class c = axis c
    images = np.array(
        [
            [1.0, 0.5, 0, 0, 0, 0],  # class 0 best -> correct
            [1.0, 0.9, 0.8, 0.7, 0.6, 0.0],  # label 4 ranks 5th -> top5 only
            [1.0, 0.9, 0.8, 0.7, 0.6, 0.0],  # label 5 ranks 6th -> miss
        ]
    )
    acc = zero_shot_accuracy(images, classifier, np.array([0, 4, 5]))
    assert acc["zeroshot_top1"] == pytest.approx(1 / 3)
    assert acc["zeroshot_top5"] == pytest.approx(2 / 3)


def test_prompt_ensemble_averages_normalised_templates():
    feats = np.array([[[3.0, 0.0], [0.0, 1.0]]])  # one class, two templates of different norms
    w = zero_shot_classifier(feats)
    np.testing.assert_allclose(w, [[np.sqrt(0.5), np.sqrt(0.5)]])


def test_retrieval_ranks_with_several_captions_per_image():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    # captions 0,1 belong to image 0; caption 2 to image 1; caption 3 to image 2
    texts = np.array([[0.0, 1.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])
    owner = np.array([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner)
    # image 0: best own caption (1) ranks behind only caption 3 -> rank 2
    # image 1: own caption 2 ties with caption 0, and a tie ranks below its rival -> rank 2
    # image 2: own caption 3 is beaten by caption 1 (0.7*1+0.7*0.1 vs 0.7) and ties with
    #   captions 0 and 2 (all three 0.7 / |(0.7, 0.7)|) -> rank 4
    assert m["i2t_R@1"] == 0.0
    assert m["i2t_mean_rank"] == pytest.approx(8 / 3)
    # text->image: caption0 -> image1 best, own image0 third? sims col0: [0, 1, .7] -> rank 3
    # caption1 -> [1, .1, .77]/norms -> image0 best -> rank 1; caption2 -> image1 -> 1;
    # caption3 -> [1, 0, .7] -> image2 second -> rank 2
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    assert m["t2i_mean_rank"] == pytest.approx((3 + 1 + 1 + 2) / 4)
    assert m["t2i_R@5"] == 1.0


def test_image_to_text_hits_on_any_of_its_captions():
    images = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    # Image 0 has two captions: a poor one first (closer to image 1), the matching one second.
    texts = np.array([[-0.5, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])
    m = retrieval_metrics(images, texts, np.array([0, 0, 1]))
    assert m["i2t_R@1"] == 1.0  # the first caption alone would rank 2nd for image 0
    # Every caption is a text->image query: the poor one ranks image 0 second.
    assert m["t2i_R@1"] == pytest.approx(2 / 3) and m["t2i_mean_rank"] == pytest.approx(4 / 3)


def test_image_to_text_misses_when_no_own_caption_wins():
    images = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    # Each image's two captions describe the other image: both of another image's captions rank first.
    texts = np.array([[0, 1.0, 0], [0, 0.9, 0.1], [1.0, 0, 0], [0.9, 0, 0.1]])
    m = retrieval_metrics(images, texts, np.array([0, 0, 1, 1]))
    assert m["i2t_R@1"] == 0.0 and m["i2t_mean_rank"] == 3.0 and m["i2t_R@5"] == 1.0
    assert m["t2i_R@1"] == 0.0


def test_retrieval_rejects_captions_that_do_not_cover_the_images():
    images, texts = np.eye(3), np.eye(3)[:2]
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(images, texts, np.array([0, 1]))  # image 2 has no caption
    with pytest.raises(ValueError, match="index"):
        retrieval_metrics(images[:2], texts, np.array([0, 2]))
    with pytest.raises(ValueError, match="text_to_image entries"):
        retrieval_metrics(images, texts, np.array([0, 1, 2]))
