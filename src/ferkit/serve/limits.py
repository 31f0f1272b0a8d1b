"""What a request may cost, checked before the work: `RequestError` (a 4xx and what was wrong), image
headers against the pixel limits, and the memory budget that images being decoded at once share.

Importable without the serve extra.
"""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
from PIL import Image

from ..images import ImageError, PixelLimitError, decode_image_bytes, read_image_format
from .config import ServeConfig

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""What the service reads: the formats browsers and phone apps send (GIF: its first frame). TIFF is refused: its
tiles and strips can declare any size of their own, so its header says little of what decoding costs; Pillow's
other formats (EPS via Ghostscript, PPM, exotic ones) are not exposed either. `ferkit predict` reads them all."""
REFUSED_SIGNATURES = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%!PS": "PostScript", b"\xc5\xd0\xd3\xc6": "EPS"}
"""Leading bytes of formats the service does not read, to say so rather than 'not an image'."""


class RequestError(Exception):
    """A request the service refuses: a 4xx status and a message saying what was wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


BYTES_PER_PIXEL = {"L": 6.5, "1": 6.5, "LA": 8.0, "RGB": 14.0, "P": 15.0, "RGBA": 18.0, "I;16": 26.0}
"""Peak memory of decoding an image and finding its faces in a worker, a pixel, by Pillow mode: measured on
4000x3000 images of each format (docs/results/serve/hostile2/decode_memory.json) with room to spare."""
FORMAT_BYTES_PER_PIXEL = {"WEBP": 24.0}
"""Formats that take more whatever their mode: Pillow's WebP decoder keeps an RGBA frame beside the image."""


def decode_bytes(width: int, height: int, mode: str, image_format: str = "") -> int:
    """The memory decoding an image and searching it for faces takes at its peak, estimated from its header."""
    mode = "I;16" if mode.startswith("I;16") else mode  # I;16B, I;16L ...
    per_pixel = FORMAT_BYTES_PER_PIXEL.get(image_format) or BYTES_PER_PIXEL.get(mode, 18.0)
    return round(width * height * per_pixel)


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
    refused = next((kind for magic, kind in REFUSED_SIGNATURES.items() if data.startswith(magic)), None)
    if refused is not None:
        raise ImageError(f"{name}: {refused} is not read by the service (it reads {', '.join(IMAGE_FORMATS)}); "
                         "`ferkit predict` reads it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        width, height, mode, image_format = read_image_format(data, name, config.max_pixels, IMAGE_FORMATS)
    share = decode_bytes(width, height, mode, image_format)
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
