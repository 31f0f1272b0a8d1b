"""Request bodies -> named image bytes: the raw body within its size limit and the inflight budget, multipart
files in the field `files`, or base64 images in a JSON body `{"images": [...]}`; every refusal a `RequestError`.

`json_uploads` is CPU work on a whole body (JSON parsing, base64 checking): the routes run it on a thread, not
on the event loop."""

from __future__ import annotations

import binascii
import contextlib
import json
import re
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from .config import ServeConfig
from .limits import RequestError

URL_SAFE = bytes.maketrans(b"-_", b"+/")
NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
NOT_ASCII = re.compile(r"[^\x00-\x7f]")
MAX_INT_DIGITS = 64
"""The longest JSON integer read: no field of the API needs more, and long ones cost quadratic time."""


class InflightBudget:
    """The memory that request bodies being read and parsed may take at once, all requests together (on the event
    loop): a body takes `FACTOR` times its bytes (the body, its parsed form, the files' bytes) as they arrive,
    and one that does not fit is refused at once with 503, before it is read any further."""

    FACTOR = 3

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0

    def take(self, size: int) -> bool:
        if self.used + size * self.FACTOR > self.limit:
            return False
        self.used += size * self.FACTOR
        return True

    def give_back(self, size: int) -> None:
        self.used -= size * self.FACTOR


def busy_reading(budget: InflightBudget) -> RequestError:
    return RequestError(503, f"busy: request bodies of {budget.used / InflightBudget.FACTOR / 2**20:,.0f} MB are "
                             f"being read, the most this server holds at once (--max-inflight-mb); retry soon",
                        {"Retry-After": "1"})


class Reservation:
    """The bytes of the inflight budget one request holds, given back when its answer is made."""

    def __init__(self, budget: InflightBudget) -> None:
        self.budget, self.size = budget, 0

    def take(self, size: int) -> None:
        if not self.budget.take(size):
            raise busy_reading(self.budget)
        self.size += size

    def release(self) -> None:
        self.budget.give_back(self.size)
        self.size = 0


async def read_body(request: Request, limit: int, reservation: Reservation | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, and with 503 when the bytes being
    read by all requests would pass the inflight budget (the declared length is reserved before reading)."""
    declared = request.headers.get("content-length")
    expected = int(declared) if declared is not None and declared.isdigit() else None
    if expected is not None and expected > limit:
        raise RequestError(413, f"request body of {expected:,} bytes is over the limit of {limit:,}")
    if reservation is not None and expected:
        reservation.take(expected)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit:,} bytes")
            if reservation is not None and size > reservation.size:
                reservation.take(size - reservation.size)
            chunks.append(chunk)
    except ClientDisconnect:  # the client left halfway: no one to answer, and not a bug of ours
        raise RequestError(400, "the client disconnected before its request body was complete") from None
    return b"".join(chunks)


async def multipart_uploads(request: Request, body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in the multipart field `files` of `body` (already read from `request`)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=config.max_files + 1, max_fields=100,
                                                         max_part_size=64 * 1024)
    except Exception as err:  # the parser's own errors (starlette wraps them differently by version)
        text = str(getattr(err, "detail", None) or getattr(err, "message", None) or err)
        if "too many files" in text.lower():
            raise RequestError(400, f"too many files: at most {config.max_files} a request") from None
        raise RequestError(400, f"malformed multipart body: {text}") from None
    try:
        entries = form.getlist("files")
        if not entries:
            others = sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)})
            hint = f" (files came in {', '.join(map(repr, others))})" if others else ""
            raise RequestError(400, f"no images: send them as multipart files in the field 'files'{hint}")
        if len(entries) > config.max_files:
            raise RequestError(400, f"too many files: {len(entries)}, at most {config.max_files} a request")
        return [await _file_bytes(entry, i, config) for i, entry in enumerate(entries)]
    finally:
        await form.close()


async def _file_bytes(entry: UploadFile | str, i: int, config: ServeConfig) -> tuple[str, bytes]:
    if not isinstance(entry, UploadFile):
        raise RequestError(400, f"files[{i}]: a text field, not a file upload")
    name = entry.filename or f"files[{i}]"
    if entry.size is not None and entry.size > config.max_file_bytes:
        raise RequestError(413, f"{name}: {entry.size:,} bytes, over the limit of {config.max_file_bytes:,} a file")
    data = await entry.read(config.max_file_bytes + 1)
    if len(data) > config.max_file_bytes:
        raise RequestError(413, f"{name}: over the limit of {config.max_file_bytes:,} bytes a file")
    return name, data


def decode_base64(text: str, name: str) -> bytes:
    """Standard or URL-safe base64, line-wrapped or not, padded or not; 400 naming the first bad character.

    Checked by `binascii` in strict mode (C, not a Python loop over the characters): the text as sent first,
    then without line breaks, in the standard alphabet and padded.
    """
    if not text.isascii():
        bad = NOT_ASCII.search(text).group()  # type: ignore[union-attr]
        raise RequestError(400, f"{name}: not valid base64: {bad!r} is not a base64 character (standard or "
                                "URL-safe alphabet; line breaks are fine)")
    raw = text.encode("ascii")
    with contextlib.suppress(binascii.Error):
        return binascii.a2b_base64(raw, strict_mode=True)
    raw = raw.translate(URL_SAFE, b" \t\r\n")
    raw = raw.rstrip(b"=")
    raw += b"=" * (-len(raw) % 4)
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error as err:
        bad_char = NOT_BASE64.search(raw.rstrip(b"="))
        if bad_char is not None:
            raise RequestError(400, f"{name}: not valid base64: {bad_char.group().decode()!r} is not a base64 "
                                    "character (standard or URL-safe alphabet; line breaks are fine)") from None
        raise RequestError(400, f"{name}: not valid base64 ({err})") from None


def _short_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(digits):,} digits, more than the {MAX_INT_DIGITS} this API reads")
    return int(digits)


def json_uploads(body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the base64 images of a JSON body {"images": [...]} (data: URLs welcome)."""
    try:
        document = json.loads(body, parse_int=_short_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    except ValueError as err:  # a number too long to read (int() refuses over 4,300 digits; we, over 64)
        raise RequestError(400, f"the body's JSON holds {err}") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise RequestError(400, 'no images: send a JSON object {"images": [base64, ...]} with at least one')
    if len(images) > config.max_files:
        raise RequestError(400, f"too many images: {len(images)}, at most {config.max_files} a request")
    return [_base64_image(text, f"images[{i}]", config) for i, text in enumerate(images)]


def _base64_image(text: object, name: str, config: ServeConfig) -> tuple[str, bytes]:
    if not isinstance(text, str):
        raise RequestError(400, f"{name}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > ((config.max_file_bytes + 2) // 3 * 4 + 4) * 78 // 76:  # room for line breaks
        raise RequestError(413, f"{name}: over the limit of {config.max_file_bytes:,} bytes a file")
    data = decode_base64(text, name)
    if len(data) > config.max_file_bytes:
        raise RequestError(413, f"{name}: {len(data):,} bytes, over the limit of {config.max_file_bytes:,}")
    return name, data
