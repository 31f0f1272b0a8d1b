"""User images in whatever form they come -> one upright uint8 array: the loader for prediction.

`load_image` takes a path, a PIL image or a numpy array and returns (H, W) gray or (H, W, 3) RGB
uint8, upright. Files are decoded with Pillow so EXIF orientation is honoured, and an image over a
pixel limit is refused from its header, before anything is decoded (decompression bombs). Every
failure is an `ImageError` whose message names the file.

Numpy convention: (H, W) or (H, W, 1) is gray; (H, W, 3) is RGB and (H, W, 4) RGBA, unless
`color_order="bgr"` says the channels come in OpenCV's BGR / BGRA order. Alpha is dropped.
uint8 is taken as is; bool, uint16 and floats in [0, 1] are scaled to 0..255.

This is the one place where image files become arrays: prediction reads files with `read_image_file`
and the data loader reads data-set images (files or zip members) with `decode_image_bytes`, both
through `from_pil`, so a 16-bit, palette, CMYK or EXIF-rotated image means the same everywhere.
Files are opened with `open_regular_file`, which refuses FIFOs, sockets and devices instead of
blocking on them.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Union

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import InputError, UsageError
from .outputs import file_kind

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias, py3.10)
ColorOrder = Literal["rgb", "bgr"]

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb threshold (about 0.25 GB of RGBA): larger images are refused."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)
"""Files that folder expansion treats as images (a named file is tried whatever its extension)."""


class ImageError(InputError):
    """An input that cannot be read as an image; the message names it and says why."""


class PixelLimitError(ImageError):
    """An image over the pixel limit (a decompression-bomb guard)."""


MAX_JPEG_SCANS = 100
"""Scans a JPEG may hold (libjpeg-turbo's `-maxscans`): a progressive photo has about 10, and each scan of a
progressive image is a pass over all of it, so thousands of tiny scans make a small file decode for minutes."""
MAX_JPEG_SCAN_PIXELS = 1_000_000_000
"""Scans times pixels a JPEG may cost to decode: 20 scans of a 50-megapixel photo."""


class NotRegularFileError(OSError):
    """A path that is a FIFO, socket, device or folder: reading it could block forever or never end."""


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file (or a symlink to one) for binary reading, never blocking.

    The open itself is non-blocking, so a FIFO with no writer cannot hang it, and anything but a
    regular file is refused with `NotRegularFileError` ("not a regular file (a FIFO)"). Other
    failures (missing, a symlink loop, no permission) are the `OSError` that `os.open` raises.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"not a regular file ({file_kind(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def os_error_reason(err: OSError) -> str:
    """An OSError's reason without the path it repeats: 'Too many levels of symbolic links'."""
    if isinstance(err, NotRegularFileError):
        return str(err)
    return err.strerror or str(err)


def load_image(
    source: ImageInput, color_order: ColorOrder = "rgb", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A path, PIL image or numpy array -> upright (H, W) gray or (H, W, 3) RGB uint8 array."""
    if color_order not in ("rgb", "bgr"):
        raise UsageError(f"color_order must be 'rgb' or 'bgr', not {color_order!r}")
    if isinstance(source, np.ndarray):
        return from_array(source, color_order)
    if isinstance(source, Image.Image):
        try:
            return from_pil(source)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"<PIL image>: cannot be converted ({err})") from None
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source, max_pixels)
    raise TypeError(f"expected a path, a PIL image or a numpy array, not {type(source).__name__}")


def read_image_file(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file, upright per its EXIF orientation, refusing it if over `max_pixels`."""
    where = str(path)
    try:
        file = open_regular_file(path)
    except FileNotFoundError:
        raise ImageError(f"{where}: no such file") from None
    except (NotRegularFileError, IsADirectoryError) as err:
        if Path(path).is_dir():
            raise ImageError(f"{where}: is a folder, not an image") from None
        raise ImageError(f"{where}: {err}") from None
    except OSError as err:
        raise ImageError(f"{where}: cannot be opened ({os_error_reason(err)})") from None
    # Our own limit replaces Pillow's bomb warning; Pillow still raises beyond twice its limit.
    with file, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode(lambda: file, where, max_pixels)[0]


def decode_image_bytes(
    blob: bytes, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> tuple[np.ndarray, str]:
    """Image file bytes -> (upright gray or RGB uint8 array, the file's Pillow mode, e.g. "L" or "I;16").

    The same decoding as `read_image_file`; `where` names the bytes in any `ImageError`. Pillow's
    warnings are left to the caller: `warnings.catch_warnings` is not thread-safe, so a caller that
    decodes in threads (the data loader) sets its filters once, around all of them.
    `formats` limits the Pillow formats tried (default: all).
    """
    return _decode(lambda: io.BytesIO(blob), where, max_pixels, formats)


def read_image_header(
    blob: bytes, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> tuple[int, int, str]:
    """(width, height, Pillow mode) of image file bytes, from the header alone: nothing is decoded.

    The same checks and errors as `decode_image_bytes` up to the decoding (not an image, over `max_pixels`).
    """
    width, height, mode, _ = read_image_format(blob, where, max_pixels, formats)
    return width, height, mode


def read_image_format(
    blob: bytes, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> tuple[int, int, str, str]:
    """`read_image_header` and the file's Pillow format ("JPEG", "PNG", ...), for estimating what decoding costs."""
    with _image_errors(where), Image.open(io.BytesIO(blob), formats=formats) as image:
        _check_pixels(image, where, max_pixels)
        _check_layout(image, where)
        return image.size[0], image.size[1], image.mode, image.format or ""


def _check_pixels(image: Image.Image, where: str, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise PixelLimitError(
            f"{where}: {width}x{height} is {width * height:,} pixels, over the pixel limit of "
            f"{max_pixels:,} (a decompression-bomb guard; raise it with --max-pixels or max_pixels=)"
        )


def _decode(
    open_file: Callable[[], BinaryIO], where: str, max_pixels: int | None, formats: tuple[str, ...] | None = None
) -> tuple[np.ndarray, str]:
    with _image_errors(where), Image.open(open_file(), formats=formats) as image:
        _check_pixels(image, where, max_pixels)
        _check_layout(image, where)
        return from_pil(image), image.mode


def _check_layout(image: Image.Image, where: str) -> None:
    """What decoding will cost, from the file's layout (a JPEG's scans), checked before it is decoded."""
    fp = getattr(image, "fp", None)  # an ImageFile's file, still open while the image is lazy
    if image.format != "JPEG" or fp is None:
        return
    position = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(position)
    check_jpeg_layout(jpeg_layout(data), image.size, where)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class JpegLayout:
    """A JPEG's structure, read from its markers without decoding: its frame type (SOFn), the sampling factors
    of its components, its scans and the bytes of entropy-coded data they hold."""

    frame: int | None
    sampling: tuple[tuple[int, int], ...]
    scans: int
    entropy_bytes: int


def jpeg_layout(data: bytes) -> JpegLayout:
    """The layout of JPEG bytes, walking its markers (the entropy-coded data is skipped with bytes.find, in C)."""
    frame: int | None = None
    sampling: tuple[tuple[int, int], ...] = ()
    scans = entropy = 0
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF) and frame is None:
            frame = marker
            count = segment[5] if len(segment) > 5 else 0
            sampling = tuple((segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count)
                             if 8 + 3 * i <= len(segment))
        elif marker == 0xDA:
            scans += 1
            start = pos
            while True:  # entropy-coded data up to the next marker that is not a stuffed 0xFF00 or a restart
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= end:
                    pos = end
                    break
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                    continue
                if following == 0xFF:
                    pos += 1
                    continue
                break
            entropy += pos - start
    return JpegLayout(frame, sampling, scans, entropy)


def check_jpeg_layout(layout: JpegLayout, size: tuple[int, int], where: str) -> None:
    """`PixelLimitError` for a JPEG whose scans would cost more than `MAX_JPEG_SCANS` or `MAX_JPEG_SCAN_PIXELS`;
    `ImageError` for one holding too little data for the size it declares (a truncated file, or a small image
    declared huge): every 8x8 block of the first component needs at least one bit in a Huffman-coded JPEG."""
    width, height = size
    if layout.scans > MAX_JPEG_SCANS:
        raise PixelLimitError(f"{where}: a JPEG of {layout.scans:,} scans, over the limit of {MAX_JPEG_SCANS} "
                              "(each scan is a pass over the whole image; a photo has about 10)")
    if layout.scans * width * height > MAX_JPEG_SCAN_PIXELS:
        raise PixelLimitError(f"{where}: {layout.scans} scans of {width}x{height} pixels would cost "
                              f"{layout.scans * width * height:,} pixel passes to decode, over the limit of "
                              f"{MAX_JPEG_SCAN_PIXELS:,}")
    if layout.frame in (0xC0, 0xC1, 0xC2) and layout.sampling:  # Huffman-coded: at least one bit a block
        h_max = max(h for h, _ in layout.sampling) or 1
        v_max = max(v for _, v in layout.sampling) or 1
        h, v = layout.sampling[0]
        blocks = _ceil(_ceil(width * h, h_max), 8) * _ceil(_ceil(height * v, v_max), 8)
        needed = blocks // 8
        if layout.entropy_bytes < needed:
            raise ImageError(f"{where}: corrupt or truncated image (a {width}x{height} JPEG needs at least "
                             f"{needed:,} bytes of image data, this one holds {layout.entropy_bytes:,})")


@contextlib.contextmanager
def _image_errors(where: str) -> Iterator[None]:
    """Pillow's failures on a file as `ImageError`s naming it."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image (or in a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:
        raise PixelLimitError(f"{where}: over the pixel limit, a possible decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
            ZeroDivisionError) as err:
        # Pillow's decoders report damaged files with any of these (its own fuzzers allow the first four;
        # the rest come from plugins parsing corrupt headers).
        raise ImageError(f"{where}: corrupt or truncated image ({err or type(err).__name__})") from None


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image (decoded here if still lazy) -> upright gray or RGB uint8 array."""
    # exif_transpose and convert() copy the image even when there is nothing to do: on a 50-megapixel
    # photo that is 400 MB more at the peak, so both are skipped where they would change nothing.
    needs_turn = image.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)
    upright = (ImageOps.exif_transpose(image) or image) if needs_turn else image
    mode = upright.mode
    if mode == "RGB":
        return np.array(upright, dtype=np.uint8)
    if mode == "L":
        return np.array(upright, dtype=np.uint8)
    if mode in ("1", "LA", "La"):
        return np.array(upright.convert("L"), dtype=np.uint8)
    if mode.startswith("I;16"):
        return _to_uint8(np.array(upright).astype(np.uint16), "<PIL image>")
    if mode in ("I", "F"):
        return np.array(upright.convert("L"), dtype=np.uint8)
    return np.array(upright.convert("RGB"), dtype=np.uint8)


def from_array(array: np.ndarray, color_order: ColorOrder = "rgb") -> np.ndarray:
    """A numpy image in the module's convention -> gray or RGB uint8 array (a copy only when needed)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"<array>: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"<array>: empty image of shape {array.shape}")
    array = _to_uint8(array, "<array>")
    if array.ndim == 3:
        array = array[..., :3]
        if color_order == "bgr":
            array = array[..., ::-1]
        array = np.ascontiguousarray(array)
    return array


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(f"{where}: float images must hold values in [0, 1]; pass uint8 for 0..255")
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(f"{where}: {array.dtype} values outside 0..255; pass uint8 or uint16")
        return array.astype(np.uint8)
    raise ImageError(f"{where}: unsupported pixel type {array.dtype}")


def to_gray(image: np.ndarray) -> np.ndarray:
    """Gray or RGB uint8 -> gray uint8 (ITU-R 601 luma, as OpenCV and Pillow compute it)."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Gray or RGB uint8 -> a new BGR uint8 array, for OpenCV's drawing and writing."""
    code = cv2.COLOR_GRAY2BGR if image.ndim == 2 else cv2.COLOR_RGB2BGR
    return cv2.cvtColor(image, code)
