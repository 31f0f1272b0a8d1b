"""Fuzzing image decoding and prediction: random bytes and mutated real images of every common format.

The invariant: `load_image` on such a file returns an upright (H, W) or (H, W, 3) uint8 array, the
very array the data loader's `decode_image_bytes` gets from the same bytes, or raises `ImageError`
whose message starts with the file's path; `EmotionRecognizer.predict` returns a list of results or
raises that `ImageError`. Never another exception type, never a hang (each call runs under a time
limit). Bounded for CI like tests/test_fuzz_data.py (FERKIT_FUZZ_SCALE scales the example counts).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from ferkit.images import ImageError, decode_image_bytes, load_image
from fuzzing import call_with_timeout, fuzz_settings
from test_fuzz_data import TIME_LIMIT, mutate, position

MAX_PIXELS = 1_000_000  # keeps a mutated header's claimed size (and so each case) small

FORMATS = {"PNG": "L", "JPEG": "RGB", "GIF": "P", "BMP": "RGB", "TIFF": "I;16", "WEBP": "RGBA", "PPM": "RGB",
           "ICO": "RGBA"}


class QuietBytes(dict):
    def __repr__(self) -> str:
        return f"<{len(self)} images>"


@pytest.fixture(scope="module")
def real_images(tiny_root: Path) -> dict[str, bytes]:
    """One real FER-2013 face saved in each format (several modes), with EXIF orientation on the JPEG."""
    face = Image.open(next(iter(sorted((tiny_root / "train" / "happy").iterdir()))))
    blobs = {}
    for fmt, mode in FORMATS.items():
        image = Image.fromarray(np.asarray(face, np.uint16) * 257) if mode == "I;16" else face.convert(mode)
        buffer = io.BytesIO()
        if fmt == "JPEG":
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(buffer, fmt, exif=exif.tobytes())
        else:
            image.save(buffer, fmt)
        blobs[fmt] = buffer.getvalue()
    return QuietBytes(blobs)


byte_op = st.one_of(
    st.tuples(st.just("flip_byte"), position, st.integers(0, 255)),
    st.tuples(st.just("flip_bit"), position, st.integers(0, 7)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
)
image_bytes = st.one_of(
    st.binary(max_size=2048),
    st.tuples(st.sampled_from(sorted(FORMATS)), st.lists(byte_op, min_size=1, max_size=4)),
)


def _materialise(choice: bytes | tuple[str, list[tuple]], real_images: dict[str, bytes]) -> bytes:
    if isinstance(choice, bytes):
        return choice
    fmt, ops = choice
    return mutate(real_images[fmt], ops)


def _file(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> Path:
    path = tmp_path_factory.mktemp("image", numbered=True) / "photo.jpg"
    path.write_bytes(blob)
    return path


@pytest.mark.slow
@fuzz_settings(500)
@given(choice=image_bytes)
def test_random_and_mutated_bytes_load_or_raise_image_error(
    tmp_path_factory: pytest.TempPathFactory, real_images: dict[str, bytes], choice: bytes | tuple
) -> None:
    blob = _materialise(choice, real_images)
    path = _file(tmp_path_factory, blob)
    try:
        try:
            image = call_with_timeout(lambda: load_image(path, max_pixels=MAX_PIXELS), TIME_LIMIT)
        except ImageError as err:
            event("refused")
            assert str(err).startswith(f"{path}: "), str(err)
            with pytest.raises(ImageError):  # the data loader's decoding refuses it too
                decode_image_bytes(blob, "member", MAX_PIXELS)
            return
        event("loaded")
        assert image.dtype == np.uint8 and image.size > 0
        assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3), image.shape
        decoded, _ = decode_image_bytes(blob, "member", MAX_PIXELS)
        np.testing.assert_array_equal(decoded, image)  # one decoding path for predict and for data sets
    finally:
        shutil.rmtree(path.parent)


@pytest.fixture(scope="module")
def small_limit_recognizer(weights: Path):
    from ferkit.predict import EmotionRecognizer

    return EmotionRecognizer(weights, device="cpu", max_pixels=MAX_PIXELS)


@pytest.mark.slow
@fuzz_settings(250)
@given(choice=image_bytes, detect=st.booleans())
def test_predict_on_random_and_mutated_bytes_answers_or_raises_image_error(
    tmp_path_factory: pytest.TempPathFactory, real_images: dict[str, bytes], small_limit_recognizer,
    choice: bytes | tuple, detect: bool,
) -> None:
    recognizer = small_limit_recognizer
    blob = _materialise(choice, real_images)
    path = _file(tmp_path_factory, blob)
    try:
        if detect:
            results = call_with_timeout(lambda: _predict(recognizer, path), TIME_LIMIT)
        else:
            results = call_with_timeout(lambda: _predict_crop(recognizer, path), TIME_LIMIT)
        if isinstance(results, ImageError):
            event("refused")
            assert str(results).startswith(f"{path}: "), str(results)
            return
        event(f"{len(results)} face(s)")
        assert isinstance(results, list)
        for result in results:
            assert result.label in recognizer.classes
            assert abs(sum(result.probabilities.values()) - 1) < 1e-4
    finally:
        shutil.rmtree(path.parent)


def _predict(recognizer, path: Path) -> list | ImageError:
    try:
        return recognizer.predict(path)
    except ImageError as err:
        return err


def _predict_crop(recognizer, path: Path) -> list | ImageError:
    """The --no-detect path: the whole image as one face crop."""
    try:
        image = recognizer.load(path)
    except ImageError as err:
        return err
    from ferkit.faces import whole_image_face

    results = recognizer.classify([whole_image_face(image)])
    assert len(results) == 1
    return results
