"""Issue 13, findings 4 and 6 (images): bounded image decoding on every path, non-empty skip
messages, and the predict cache noticing a replaced file. (BOM, encodings and tar keys:
tests/test_readers.py.)

The pathological images are real files: a PNG of 1 x 200,000 pixels (a few hundred bytes) and one
of 1 x 2,000,000. Before the fix, eval/predict resized the shorter side to S with no bound on the
other: 224 x 44.8M pixels (4.7 GB, 16 s) for the first one.
"""

import ctypes
import os
import time

import numpy as np
import pytest
from conftest import ODD_ARCH, save_image
from PIL import Image

from mlx_clip.config import load_config
from mlx_clip.data import transforms
from mlx_clip.data.checks import check_image, scan
from mlx_clip.data.decode import DEFAULT_MAX_ASPECT_RATIO, decode_image, open_image, open_lazy
from mlx_clip.data.pipeline import Loader, Sample
from mlx_clip.data.samples import DataError
from mlx_clip.data.transforms import (
    EvalTransform,
    TrainTransform,
    center_crop,
    normalize,
    random_resized_crop_box,
    resize_shorter,
    to_rgb,
)
from mlx_clip.inference import Preprocess, index_folder
from mlx_clip.models.config import ModelConfig
from mlx_clip.models.model import create_model
from mlx_clip.schema import ConfigError

quiet = pytest.mark.filterwarnings("ignore::mlx_clip.data.checks.BadDataWarning")


# ---------------------------------------------------------------------------
# Thin images: bounded time and memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_growth_mb(fn):
    """(fn(), how far the peak resident memory rose above the current one while it ran, in MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so it shows when reused
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak) to the current RSS
    except (OSError, AttributeError):
        pytest.skip("cannot measure the peak RSS here (glibc and /proc/self/clear_refs needed)")
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """Constant grey PNGs of 1 x 200,000 and 1 x 2,000,000 pixels, and a 200,000 x 1 one."""
    root = tmp_path_factory.mktemp("thin")
    paths = {}
    for w, h in [(1, 200_000), (1, 2_000_000), (200_000, 1)]:
        paths[w, h] = root / f"thin_{w}x{h}.png"
        Image.new("RGB", (w, h), (90, 120, 150)).save(paths[w, h])
    return paths


def bounded_beyond_decoding(path, transform, rng=None):
    """(output, MB of peak memory it took beyond decoding the file in full, which is the floor:
    PIL has no partial decode, and max_image_pixels bounds it)."""
    run = lambda: decode_image(path, transform, rng, max_pixels=None, max_aspect=None)  # noqa: E731
    run()  # first-call allocations (imports, caches) are not the image's
    _, decoding = peak_rss_growth_mb(lambda: open_image(path))
    out, grew = peak_rss_growth_mb(run)
    return out, grew - decoding


@pytest.mark.parametrize("size", [(1, 200_000), (1, 2_000_000), (200_000, 1)])
def test_thin_image_eval_is_fast_and_bounded(thin, size):
    # Before: the shorter side resized to 224 with no bound on the other, 224 x 44.8M for 1 x 200k.
    t0 = time.perf_counter()
    out, extra = bounded_beyond_decoding(thin[size], EvalTransform(224))
    assert time.perf_counter() - t0 < 2.0
    assert extra < 16 * out.nbytes / 2**20, f"{extra:.1f} MB beyond decoding"
    expected = normalize(np.array([[[90, 120, 150]]], np.uint8))
    np.testing.assert_allclose(out, np.broadcast_to(expected, (224, 224, 3)), atol=1e-6)


def test_thin_image_train_crop_is_bounded(thin):
    out, extra = bounded_beyond_decoding(thin[1, 2_000_000], TrainTransform(224), np.random.default_rng(0))
    assert out.shape == (224, 224, 3) and extra < 16 * out.nbytes / 2**20, f"{extra:.1f} MB beyond decoding"


def test_thin_images_are_refused_by_aspect_ratio_on_every_path(thin, tmp_path):
    path = thin[1, 200_000]
    with pytest.raises(DataError, match=r"1x200000 pixels.*max_aspect_ratio=50") as e:
        decode_image(path, EvalTransform(32))
    assert e.value.reason == "extreme_aspect" and str(path) in str(e.value)
    # predict and folder search (Preprocess), the upload path (bytes) and the pre-flight check
    with pytest.raises(DataError, match="max_aspect_ratio"):
        Preprocess(32)(path)
    with pytest.raises(DataError, match="max_aspect_ratio"):
        Preprocess(32)(path.read_bytes())
    normal = save_image(tmp_path / "normal.png")
    np.testing.assert_array_equal(Preprocess(32)(normal.read_bytes()), Preprocess(32)(normal))
    assert check_image(str(path), "full", max_aspect=50).reason == "extreme_aspect"
    assert check_image(str(path), "full", max_aspect=200_000) is None
    # a limit of None decodes it (bounded), and a normal panorama passes the default
    assert Preprocess(32, max_aspect_ratio=None)(path).shape == (32, 32, 3)
    pano = save_image(tmp_path / "pano.png", w=40 * int(DEFAULT_MAX_ASPECT_RATIO) // 2, h=20)
    assert Preprocess(32)(pano).shape == (32, 32, 3)


@quiet
def test_training_skips_a_thin_image_with_a_reason(thin, tmp_path):
    good = [Sample(str(save_image(tmp_path / f"{i}.png", seed=i)), [f"image {i}"]) for i in range(3)]
    samples = [*good, Sample(str(thin[1, 200_000]), ["a thin strip"])]
    skips = []
    kw = dict(train=True, num_workers=0, on_error="skip", on_skip=skips.append)
    batches = list(Loader(samples, 4, 16, max_aspect_ratio=50, **kw).epoch(0))
    assert batches[0]["images"].shape == (4, 16, 16, 3)
    assert [s.reason for s in skips] == ["extreme_aspect"] and "1x200000" in skips[0].detail
    report = scan(samples, max_aspect_ratio=50)
    assert [s.reason for s in report.skipped] == ["extreme_aspect"] and len(report.samples) == 3


@quiet
@pytest.mark.parametrize("limit, kept", [("50", 8), ("0", 9)])
def test_a_run_applies_data_max_aspect_ratio(thin, tmp_path, limit, kept):
    from mlx_clip.data.checks import SkipLog
    from mlx_clip.data.run_data import build_run_data

    rows = [f"{save_image(tmp_path / f'{i}.png', seed=i)},image {i}" for i in range(8)]
    (tmp_path / "d.csv").write_text(
        "image,caption\n" + "\n".join([*rows, f"{thin[1, 200_000]},a strip"]) + "\n"
    )
    overrides = [("data.train", str(tmp_path / "d.csv")), ("data.val_ratio", "0"), ("data.batch_size", "4")]
    overrides += [("data.max_aspect_ratio", limit), ("data.max_bad_fraction", "0.5")]
    cfg = load_config(overrides=overrides)
    with SkipLog(tmp_path / "skipped.jsonl") as log:
        data = build_run_data(cfg, cfg.model_config(), skip_log=log)
    assert data.train.num_samples == kept and data.train.max_aspect_ratio == (float(limit) or None)
    assert ("extreme_aspect" in (tmp_path / "skipped.jsonl").read_text()) == (limit != "0")


def test_max_aspect_ratio_config_key():
    assert load_config().data.max_aspect_ratio == DEFAULT_MAX_ASPECT_RATIO
    assert load_config(overrides=[("data.max_aspect_ratio", "0")]).data.max_aspect_ratio == 0
    for bad in ("0.5", "nan", "inf", "-3"):
        with pytest.raises(ConfigError, match="data.max_aspect_ratio"):
            load_config(overrides=[("data.max_aspect_ratio", bad)])


# ---------------------------------------------------------------------------
# The bounded path gives the same pixels as before


def old_eval(img, size):
    """The unbounded eval transform this replaced: resize the shorter side, then centre-crop."""
    return normalize(np.asarray(center_crop(resize_shorter(to_rgb(img), size), size)))


SIZES = [(400, 300), (257, 480), (224, 224), (225, 1000), (100, 80), (7, 3), (3, 40), (500, 33), (31, 32)]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_eval_keeps_clip_pixels_up_to_the_exact_resize_limit(mode):
    rng = np.random.default_rng(1)
    for w, h in SIZES:  # aspect ratios up to 16 (EXACT_RESIZE_LIMIT): resized whole, as CLIP does
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for size in (16, 48, 224):
            np.testing.assert_array_equal(EvalTransform(size)(img), old_eval(img, size), err_msg=f"{w}x{h}")


@pytest.mark.parametrize("w, h", [(3, 300), (900, 20)])
def test_eval_of_a_strip_resamples_the_crop_close_to_clip(w, h, monkeypatch):
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    img = Image.fromarray(smooth.astype(np.uint8))
    calls = []
    monkeypatch.setattr(transforms, "resize_shorter", lambda *a: calls.append(a) or resize_shorter(*a))
    out = EvalTransform(32)(img)
    assert calls == []  # the whole-image resize (64 x 6400 here) is never made
    np.testing.assert_allclose(out, old_eval(img, 32), atol=2 / 255 / 0.26)  # within 2 levels


def test_train_crop_first_equals_full_image_resize():
    rng = np.random.default_rng(2)
    t = TrainTransform(32, scale=(0.1, 1.0))
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for seed in range(3):
            box = random_resized_crop_box(w, h, t.scale, t.ratio, np.random.default_rng(seed))
            old = normalize(np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC, box=box)))
            np.testing.assert_array_equal(t(img, np.random.default_rng(seed)), old)


def test_large_jpegs_decode_at_a_reduced_scale_small_ones_in_full(tmp_path):
    x = np.linspace(0, 255, 1024)
    smooth = np.stack(np.broadcast_arrays(x[None, :], x[::-1, None][:768], 128 + 0 * x[None, :]), -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth[:150, :200].astype(np.uint8)).save(tmp_path / "small.jpg", quality=95)
    t = EvalTransform(32)
    lazy = open_lazy(tmp_path / "big.jpg")
    reduced = t(lazy)
    assert lazy.size == (256, 192)  # 1/4 scale: still 6x the output on the shorter side
    full = t(Image.open(tmp_path / "big.jpg").convert("RGB"))
    assert np.abs(reduced - full).max() < 4 / 255 / 0.26  # within a few 8-bit levels
    lazy = open_lazy(tmp_path / "small.jpg")
    np.testing.assert_array_equal(t(lazy), t(Image.open(tmp_path / "small.jpg").convert("RGB")))
    assert lazy.size == (200, 150)


# ---------------------------------------------------------------------------
# Every skip has a message


@quiet
def test_decode_failure_without_text_still_gets_a_message(tmp_path, monkeypatch):
    real = transforms.to_rgb

    def out_of_memory_for_41_wide(img):
        if transforms.image_size(img)[0] == 41:
            raise MemoryError()  # str() is empty, as a real allocation failure's is
        return real(img)

    monkeypatch.setattr(transforms, "to_rgb", out_of_memory_for_41_wide)
    samples = [
        Sample(str(save_image(tmp_path / f"{i}.png", seed=i, w=40 + (i == 2))), [f"c{i}"]) for i in range(4)
    ]
    skips = []
    list(Loader(samples, 4, 16, train=False, num_workers=0, on_error="skip", on_skip=skips.append).epoch(0))
    assert [s.reason for s in skips] == ["corrupt_image"]
    assert skips[0].detail.endswith("MemoryError()") and "2.png" in skips[0].detail


# ---------------------------------------------------------------------------
# Predict cache: a replaced file with the same size and mtime is embedded again


def _bmp(path, seed):
    """A 48 x 48 BMP: uncompressed, so every one has the same size in bytes."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
        path, "BMP"
    )


@pytest.mark.parametrize("how", ["rewritten in place", "replaced by rename"])
def test_search_cache_notices_a_replaced_file_with_restored_mtime(tmp_path, how):
    model = create_model(ModelConfig(**ODD_ARCH), seed=0)
    model.eval()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _bmp(folder / f"{i}.bmp", i)
    pre = Preprocess(ODD_ARCH["image_size"])
    first = index_folder(model, pre, folder, "0" * 64)
    target = folder / "1.bmp"
    st = target.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real replacement is
    if how == "rewritten in place":
        _bmp(target, 99)
    else:
        _bmp(tmp_path / "new.bmp", 99)
        os.replace(tmp_path / "new.bmp", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = index_folder(model, pre, folder, "0" * 64)
    assert (second.embedded, second.reused) == (1, 2)
    row = second.paths.index("1.bmp")
    assert not np.allclose(second.features[row], first.features[row])
    third = index_folder(model, pre, folder, "0" * 64)
    assert (third.embedded, third.reused) == (0, 3)
    np.testing.assert_array_equal(third.features, second.features)
