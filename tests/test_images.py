"""ferkit.images: files that are not regular files are refused without blocking, for prediction as for data sets."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit.images import ImageError, NotRegularFileError, decode_image_bytes, load_image, open_regular_file
from fuzzing import call_with_timeout, unblock_fifo


def test_a_fifo_named_jpg_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as err:
        call_with_timeout(lambda: load_image(fifo), 20, unblock=unblock_fifo(fifo))
    assert str(err.value) == f"{fifo}: not a regular file (a FIFO)"


def test_a_symlink_loop_is_an_image_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop.name)
    with pytest.raises(ImageError) as err:
        load_image(loop)
    assert str(err.value) == f"{loop}: cannot be opened (Too many levels of symbolic links)"


def test_devices_and_folders_are_not_regular_files(tmp_path: Path) -> None:
    with pytest.raises(NotRegularFileError, match=r"not a regular file \(a character device\)"):
        open_regular_file("/dev/zero")  # would never end
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    Image.new("L", (5, 4), 7).save(tmp_path / "b.png")
    assert load_image(tmp_path / "a.png").shape == (4, 5)  # a symlink to a regular file is read


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "P", "LA", "CMYK"])
def test_bytes_and_files_decode_alike(tmp_path: Path, mode: str) -> None:
    gray = np.arange(48 * 40, dtype=np.uint8).reshape(40, 48)
    image = Image.fromarray(gray.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(gray).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if mode == "CMYK" else "PNG")
    (tmp_path / "x").write_bytes(buffer.getvalue())
    decoded, file_mode = decode_image_bytes(buffer.getvalue(), "x")
    assert file_mode == mode
    np.testing.assert_array_equal(decoded, load_image(tmp_path / "x"))
    if mode in ("L", "I;16", "LA"):
        np.testing.assert_array_equal(decoded, gray)  # 16-bit is scaled (v * 257 -> v), not clipped
