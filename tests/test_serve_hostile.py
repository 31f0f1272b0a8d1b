"""`ferkit serve` under hostile use (issue 18): budgets, slow clients, deep JSON, odd methods and hosts.

A live server on 127.0.0.1 for each case, with raw sockets where a client must misbehave (slow
headers, slow bodies, short bodies). Every case was seen to go wrong before issue 18; each test
says what it was. Bounded: each a few seconds.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import socket
import string
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

from ferkit.predict import EmotionRecognizer  # noqa: E402
from ferkit.serve import ServeConfig, create_app  # noqa: E402
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
