"""Request bodies -> named image bytes: the raw body within its size limit, multipart files in the field
`files`, or base64 images in a JSON body `{"images": [...]}`; every refusal a `RequestError`."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from .config import ServeConfig
from .limits import RequestError

BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")
URL_SAFE = str.maketrans("-_", "+/")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit:,} bytes")
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
    """Standard or URL-safe base64, line-wrapped or not, padded or not; 400 naming the first bad character."""
    text = text.translate(BASE64_WHITESPACE).translate(URL_SAFE)
    bad = next((c for c in text.rstrip("=") if not (c.isascii() and (c.isalnum() or c in "+/"))), None)
    if bad is not None:
        raise RequestError(400, f"{name}: not valid base64: {bad!r} is not a base64 character (standard or "
                                "URL-safe alphabet; line breaks are fine)")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{name}: not valid base64 ({err})") from None


def json_uploads(body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the base64 images of a JSON body {"images": [...]} (data: URLs welcome)."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
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
