"""Opening and decoding images within bounds: the one place a file, tar member, Parquet / Arrow cell
or upload becomes pixels.

    x = decode_image(path_or_tarref_or_bytes, EvalTransform(224))   # float32 (224, 224, 3)
    x = decode_image(item, TrainTransform(224), rng, max_pixels=..., max_aspect=...)

Every path that reads an image (training, the pre-flight check, eval, predict, folder search)
goes through `open_lazy`, which reads the header only and refuses, before any pixel is decoded:
- more than `max_pixels` pixels (data.max_image_pixels; a decompression bomb);
- a longer side more than `max_aspect` times the shorter (data.max_aspect_ratio): a 1 x 200,000
  strip is a scraping accident, and a centre crop would keep 1/200,000 of it.
`decode_image` then hands the still-lazy image to the transform, which decodes and resizes only
its crop (transforms.resample_box), so the work after decoding is bounded by the output size even
when no limit is set. Errors are DataErrors naming the file, with a reason code (samples.REASONS).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .samples import DataError, RowRef, TarRef, read_bytes

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own warning threshold, about 9459 x 9459
DEFAULT_MAX_ASPECT_RATIO = 50.0  # wide panoramas and long screenshots pass; 1 x 1000 strips do not

ImageSource = str | os.PathLike | TarRef | RowRef | bytes


def describe(e: BaseException) -> str:
    """An exception as message text, never empty: MemoryError() has no str()."""
    return str(e) or repr(e)


def _name(image: ImageSource) -> str:
    return f"<{len(image)} bytes>" if isinstance(image, bytes) else str(image)


def _fail(image: ImageSource, message: str, reason: str) -> DataError:
    return DataError(f"{_name(image)}: {message}", reason, _name(image))


def decode_error(image: ImageSource, e: Exception) -> DataError:
    """A DataError (with its reason code) for an exception raised while decoding `image`."""
    if isinstance(e, DataError):
        return e
    if isinstance(e, Image.DecompressionBombError):
        return _fail(image, f"cannot decode image: {e}", "too_many_pixels")
    truncated = isinstance(e, OSError) and "truncated" in str(e).lower()
    return _fail(
        image, f"cannot decode image: {describe(e)}", "truncated_image" if truncated else "corrupt_image"
    )


def _source(image: ImageSource):
    """What Image.open reads: a path, or the bytes of a tar member or an upload."""
    if isinstance(image, bytes):
        if not image:
            raise _fail(image, "empty file (0 bytes)", "empty_file")
        return io.BytesIO(image)
    if isinstance(image, TarRef):
        if image.size == 0:
            raise _fail(image, "empty file (0 bytes)", "empty_file")
        return io.BytesIO(read_bytes(image))
    if isinstance(image, RowRef):  # a Parquet / Arrow cell: its row group is read (data/columnar.py)
        from .columnar import read_cell

        data = read_cell(image)
        if not data:
            raise _fail(image, "empty image cell (0 bytes)", "empty_file")
        return io.BytesIO(data)
    try:
        if os.path.getsize(image) == 0:
            raise _fail(image, "empty file (0 bytes)", "empty_file")
    except FileNotFoundError:
        raise _fail(image, "image not found", "missing_file") from None
    except OSError as e:
        raise _fail(image, f"cannot read image: {e.strerror or e}", "unreadable") from None
    return image


def check_size(image: ImageSource, width: int, height: int, max_pixels: int | None, max_aspect: float | None):
    """Raise the DataError for a size over `max_pixels` or beyond `max_aspect` (None, 0: no limit)."""
    if max_pixels and width * height > max_pixels:
        msg = f"{width}x{height} = {width * height} pixels, over max_image_pixels={max_pixels}"
        msg += " (decompression bomb?)"
        raise _fail(image, msg, "too_many_pixels")
    if max_aspect and max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / min(width, height)
        msg = (
            f"{width}x{height} pixels, aspect ratio {ratio:.1f}:1 is over max_aspect_ratio={max_aspect:g}; "
            "crop the image, or raise the limit (data.max_aspect_ratio, Preprocess(max_aspect_ratio=))"
        )
        raise _fail(image, msg, "extreme_aspect")


def open_lazy(
    image: ImageSource, max_pixels: int | None = None, max_aspect: float | None = None
) -> Image.Image:
    """The image opened lazily (header read, no pixel decoded), within the pixel and aspect limits."""
    source = _source(image)
    try:
        im = Image.open(source)
    except UnidentifiedImageError:
        raise _fail(image, "cannot decode image: not an image (unknown format)", "not_an_image") from None
    except FileNotFoundError:
        raise _fail(image, "image not found", "missing_file") from None
    except PermissionError as e:
        raise _fail(image, f"cannot read image: {e.strerror or e}", "unreadable") from None
    except Exception as e:  # a broken or cut header: OSError, SyntaxError, struct.error, ...
        raise decode_error(image, e) from None
    try:
        check_size(image, *im.size, max_pixels, max_aspect)
    except DataError:
        im.close()
        raise
    return im


def open_image(
    image: ImageSource, max_pixels: int | None = None, max_aspect: float | None = None
) -> Image.Image:
    """A sample's image, decoded in full (any mode; the first frame of an animation).

    A DataError names the file and carries the reason code. `max_pixels` / `max_aspect` refuse
    from the header alone (None: only PIL's own bomb limit applies). To get model input, use
    `decode_image`, which decodes no more than the crop needs."""
    im = open_lazy(image, max_pixels, max_aspect)
    try:
        with im:
            im.load()  # decode now, inside the try; the file is closed on exit
            return im
    except Exception as e:  # OSError (truncated), DecompressionBombError, ...
        raise decode_error(image, e) from None


def decode_image(
    image: ImageSource,
    transform,
    rng: np.random.Generator | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> np.ndarray:
    """An image file, tar member or encoded bytes -> `transform(image, rng)`, float32 (S, S, 3).

    The transform (EvalTransform or TrainTransform) gets the image still lazy and decodes only its
    crop; every failure is a DataError naming the image, with its reason code."""
    im = open_lazy(image, max_pixels, max_aspect)
    try:
        with im:
            return transform(im, rng)
    except Exception as e:  # decoding (truncated, corrupt) or converting odd pixels
        raise decode_error(image, e) from None


__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "check_size",
    "decode_error",
    "decode_image",
    "describe",
    "open_image",
    "open_lazy",
]
