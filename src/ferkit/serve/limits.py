"""What a request may cost, checked before the work: `RequestError` (a 4xx and what was wrong), image
headers against the pixel limits, and the memory budget that images being decoded at once share.

Importable without the serve extra.
"""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
from PIL import Image

from ..images import ImageError, PixelLimitError, decode_image_bytes, read_image_header
from .config import ServeConfig

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
"""Decoders tried on uploads; Pillow's others (EPS via Ghostscript, exotic formats) are not exposed."""


class RequestError(Exception):
    """A request the service refuses: a 4xx status and a message saying what was wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_bytes(width: int, height: int, mode: str) -> int:
    """The memory decoding an image takes at its peak: measured 4 bytes a pixel for gray, 10 for RGB
    (Pillow's 4, a copy, the array); 14 covers RGBA, palette and 16-bit images, which are converted."""
    return width * height * (4 if mode in ("L", "1") else 14)


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Bytes of an image file -> upright gray or RGB uint8, decoded by `ferkit.images` as `predict` reads a file.

    The pixel count is checked from the header before anything is decoded (`PixelLimitError`); then
    the whole image is decoded, so a file is an image because it decodes, whatever its name says.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return decode_image_bytes(data, name, max_pixels, IMAGE_FORMATS)[0]


def decode_share(name: str, data: bytes, config: ServeConfig) -> tuple[int, int]:
    """(pixels, memory to decode) of one upload, read from its header before anything is decoded.

    Raises `ImageError` for an empty or unreadable header, `PixelLimitError` for an image over
    `max_pixels` or one whose decoding would take more than the server's whole memory budget.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        width, height, mode = read_image_header(data, name, config.max_pixels, IMAGE_FORMATS)
    share = decode_bytes(width, height, mode)
    if share > config.max_decode_bytes:
        raise PixelLimitError(f"{name}: {width}x{height} ({mode}) takes about {share / 2**20:,.0f} MB to decode, "
                              f"over the server's memory budget of {config.max_decode_mb:g} MB (--max-decode-mb)")
    return width * height, share


def check_request_pixels(pixels: int, config: ServeConfig) -> None:
    """413 when a request's readable images hold more than `max_request_pixels` in all (a request-level limit)."""
    if pixels > config.max_request_pixels:
        raise RequestError(413, f"the request's images hold {pixels:,} pixels, over the limit of "
                                f"{config.max_request_pixels:,} a request (--max-request-pixels)")


class DecodeBudget:
    """The memory that images being decoded at once may take, shared by all requests (on the event loop).

    An image waits until its share fits beside the others'; `decode_share` refuses one larger than
    the whole budget before it waits.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0
        self.waiters: list[asyncio.Future[None]] = []

    async def acquire(self, size: int) -> None:
        while self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()
