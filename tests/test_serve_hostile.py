"""`ferkit serve` under hostile use (issues 18 and 32): budgets, slow clients, deep JSON, odd methods and hosts;
image bombs in other formats, bodies that starve the event loop, streams that anyone could write to.

A live server on 127.0.0.1 for each case, with raw sockets where a client must misbehave (slow
headers, slow bodies, short bodies). Every case was seen to go wrong before issue 18; each test
says what it was. Bounded: each a few seconds.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import random
import resource
import socket
import string
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
skimage_data = pytest.importorskip("skimage.data")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ferkit.images import (  # noqa: E402
    MAX_JPEG_SCANS,
    JpegLayout,
    PixelLimitError,
    check_jpeg_layout,
    jpeg_layout,
    read_image_format,
)
from ferkit.labels import EMOTIONS  # noqa: E402
from ferkit.predict import EmotionRecognizer, FaceResult  # noqa: E402
from ferkit.serve import IMAGE_FORMATS, RequestError, ServeConfig, create_app, decode_bytes, uvicorn_options  # noqa: E402
from ferkit.serve.decoding import Abandoned, DecodeTimeout, DecodeWorker, WorkerSettings  # noqa: E402
from ferkit.serve.logs import BURST, NoQueryString, RateLimit  # noqa: E402
from ferkit.serve.protocol import MAX_SMALL_PIECES, connection_limit  # noqa: E402
from ferkit.serve.schemas import without_paths  # noqa: E402
from ferkit.serve.streams import MIN_FRAME_STEP, Client, StreamRegistry  # noqa: E402
from ferkit.serve.uploads import decode_base64  # noqa: E402
from serve_live import live_server  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return _png(skimage_data.astronaut())


@pytest.fixture(scope="module")
def recognizer() -> EmotionRecognizer:
    """The small shipped model: these tests are about the service, not the model, and run it often."""
    return EmotionRecognizer("ferkit-refcnn", device="cpu")


@contextmanager
def served(recognizer: EmotionRecognizer, **settings: Any) -> Iterator[tuple[str, Any]]:
    """(base URL, app) of a live server with these settings, run as `ferkit serve` runs it."""
    config = ServeConfig(**settings)
    app = create_app(config, recognizer)
    with live_server(app, config=config) as url:
        yield url, app


def _files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def assert_error(response: httpx.Response, status: int, *phrases: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert body["status"] == status
    for phrase in phrases:
        assert phrase.lower() in body["error"].lower(), body["error"]
    return body


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    return sock


def _status_of(sock: socket.socket) -> int | None:
    """The status of the response on `sock`, or None if the server closed it without one."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return int(data.split(b" ", 2)[1])


# ---------------------------------------------------------------------------------------------
# 2. Pixel and memory budgets


def test_pixels_a_request_are_budgeted_from_the_headers(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    """Before issue 18, 16 one-colour 7000x7000 PNGs (2.5 MB) were all decoded at once: 3.97 GB."""
    flat = _png(np.full((2000, 2000), 90, np.uint8))  # 4,000,000 pixels in a few kB
    with served(recognizer, max_request_pixels=10_000_000, max_decode_mb=64) as (url, _):
        ok = httpx.post(f"{url}/v1/predict", files=_files(("a.png", flat), ("b.png", flat)), timeout=30)
        assert ok.status_code == 200, ok.text
        body = assert_error(httpx.post(f"{url}/v1/predict", files=_files(*[(f"{i}.png", flat) for i in range(3)]),
                                       timeout=30), 413, "12,000,000 pixels", "10,000,000", "a request")
        assert "--max-request-pixels" in body["error"]
        big = _png(np.full((3000, 3000, 3), 90, np.uint8))  # 27 MB decoded as RGB: over a 16 MB budget
    with served(recognizer, max_decode_mb=16) as (url, _):
        assert_error(httpx.post(f"{url}/v1/predict", files=_files(("big.png", big)), timeout=30), 413,
                     "big.png", "memory budget", "--max-decode-mb")
        assert httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=30).status_code == 200


def test_images_over_the_free_budget_wait_their_turn(recognizer: EmotionRecognizer) -> None:
    """Requests that fit the budget one at a time, but not together, all succeed: they wait, not fail."""
    flat = _png(np.full((1500, 1500, 3), 90, np.uint8))  # about 30 MB to decode: one at a time in 40 MB
    with served(recognizer, max_decode_mb=40, workers=2) as (url, app), ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: httpx.post(f"{url}/v1/predict", files=_files((f"{i}.png", flat)),
                                                       timeout=30), range(4)))
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        assert app.state.service.budget.used == 0


# ---------------------------------------------------------------------------------------------
# 3 and 8. Slow and short bodies, slow headers


def test_slow_bodies_take_no_pending_slot_and_time_out_with_408(recognizer: EmotionRecognizer,
                                                                astronaut: bytes) -> None:
    """Before issue 18, bodies sent at 1 byte/s held every --max-pending slot: everyone else got 503."""
    with served(recognizer, max_pending=2, body_timeout_s=2.0, timeout_s=5.0) as (url, _), ExitStack() as stack:
        slow = []
        for _ in range(4):
            sock = stack.enter_context(_connect(url))
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"images\": [\"")  # 25 bytes of the 1,000 announced
            slow.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        ok = httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=30)
        assert ok.status_code == 200, ok.text
        assert [_status_of(sock) for sock in slow] == [408] * 4
        assert time.monotonic() - started < 4.5  # the body timeout, not the request timeout


def test_slow_headers_are_timed_out(recognizer: EmotionRecognizer) -> None:
    """Before issue 18, headers sent one line a second kept a connection open for ever."""
    with served(recognizer, header_timeout_s=1.5) as (url, _), _connect(url) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        status: int | None = 0
        for n in range(8):
            time.sleep(0.5)
            try:
                sock.sendall(f"X-Slow-{n}: 1\r\n".encode())
            except OSError:  # closed by the server
                break
        sock.settimeout(5)
        try:
            status = _status_of(sock)
        except OSError:
            status = None
        assert status in (408, None)
        assert time.monotonic() - started < 5.5


# ---------------------------------------------------------------------------------------------
# 4. No plain-text 500s


def test_deep_json_is_a_400_and_a_bug_is_a_json_500_with_an_id_in_the_log(
        recognizer: EmotionRecognizer, astronaut: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Before issue 18, 100,000 nested '[' gave a plain-text 500; a bug in detection answered 422."""
    with served(recognizer) as (url, app):
        deep = httpx.post(f"{url}/v1/predict", content=b"[" * 100_000, timeout=30,
                          headers={"content-type": "application/json"})
        assert_error(deep, 400, "json", "nested")
        service = app.state.service

        def broken(*args: Any) -> Any:
            raise RuntimeError("a bug in face detection")

        service.faces_of = broken
        with caplog.at_level(logging.ERROR):
            response = httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=30)
        body = assert_error(response, 500, "internal error")
        assert body["error_id"] and body["error_id"] in caplog.text
        assert "a bug in face detection" in caplog.text
        assert "a bug in face detection" not in response.text  # the details stay in the log


# ---------------------------------------------------------------------------------------------
# 5. Prometheus labels from a closed set


def test_metrics_labels_come_from_a_closed_set(recognizer: EmotionRecognizer) -> None:
    """Before issue 18, 500 requests with made-up methods grew /metrics from 35 KB to 1.05 MB."""
    rng = random.Random(0)
    with served(recognizer) as (url, _), httpx.Client(timeout=10) as http:
        before = len(http.get(f"{url}/metrics").text)
        for _ in range(60):
            made_up = "".join(rng.choices(string.ascii_uppercase, k=8))
            path = "/" + "".join(rng.choices(string.ascii_lowercase, k=6))
            # Made-up methods are refused by the HTTP parser itself (a JSON 400), before the app counts them.
            assert_error(http.request(made_up, f"{url}{path}"), 400, "malformed HTTP request")
            # Methods the parser knows but the API does not (WebDAV's, PURGE) reach the app: counted as "other".
            method = rng.choice(["PROPFIND", "PURGE", "MKCOL", "LOCK", "REPORT"])
            http.request(method, f"{url}{rng.choice(['/v1/predict', path])}")
        text = http.get(f"{url}/metrics").text
    labels = {(s.labels.get("path"), s.labels.get("method")) for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == "ferkit_http_requests_total"}
    assert {method for _, method in labels} <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert {path for path, _ in labels} <= {"/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics", "/",
                                            "other"}
    assert ("other", "other") in labels and ("/v1/predict", "other") in labels
    assert len(text) < before + 8_000


# ---------------------------------------------------------------------------------------------
# 8. HEAD, unknown query parameters, base64 variants, Host headers


def test_head_unknown_query_parameters_and_base64_variants(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    with served(recognizer) as (url, _):
        for path in ("/", "/healthz", "/readyz"):
            head = httpx.head(f"{url}{path}")
            assert head.status_code == 200 and head.content == b"", path
        assert_error(httpx.post(f"{url}/v1/predict?detetc=false", files=_files(("a.png", astronaut)), timeout=30),
                     422, "detetc", "unknown query parameter", "detect")
        assert_error(httpx.get(f"{url}/healthz?x=1"), 422, "'x'")
        standard = base64.b64encode(astronaut).decode()
        expected = httpx.post(f"{url}/v1/predict", json={"images": [standard]}, timeout=30).json()
        wrapped = "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76))  # base64 -w76, MIME
        url_safe = base64.urlsafe_b64encode(astronaut).decode().rstrip("=")
        for variant in (wrapped, wrapped.replace("\n", "\r\n"), url_safe):
            response = httpx.post(f"{url}/v1/predict", json={"images": [variant]}, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json() == expected
        assert_error(httpx.post(f"{url}/v1/predict", json={"images": ["abc$def"]}, timeout=30), 400,
                     "images[0]", "'$'", "base64")


def test_host_header_allow_list_without_a_key(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    """Before issue 18, any Host was answered: a DNS-rebinding page could use a keyless server on localhost."""
    with served(recognizer) as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
        refused = httpx.post(f"{url}/v1/predict", headers={"Host": f"evil.example:{port}"},
                             files=_files(("a.png", astronaut)))
        assert_error(refused, 400, "evil.example", "--allowed-hosts")
    with served(recognizer, allowed_hosts=("photos.internal",)) as (url, _):
        assert httpx.get(f"{url}/healthz", headers={"Host": "photos.internal"}).status_code == 200
        assert httpx.get(f"{url}/healthz", headers={"Host": "evil.example"}).status_code == 400
    with served(recognizer, api_key="k") as (url, _):  # a key guards the API: any Host may ask
        assert httpx.get(f"{url}/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k"}
                         ).status_code == 200


# ---------------------------------------------------------------------------------------------
# Issue 32, the second round: one test a row of its table


def _jpeg(array: np.ndarray, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def scan_bomb(copies: int, side: int = 64) -> bytes:
    """A progressive JPEG whose smallest scan is repeated `copies` times (row 1's attack, at a small size)."""
    blob = _jpeg(np.full((side, side, 3), 128, np.uint8), progressive=True, quality=50)
    scans, pos = [], blob.find(b"\xff\xda")
    while pos >= 0:
        end = blob.find(b"\xff\xda", pos + 2)
        scans.append(blob[pos : end if end >= 0 else len(blob) - 2])
        pos = end
    smallest = min(scans, key=len)
    return blob[:-2] + smallest * copies + b"\xff\xd9"


def declared_huge_jpeg(width: int = 7000, height: int = 7000) -> bytes:
    """A 16x16 JPEG whose frame header declares `width` x `height` (row 10's attack)."""
    blob = bytearray(_jpeg(np.full((16, 16, 3), 90, np.uint8)))
    sof = blob.find(b"\xff\xc0")
    blob[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(blob)


@pytest.fixture(scope="module")
def hostile_api(recognizer: EmotionRecognizer) -> Iterator[tuple[str, Any]]:
    with served(recognizer, limit_concurrency=40) as served_app:
        yield served_app


def test_row1_jpeg_scans_are_capped_before_decoding(hostile_api: tuple[str, Any], astronaut: bytes) -> None:
    """Row 1: 15,000 repeated scans took 57 s to decode. Now more than MAX_JPEG_SCANS scans, or scans times pixels
    over MAX_JPEG_SCAN_PIXELS, are refused from the markers, and a normal photo beside it is read."""
    url, _ = hostile_api
    bomb = scan_bomb(1_000)
    assert jpeg_layout(bomb).scans > MAX_JPEG_SCANS
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/predict", files=_files(("bomb.jpg", bomb), ("a.png", astronaut)), timeout=30)
    assert response.status_code == 200, response.text
    bad, good = response.json()
    assert "bomb.jpg" in bad["error"] and "scans" in bad["error"] and str(MAX_JPEG_SCANS) in bad["error"]
    assert len(good["faces"]) == 1 and time.monotonic() - started < 10
    assert_error(httpx.post(f"{url}/v1/predict", files=_files(("bomb.jpg", bomb)), timeout=30), 413, "scans")
    ok = scan_bomb(3)  # a few repeated scans: within the limits, decoded
    assert httpx.post(f"{url}/v1/predict", files=_files(("ok.jpg", ok)), timeout=30).status_code == 200
    with pytest.raises(PixelLimitError, match="pixel passes"):
        check_jpeg_layout(JpegLayout(0xC2, ((1, 1),), 50, 10**9), (7000, 7000), "big.jpg")


def test_row1_a_decode_past_its_deadline_or_abandoned_is_killed(recognizer: EmotionRecognizer) -> None:
    """Row 1: the decoding thread went on after its client got 504. Now the worker process is killed at
    --decode-timeout, or as soon as its request is abandoned, and a new one takes its place."""
    worker = DecodeWorker(WorkerSettings("yunet", 64, 640, 50_000_000, IMAGE_FORMATS))
    try:
        worker.start()
        photo = _png(np.asarray(Image.fromarray(skimage_data.astronaut()).resize((2048, 2048))))
        first = worker.pid
        with pytest.raises(DecodeTimeout, match="--decode-timeout"):
            worker.decode(photo, "slow.png", True, 2**30, 0.001, threading.Event())
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # type: ignore[arg-type]
        _wait_for(lambda: worker.pid is not None and worker.pid != first)
        abandoned = threading.Event()
        abandoned.set()
        second = worker.pid
        with pytest.raises(Abandoned):
            worker.decode(photo, "left.png", True, 2**30, 60, abandoned)
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)  # type: ignore[arg-type]
        decoded = worker.decode(photo, "a.png", True, 2**30, 60, threading.Event())
        assert decoded.size == (2048, 2048) and len(decoded.faces) == 1
    finally:
        worker.close()


def test_row2_tiff_is_refused_and_decoding_is_held_to_its_share(hostile_api: tuple[str, Any],
                                                                astronaut: bytes) -> None:
    """Row 2: a TIFF declaring 64x64 with a 46336x46336 tile took 2.1 GB. The service reads no TIFF; and a
    worker's memory is limited to the image's share of the budget, so a file whose decoding costs more
    than its header says fails there, not in the machine's memory."""
    url, _ = hostile_api
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tiff, "TIFF")
    records = httpx.post(f"{url}/v1/predict", files=_files(("t.tif", tiff.getvalue()), ("a.png", astronaut)),
                         timeout=30).json()
    assert "TIFF is not read by the service" in records[0]["error"] and records[1]["faces"]
    worker = DecodeWorker(WorkerSettings("yunet", 64, 640, 100_000_000, IMAGE_FORMATS))
    try:
        big = _png(np.full((6000, 8000, 3), 200, np.uint8))  # 48 MP: about 450 MB to decode, given a share of 1 MB
        with pytest.raises(PixelLimitError, match="more memory to decode than its share"):
            worker.decode(big, "big.png", False, 2**20, 60, threading.Event())
        _wait_for(lambda: worker.pid is not None)  # replaced
        assert worker.decode(_png(np.full((64, 64), 9, np.uint8)), "s.png", False, 2**20, 60,
                             threading.Event()).size == (64, 64)
    finally:
        worker.close()


def test_row3_a_body_in_one_byte_chunks_is_cut_off(hostile_api: tuple[str, Any]) -> None:
    """Row 3: 1-byte chunks starved the event loop (h11 appended each to the body). Now httptools parses them in
    C, and a body whose pieces average under MIN_PIECE_BYTES past MAX_SMALL_PIECES gets 400 and is closed."""
    url, _ = hostile_api
    with _connect(url) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n \r\n" * (MAX_SMALL_PIECES + 50))
        started = time.monotonic()
        answer: bytes | None
        try:
            answer = _read_all(sock)  # fails if the connection stays open
        except ConnectionResetError:  # closed while the last pieces still arrived: the answer is lost with them
            answer = None
    if answer is not None:
        assert answer.startswith(b"HTTP/1.1 400") and b"pieces" in answer and b"connection: close" in answer.lower()
    assert time.monotonic() - started < 5
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_row4_json_and_base64_are_read_off_the_event_loop(hostile_api: tuple[str, Any], astronaut: bytes,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 4: base64 was checked a character at a time in Python on the event loop (/healthz froze 13.8 s).
    Now binascii checks it, strictly, on a thread with the JSON parsing."""
    from ferkit.serve import routes

    url, _ = hostile_api
    threads: list[str] = []
    real = routes.json_uploads

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(routes, "json_uploads", spy)
    response = httpx.post(f"{url}/v1/predict", json={"images": [base64.b64encode(astronaut).decode()]}, timeout=30)
    assert response.status_code == 200 and threads and threads[0] != "MainThread"
    assert all("ferkit" not in name and "loop" not in name.lower() for name in threads)
    assert decode_base64(base64.b64encode(b"\x00\xff" * 9).decode(), "x") == b"\x00\xff" * 9
    with pytest.raises(RequestError, match="'é' is not a base64 character"):
        decode_base64("QUJD" * 1000 + "é", "x")


def test_row5_bodies_in_flight_are_bounded_before_they_are_read(recognizer: EmotionRecognizer) -> None:
    """Row 5: 8 bodies of 160 MB at once took 4.93 GB: --max-pending counted a request once its body was in.
    Now the bytes being read count against --max-inflight-mb as they come (three times over: body, form, files),
    and a body that does not fit is answered 503 before it is read."""
    with served(recognizer, max_inflight_mb=1.0, body_timeout_s=5.0) as (url, app), _connect(url) as holder:
        holder.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 300000\r\n\r\n{\"images\": [")  # 0.9 MB of the budget taken
        _wait_for(lambda: app.state.service.inflight.used > 0)
        refused = httpx.post(f"{url}/v1/predict", content=b"x" * 100_000, timeout=30,
                             headers={"content-type": "application/json"})
        assert_error(refused, 503, "--max-inflight-mb")
        assert refused.headers["retry-after"] == "1"
        holder.close()
        _wait_for(lambda: app.state.service.inflight.used == 0)
        assert_error(httpx.post(f"{url}/v1/predict", content=b"{}", timeout=30,
                                headers={"content-type": "application/json"}), 400, "no images")


def test_row6_idle_connections_past_the_limit_close_the_longest_idle(hostile_api: tuple[str, Any]) -> None:
    """Row 6: 1,100 idle connections exhausted a 1,024 file limit: probes failed, tracebacks logged at 4.7 MB/s.
    Now connections past --limit-concurrency (and never near the file limit) close the longest idle one."""
    url, _ = hostile_api  # limit_concurrency=40
    with ExitStack() as stack:
        idle = [stack.enter_context(_connect(url)) for _ in range(60)]
        time.sleep(0.3)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        closed = 0
        for sock in idle:
            sock.settimeout(0.5)
            with contextlib.suppress(socket.timeout):
                closed += sock.recv(1) == b""
        assert closed >= 20  # the oldest were closed to make room
    assert connection_limit(ServeConfig(limit_concurrency=5000)) <= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100


def test_row6_repeated_log_lines_are_rate_limited() -> None:
    logger = logging.getLogger("ferkit.serve.test-rate")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(RateLimit())
    try:
        for _ in range(1000):
            logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
    assert len(records) == BURST


def test_row7_a_long_json_integer_is_a_400(hostile_api: tuple[str, Any]) -> None:
    """Row 7: a 5,000-digit integer gave 500 and two tracebacks."""
    url, _ = hostile_api
    body = b'{"images": [], "n": ' + b"9" * 5000 + b"}"
    assert_error(httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": "application/json"},
                            timeout=30), 400, "5,000 digits")


def test_row8_streams_are_the_clients_own(hostile_api: tuple[str, Any], astronaut: bytes) -> None:
    """Row 8: anyone who knew a stream id could write to it; 64 new ids evicted every stream; a fixed time grew a
    stream's history without end."""
    url, app = hostile_api
    with httpx.Client(base_url=url, timeout=30) as mine, httpx.Client(base_url=url, timeout=30) as theirs:
        opened = mine.post("/v1/predict?stream=new&time=0", files=_files(("f.png", astronaut)))
        assert opened.status_code == 200 and opened.json()[0]["faces"][0]["track"] == 1
        stream = opened.headers["x-stream-id"]
        assert len(stream) >= 22 and mine.cookies.get("ferkit_session")
        assert mine.post(f"/v1/predict?stream={stream}&time=0.1", files=_files(("f.png", astronaut))).json()[0][
            "faces"][0]["track"] == 1
        assert_error(theirs.post(f"/v1/predict?stream={stream}", files=_files(("f.png", astronaut))), 404,
                     "no such webcam stream")
        # A name of the client's own is scoped to its session cookie: the same name elsewhere is another stream.
        for client in (mine, theirs):
            assert client.post("/v1/predict?stream=cam&time=0", files=_files(("f.png", astronaut))).status_code == 200
        assert len(app.state.service.streams.streams) == 3
        for i in range(8):  # past --max-streams: the client's own least recently used ones close, no one else's
            mine.post(f"/v1/predict?stream=s{i}", files=_files(("f.png", astronaut)))
        owners = [s.owner.session for s in app.state.service.streams.streams.values()]
        assert owners.count(mine.cookies["ferkit_session"]) == 4 and owners.count(theirs.cookies["ferkit_session"]) == 1
    registry = StreamRegistry(EMOTIONS)
    client = Client("127.0.0.1", "s" * 22)
    key = registry.resolve("cam", client)
    face = FaceResult(box=(10, 10, 50, 50), probabilities={e: 1 / 7 for e in EMOTIONS}, label="happy", score=0.9)
    for _ in range(2_000):  # a fixed time: the stream's clock moves on all the same
        registry.update(key, client, [face], 5.0)
    tracking = registry.streams[key].tracking
    assert max(len(h) for h in tracking.smoother.history.values()) <= tracking.smooth / MIN_FRAME_STEP + 2


@pytest.mark.slow
def test_row9_decode_estimates_cover_what_decoding_takes() -> None:
    """Row 9: 16-bit PNG and lossless WebP took 23-50% more than estimated. Measured in a worker on 12 MP images."""
    rgb = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((4000, 3000)))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    cases = {"png16": (Image.fromarray(gray.astype(np.uint16) * 257), "PNG", {"compress_level": 1}),
             "webp": (Image.fromarray(rgb), "WEBP", {"lossless": True, "method": 0})}
    worker = DecodeWorker(WorkerSettings("yunet", 64, 640, 50_000_000, IMAGE_FORMATS))
    try:
        worker.decode(_jpeg(rgb), "warm.jpg", True, 2**30, 120, threading.Event())
        for name, (image, kind, options) in cases.items():
            buffer = io.BytesIO()
            image.save(buffer, kind, **options)
            width, height, mode, image_format = read_image_format(buffer.getvalue(), name)
            estimate = decode_bytes(width, height, mode, image_format)
            decoded = worker.decode(buffer.getvalue(), name, True, estimate, 120, threading.Event())
            assert decoded.peak_rss_bytes <= estimate, (name, decoded.peak_rss_bytes / (width * height))
    finally:
        worker.close()


def test_row10_a_jpeg_too_small_for_its_declared_size_is_refused(hostile_api: tuple[str, Any]) -> None:
    """Row 10: a 335-byte JPEG declaring 7000x7000 was decoded (49 MP of nothing) and answered 200."""
    url, _ = hostile_api
    assert_error(httpx.post(f"{url}/v1/predict", files=_files(("lie.jpg", declared_huge_jpeg())), timeout=30), 422,
                 "lie.jpg", "truncated", "needs at least")


def test_row11_proxy_headers_are_believed_only_from_forwarded_allow_ips() -> None:
    """Row 11: X-Forwarded-For from loopback was trusted and written raw into the access log."""
    from uvicorn.config import Config
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
        pass

    default = Config(app, **uvicorn_options(ServeConfig()))
    default.load()
    assert not isinstance(default.loaded_app, ProxyHeadersMiddleware)
    proxied = Config(app, **uvicorn_options(ServeConfig(forwarded_allow_ips=("10.0.0.1",))))
    proxied.load()
    assert isinstance(proxied.loaded_app, ProxyHeadersMiddleware)


def test_row12_no_query_string_in_the_access_log() -> None:
    """Row 12: an API key sent as ?api_key= was refused (422) but written to the access log."""
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?api_key=SECRET", "1.1", 422), None)
    assert NoQueryString().filter(record)
    assert "SECRET" not in record.getMessage() and "/v1/models?..." in record.getMessage()


def test_row13_models_show_no_training_paths(hostile_api: tuple[str, Any]) -> None:
    """Row 13: /v1/models showed the data and run folders of the machine that trained the weights."""
    url, _ = hostile_api
    text = httpx.get(f"{url}/v1/models", timeout=30).text
    assert "runs/" not in text and "shared/data" not in text and '"data_source"' not in text
    assert without_paths({"a": "/home/x/data", "b": "https://example.org/x", "c": "text with / slash",
                          "d": [r"C:\runs\x", 3]}) == {"b": "https://example.org/x", "c": "text with / slash",
                                                       "d": [3]}


def test_row14_content_length_with_transfer_encoding_is_refused_and_closed(hostile_api: tuple[str, Any]) -> None:
    """Row 14: both framing headers together were accepted and the connection kept open."""
    url, _ = hostile_api
    with _connect(url) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    assert "Transfer-Encoding" in json.loads(body)["error"]


def test_an_error_closes_its_connection(recognizer: EmotionRecognizer) -> None:
    """Row 3's other half: with a key set, a connection stayed open after its 401 while its body kept coming."""
    with served(recognizer, api_key="k") as (url, _), _connect(url) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n \r\n" * 10)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer.lower()


def _read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """What the server sends until it closes the connection (failing if it keeps it open `seconds`)."""
    sock.settimeout(seconds)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _wait_for(condition: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
