"""mlx_clip.data.transforms: CLIP eval parity, mode conversion, crop geometry, seeded augmentation."""

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    eval_transform,
    normalize,
    random_resized_crop_box,
    resize_shorter,
    to_rgb,
    train_transform,
)

MEAN, STD = np.asarray(OPENAI_MEAN), np.asarray(OPENAI_STD)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def gradient_image(w, h):
    """Left-right asymmetric, so a horizontal flip is always visible."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    return Image.fromarray(
        np.broadcast_to(np.concatenate([x + 0 * y, 0 * x + y, 255 - x + 0 * y], -1), (h, w, 3)).astype(
            np.uint8
        )
    )


# ---------------------------------------------------------------------------
# eval_transform


@pytest.mark.parametrize("size", [(400, 300), (257, 480), (224, 224), (225, 1000), (100, 80)])
def test_eval_matches_open_clip(size):
    # open_clip's eval transform = torchvision Resize(bicubic, PIL) + CenterCrop + ToTensor + Normalize.
    # Tolerance: we compute (x / 255 - mean) / std as x * a - b in float32, which differs from
    # torchvision's order of operations by at most ~3e-7; everything before (PIL resize, crop) is exact.
    open_clip = pytest.importorskip("open_clip")
    img = noise_image(*size, seed=sum(size))
    ref = open_clip.image_transform(224, is_train=False)(img).numpy().transpose(1, 2, 0)  # CHW -> HWC
    out = eval_transform(224)(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# CLIP converts to RGB after resizing, we before: the same for L; for CMYK, clipping in the
# other colour space moves a rare pixel by one 8-bit level.
@pytest.mark.parametrize("mode, levels", [("L", 0), ("CMYK", 1)])
def test_eval_matches_open_clip_other_modes(mode, levels):
    open_clip = pytest.importorskip("open_clip")
    img = noise_image(90, 70).convert(mode)
    ref = open_clip.image_transform(64, is_train=False)(img).numpy().transpose(1, 2, 0)
    atol = levels / 255 / STD.min() + 1e-5
    np.testing.assert_allclose(eval_transform(64)(img), ref, rtol=0, atol=atol)


def test_eval_geometry_by_hand():
    # 300x200 -> shorter side 100 -> 150x100; the centre crop starts at x = 25.
    assert resize_shorter(noise_image(300, 200), 100).size == (150, 100)
    assert resize_shorter(noise_image(200, 301), 100).size == (100, 150)  # 150.5 truncates
    # Black left of x = 120, white from there: resized, the edge is at 120 / 2 = 60; cropped, at 60 - 25.
    a = np.zeros((200, 300, 3), np.uint8)
    a[:, 120:] = 255
    out = eval_transform(100)(Image.fromarray(a))
    black, white = (0 - MEAN) / STD, (1 - MEAN) / STD
    np.testing.assert_allclose(out[50, 20], black, atol=1e-5)
    np.testing.assert_allclose(out[50, 50], white, atol=1e-5)
    assert out[50, 34, 0] < (black[0] + white[0]) / 2 < out[50, 35, 0]


def test_normalize_values():
    x = np.array([[[0, 128, 255]]], np.uint8)
    expected = (np.array([0, 128, 255]) / 255 - MEAN) / STD
    np.testing.assert_allclose(normalize(x)[0, 0], expected, rtol=0, atol=1e-6)
    assert normalize(x).dtype == np.float32


# ---------------------------------------------------------------------------
# Mode conversion


def test_to_rgb_modes():
    rgb = np.asarray(noise_image(20, 10))
    gray = rgb[..., 0]
    np.testing.assert_array_equal(
        np.asarray(to_rgb(Image.fromarray(gray))), np.repeat(gray[..., None], 3, -1)
    )
    for mode in ("P", "CMYK", "YCbCr"):
        img = Image.fromarray(rgb).convert(mode)
        np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))
    # Alpha is composited over white: transparent -> white, half transparent -> halfway.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)
    rgba[0, 1] = (0, 0, 0, 255)
    rgba[1, 0] = (0, 0, 0, 128)
    rgba[1, 1] = (200, 100, 50, 255)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (0, 0, 0))
    np.testing.assert_array_equal(out[1, 0], (127, 127, 127))
    np.testing.assert_array_equal(out[1, 1], (200, 100, 50))
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), out)  # the array path agrees
    la = Image.fromarray(rgba[..., [1, 3]].copy(), "LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(la))[0, 0], (255, 255, 255))


def test_to_rgb_16_bit_keeps_high_byte():
    a = np.array([[0xA2A2, 0x0100, 0xFFFF, 0x00FF]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(to_rgb(img))[0, :, 0], [0xA2, 0x01, 0xFF, 0x00])
    np.testing.assert_array_equal(np.asarray(to_rgb(a))[0, :, 1], [0xA2, 0x01, 0xFF, 0x00])
    np.testing.assert_array_equal(np.asarray(to_rgb(img.convert("I")))[0, :, 2], [0xA2, 0x01, 0xFF, 0x00])


def test_eval_accepts_every_mode_and_arrays():
    base = noise_image(50, 40)
    inputs = [base.convert(m) for m in ("L", "RGBA", "LA", "P", "CMYK", "1")]
    inputs += [np.asarray(base), np.asarray(base)[..., 0], np.asarray(base)[..., :1]]
    for img in inputs:
        out = eval_transform(32)(img)
        assert out.shape == (32, 32, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    with pytest.raises(TypeError, match="uint8 or uint16"):
        eval_transform(32)(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------
# train_transform


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (64, 64), (1000, 20)])
def test_train_shapes_and_determinism(size):
    t = train_transform(48, scale=(0.5, 1.0), color_jitter=0.3, hflip=True)
    img = noise_image(*size)
    a = t(img, np.random.default_rng([1, 2, 3]))
    b = t(img, np.random.default_rng([1, 2, 3]))
    c = t(img, np.random.default_rng([1, 2, 4]))
    assert a.shape == (48, 48, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(TypeError, match="np.random.Generator"):
        t(img, None)


def test_random_resized_crop_box_respects_bounds_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(640, 480, (0.3, 0.6), (0.75, 1.25), rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480
        assert 0.3 - 0.01 <= w * h / (640 * 480) <= 0.6 + 0.01  # w, h are rounded to whole pixels
        assert 0.75 - 0.02 <= w / h <= 1.25 + 0.02
    # No 90% crop of a 50:1 strip has a 3:4..4:3 aspect: fall back to the widest allowed central crop.
    assert random_resized_crop_box(1000, 20, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (486, 0, 513, 20)


def test_train_full_crop_equals_plain_resize_and_hflip_is_off_by_default():
    img = gradient_image(80, 80)
    plain = normalize(np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)))
    no_flip = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flip = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    flipped = 0
    for seed in range(16):
        np.testing.assert_allclose(no_flip(img, np.random.default_rng(seed)), plain, atol=1e-6)
        out = flip(img, np.random.default_rng(seed))
        if np.allclose(out, plain[:, ::-1], atol=1e-6):
            flipped += 1
        else:
            np.testing.assert_allclose(out, plain, atol=1e-6)
    assert 0 < flipped < 16


def test_color_jitter_strength():
    img = noise_image(64, 64)
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    base = train_transform(32, **kw)(img, np.random.default_rng(0))
    zero = train_transform(32, color_jitter=0.0, **kw)(img, np.random.default_rng(0))
    jit = train_transform(32, color_jitter=0.5, **kw)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(base, zero)
    assert np.abs(jit - base).mean() > 0.01
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD  # values stay those of pixels in [0, 1]
    assert (jit >= lo - 1e-5).all() and (jit <= hi + 1e-5).all()


def test_train_transform_validates_arguments():
    with pytest.raises(ValueError, match="scale"):
        train_transform(32, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        train_transform(32, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="color_jitter"):
        train_transform(32, color_jitter=-1)
