"""`ferkit serve`: every endpoint, the API key, every limit and bad input, batching, overload and timeouts.

Real photos throughout: scikit-image's astronaut, FER-2013 faces pasted into photos, a photo without
faces. The service's records are compared with `ferkit predict --json` on the same files.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
skimage_data = pytest.importorskip("skimage.data")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fer_photos import background, fer_faces, photo, read_gray  # noqa: E402
from ferkit import cli  # noqa: E402
from ferkit.images import PixelLimitError  # noqa: E402
from ferkit.labels import EMOTIONS, FERPLUS_CLASSES  # noqa: E402
from ferkit.predict import EmotionRecognizer  # noqa: E402
from ferkit.serve import (  # noqa: E402
    API_KEY_ENV,
    PRIORS,
    MicroBatcher,
    ServeConfig,
    create_app,
    decode_image,
    resolve_api_key,
)
from ferkit.weights import DEFAULT_MODEL, load_model, read_meta, save_weights, shipped_models  # noqa: E402
from serve_live import live_server  # noqa: E402

TWO_FACES = [(40, 60, 150, 150), (360, 150, 180, 180)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return _png(skimage_data.astronaut())


@pytest.fixture(scope="module")
def empty_room() -> bytes:
    return _jpeg(background(seed=3))


@pytest.fixture(scope="module")
def two_faces(data_root: Path) -> bytes:
    """A 640x480 PNG with two real FER-2013 faces pasted in (built here, never stored)."""
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[2:4]]
    return _png(photo(faces, TWO_FACES, seed=1))


def _bomb() -> bytes:
    """A valid 8x8 PNG whose header claims 12,000 x 12,000 pixels."""
    blob = bytearray(_png(np.zeros((8, 8), np.uint8)))
    ihdr = struct.pack(">II", 12_000, 12_000) + blob[24:29]
    blob[16:29] = ihdr
    blob[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(blob)


@contextmanager
def client(recognizer: EmotionRecognizer, **settings: Any) -> Iterator[TestClient]:
    """A TestClient on a fresh app around the shared recognizer, once the model is warm."""
    with TestClient(create_app(ServeConfig(**settings), recognizer), base_url="http://localhost") as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield c


@pytest.fixture(scope="module")
def api(recognizer: EmotionRecognizer) -> Iterator[TestClient]:
    with client(recognizer) as c:
        yield c


def _files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def assert_error(response: httpx.Response, status: int, *phrases: str) -> dict[str, Any]:
    """A JSON error with this status whose message holds every phrase."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status
    for phrase in phrases:
        assert phrase.lower() in body["error"].lower(), body["error"]
    return body


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------------------------
# Results: the same as ferkit predict --json


def test_records_equal_predict_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    api: TestClient, weights: Path, astronaut: bytes, two_faces: bytes,
                                    empty_room: bytes) -> None:
    uploads = {"astronaut.png": astronaut, "two.png": two_faces, "empty-room.jpg": empty_room}
    for name, data in uploads.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    for detect in (True, False):
        status = cli.main(["predict", "--json", "--no-progress", "--weights", str(weights),
                           *([] if detect else ["--no-detect"]), *uploads])
        expected = json.loads(capsys.readouterr().out)
        assert status == 0
        response = api.post(f"/v1/predict?detect={str(detect).lower()}", files=_files(*uploads.items()))
        assert response.status_code == 200, response.text
        assert response.json() == expected
    faces = [len(record["faces"]) for record in expected]
    assert faces == [1, 1, 1]  # --no-detect: each image is one face
    assert [len(r["faces"]) for r in api.post("/v1/predict", files=_files(*uploads.items())).json()] == [1, 2, 0]


def test_json_base64_body_gives_the_same_faces(api: TestClient, astronaut: bytes) -> None:
    multipart = api.post("/v1/predict", files=_files(("astronaut.png", astronaut))).json()[0]
    encoded = base64.b64encode(astronaut).decode()
    for text in (encoded, "data:image/png;base64," + encoded):
        record = api.post("/v1/predict", json={"images": [text]}).json()[0]
        assert record["path"] == "images[0]"
        assert {k: v for k, v in record.items() if k != "path"} == {k: v for k, v in multipart.items() if k != "path"}
    assert multipart["faces"][0]["label"] in EMOTIONS


def test_digits_round_the_probabilities(api: TestClient, astronaut: bytes, recognizer: EmotionRecognizer) -> None:
    full = recognizer.predict(skimage_data.astronaut())[0].probabilities
    for digits in (0, 2, 9):
        face = api.post(f"/v1/predict?digits={digits}", files=_files(("a.png", astronaut))).json()[0]["faces"][0]
        assert face["probabilities"] == {k: round(v, digits) for k, v in full.items()}


def test_prior_matches_a_recognizer_with_that_prior(api: TestClient, astronaut: bytes, weights: Path,
                                                    recognizer: EmotionRecognizer) -> None:
    """The service keeps one recognizer and passes ?prior= into its calls: the same as a recognizer made with it."""
    assert PRIORS == ("train", "uniform")
    assert read_meta(weights).preprocessing.class_prior is not None  # so both priors apply
    for prior in PRIORS:
        response = api.post(f"/v1/predict?prior={prior}", files=_files(("a.png", astronaut)))
        expected = EmotionRecognizer(weights, device="cpu", prior=prior).predict(skimage_data.astronaut())
        face = response.json()[0]["faces"][0]
        assert face["label"] == expected[0].label
        assert face["probabilities"] == pytest.approx(expected[0].probabilities, abs=2e-6)
    default = api.post("/v1/predict", files=_files(("a.png", astronaut))).json()[0]["faces"][0]
    ours = api.post(f"/v1/predict?prior={recognizer.prior}", files=_files(("a.png", astronaut))).json()[0]["faces"][0]
    assert default == ours  # no ?prior=: the server's recognizer's own
    assert_error(api.post("/v1/predict?prior=sideways", files=_files(("a.png", astronaut))), 422, "prior",
                 "'sideways'", "train, uniform")


def test_uniform_prior_is_refused_for_weights_without_a_class_prior(tmp_path: Path, weights: Path,
                                                                   astronaut: bytes) -> None:
    model, meta = load_model(weights)
    plain = dataclasses.replace(meta, preprocessing=dataclasses.replace(meta.preprocessing, class_prior=None))
    save_weights(tmp_path / "no-prior.safetensors", model, plain)
    with client(EmotionRecognizer(tmp_path / "no-prior.safetensors", device="cpu")) as c:
        assert_error(c.post("/v1/predict?prior=uniform", files=_files(("a.png", astronaut))), 422,
                     "prior 'uniform'", "no-prior.safetensors carries no training class prior")
        assert c.post("/v1/predict?prior=train", files=_files(("a.png", astronaut))).status_code == 200


def test_image_checked_by_decoding_not_by_name_or_type(api: TestClient, astronaut: bytes) -> None:
    ok = api.post("/v1/predict", files=[("files", ("notes.txt", astronaut, "text/plain"))])
    assert ok.status_code == 200 and len(ok.json()[0]["faces"]) == 1
    assert_error(api.post("/v1/predict", files=[("files", ("photo.jpg", b"I am text\n" * 20, "image/jpeg"))]),
                 422, "photo.jpg", "not an image")


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error that says what was wrong, and the server goes on


def test_every_bad_input_gets_a_4xx_that_says_why(api: TestClient, astronaut: bytes) -> None:
    truncated = _jpeg(skimage_data.astronaut())
    cases: list[tuple[Callable[[], httpx.Response], int, tuple[str, ...]]] = [
        (lambda: api.post("/v1/predict", files=_files(("t.jpg", truncated[: len(truncated) // 2]))), 422,
         ("t.jpg", "corrupt or truncated")),
        (lambda: api.post("/v1/predict", files=_files(("empty.png", b""))), 422, ("empty.png", "empty")),
        (lambda: api.post("/v1/predict", files=_files(("bomb.png", _bomb()))), 413,
         ("bomb.png", "144,000,000 pixels", "limit")),
        (lambda: api.post("/v1/predict", json={"images": ["not base64!"]}), 400, ("images[0]", "base64")),
        (lambda: api.post("/v1/predict", json={"images": [42]}), 400, ("images[0]", "base64 string")),
        (lambda: api.post("/v1/predict", json={"images": []}), 400, ("no images",)),
        (lambda: api.post("/v1/predict", json={"pictures": ["x"]}), 400, ("no images", '"images"')),
        (lambda: api.post("/v1/predict", json=["x"]), 400, ("no images",)),
        (lambda: api.post("/v1/predict", content=b"{oops", headers={"content-type": "application/json"}), 400,
         ("not valid json",)),
        (lambda: api.post("/v1/predict", content=b"", headers={"content-type": "application/json"}), 400,
         ("not valid json",)),
        (lambda: api.post("/v1/predict", data={"note": "hi"}, files=[("other", ("a.png", astronaut, "image/png"))]),
         400, ("no images", "'files'", "'other'")),
        (lambda: api.post("/v1/predict", data={"files": "a string"}, files=[("x", ("a.png", b"1", "image/png"))]),
         400, ("files[0]", "not a file")),
        (lambda: api.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
         400, ("multipart",)),
        (lambda: api.post("/v1/predict"), 415, ("content type", "multipart/form-data")),
        (lambda: api.post("/v1/predict", content=b"abc", headers={"content-type": "text/plain"}), 415,
         ("'text/plain'",)),
        (lambda: api.post("/v1/predict?digits=-1", files=_files(("a.png", astronaut))), 422, ("digits", "greater")),
        (lambda: api.post("/v1/predict?digits=99", files=_files(("a.png", astronaut))), 422, ("digits", "less")),
        (lambda: api.post("/v1/predict?digits=two", files=_files(("a.png", astronaut))), 422, ("digits", "integer")),
        (lambda: api.post("/v1/predict?detect=maybe", files=_files(("a.png", astronaut))), 422, ("detect", "bool")),
        (lambda: api.get("/v1/predict"), 405, ("method not allowed",)),
        (lambda: api.get("/v2/predict"), 404, ("not found",)),
    ]
    for send, status, phrases in cases:
        assert_error(send(), status, *phrases)
    assert api.get("/healthz").json() == {"status": "ok"}


def test_one_bad_file_never_sinks_the_batch(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    """Issue 31: 200 with each file's record (its faces, or its error) when at least one was read; a 4xx only
    when none was: 413 when each was over a limit, else 422."""
    truncated = _jpeg(skimage_data.astronaut())
    with client(recognizer, max_pixels=1_000_000) as c:
        alone = c.post("/v1/predict", files=_files(("good.png", astronaut))).json()[0]
        response = c.post("/v1/predict", files=_files(("notes.jpg", b"I am text\n" * 20), ("good.png", astronaut),
                                                      ("t.jpg", truncated[: len(truncated) // 2]),
                                                      ("bomb.png", _bomb()), ("empty.png", b"")))
        assert response.status_code == 200, response.text
        records = response.json()
        assert [r["path"] for r in records] == ["notes.jpg", "good.png", "t.jpg", "bomb.png", "empty.png"]
        assert records[1] == alone and records[1]["error"] is None and len(records[1]["faces"]) == 1
        for record, phrase in zip([records[i] for i in (0, 2, 3, 4)],
                                  ["not an image", "corrupt or truncated", "over the pixel limit of 1,000,000",
                                   "empty"], strict=True):
            assert set(record) == set(alone) and record["faces"] == [] and record["type"] == "image"
            assert record["width"] is None and record["height"] is None
            assert record["path"] in record["error"] and phrase in record["error"], record
        b64 = c.post("/v1/predict", json={"images": [base64.b64encode(astronaut).decode(),
                                                     base64.b64encode(b"GIF89a garbage").decode()]}).json()
        assert b64[0]["faces"] == alone["faces"] and "images[1]" in b64[1]["error"]
        # None read: the request is refused, naming every file; a limit alone gives 413.
        body = assert_error(c.post("/v1/predict", files=_files(("a.jpg", b"text"), ("bomb.png", _bomb()))), 422,
                            "none of the 2 images", "a.jpg: not an image", "bomb.png")
        assert "1,000,000" in body["error"]
        assert_error(c.post("/v1/predict", files=_files(("bomb.png", _bomb()), ("b2.png", _bomb()))), 413,
                     "bomb.png", "b2.png", "pixel limit")
        assert_error(c.post("/v1/predict", files=_files(("bomb.png", _bomb()))), 413, "bomb.png", "pixel limit")


def test_upload_size_pixel_and_file_count_limits(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    limit = len(astronaut) - 1
    with client(recognizer, max_file_bytes=limit, max_files=2, max_pixels=512 * 512 - 1) as c:
        assert_error(c.post("/v1/predict", files=_files(("big.png", astronaut))), 413, "big.png",
                     f"{len(astronaut):,} bytes", f"limit of {limit:,}")
        assert_error(c.post("/v1/predict", json={"images": [base64.b64encode(astronaut).decode()]}), 413,
                     "images[0]", f"{limit:,}")
        small = _png(skimage_data.astronaut()[::2, ::2])  # 256x256: under every limit
        assert c.post("/v1/predict", files=_files(("s.png", small), ("s2.png", small))).status_code == 200
        assert_error(c.post("/v1/predict", files=_files(*[(f"{i}.png", small) for i in range(3)])), 400,
                     "too many files", "at most 2")
        assert_error(c.post("/v1/predict", json={"images": [base64.b64encode(small).decode()] * 3}), 400,
                     "too many images", "at most 2")
        tiny = _png(np.zeros((8, 8), np.uint8))  # many files past the parser's own count limit
        assert_error(c.post("/v1/predict", files=_files(*[(f"{i}.png", tiny) for i in range(40)])), 400,
                     "too many files", "at most 2")
        oversized = _png(np.zeros((512, 512), np.uint8))  # small in bytes, one pixel over the limit
        assert_error(c.post("/v1/predict", files=_files(("wide.png", oversized))), 413, "wide.png",
                     "262,144 pixels", "262,143")
        huge = b"x" * (ServeConfig(max_file_bytes=limit, max_files=2).max_body_bytes + 1)
        assert_error(c.post("/v1/predict", content=huge, headers={"content-type": "application/json"}), 413,
                     "request body")
        assert c.get("/healthz").status_code == 200


def test_decode_image_refuses_from_the_header() -> None:
    with pytest.raises(PixelLimitError, match="144,000,000 pixels, over the pixel limit of 1,000,000"):
        decode_image(_bomb(), "bomb.png", 1_000_000)
    image = decode_image(_png(skimage_data.astronaut()), "a.png", 1_000_000)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# The other endpoints


def test_models_lists_shipped_and_loaded(api: TestClient, recognizer: EmotionRecognizer) -> None:
    models = api.get("/v1/models").json()
    names = [m["name"] for m in models]
    assert set(shipped_models()) <= set(names)
    assert [m["name"] for m in models if m["default"]] == [DEFAULT_MODEL]
    loaded = [m for m in models if m["loaded"]]
    assert len(loaded) == 1 and loaded[0]["file"] == Path(recognizer.backend.path).name
    assert loaded[0]["classes"] == recognizer.classes
    for model in models:
        assert model["classes"] in (list(EMOTIONS), list(FERPLUS_CLASSES))  # FER-2013's seven or FER+'s eight
        assert model["views_per_face"] in (1, 2, 10)
        assert model["arch"] and isinstance(model["metadata"], dict)
        assert model["accuracy"]["val"] is None or 0.2 < model["accuracy"]["val"] < 1


def test_health_readiness_and_warm_up(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    app = create_app(ServeConfig(), recognizer)
    service = app.state.service
    gate = threading.Event()
    service.model_thread.submit(gate.wait, 30)  # the model thread is busy: warm-up cannot finish yet
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        not_ready = c.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        assert_error(c.post("/v1/predict", files=_files(("a.png", astronaut))), 503, "warming up")
        gate.set()
        for _ in range(400):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        ready = c.get("/readyz").json()
        assert ready["ready"] is True and ready["model"] == Path(recognizer.backend.path).name
        assert c.post("/v1/predict", files=_files(("a.png", astronaut))).status_code == 200


def test_metrics_count_requests_errors_latency_and_batches(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    with client(recognizer) as c:
        for _ in range(3):
            assert c.post("/v1/predict", files=_files(("a.png", astronaut))).status_code == 200
        assert c.post("/v1/predict", files=_files(("x.png", b"nope"))).status_code == 422
        response = c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = _metrics(response.text)
    post = (("method", "POST"), ("path", "/v1/predict"))
    assert samples[("ferkit_http_requests_total", (*post, ("status", "200")))] == 3
    assert samples[("ferkit_http_requests_total", (*post, ("status", "422")))] == 1
    assert samples[("ferkit_http_request_errors_total", (*post, ("status", "422")))] == 1
    assert samples[("ferkit_http_request_duration_seconds_count", post)] == 4
    assert samples[("ferkit_http_request_duration_seconds_sum", post)] > 0
    assert samples[("ferkit_faces_total", ())] == 3
    assert samples[("ferkit_images_total", ())] == 3
    assert samples[("ferkit_batch_faces_count", ())] == 3


def test_openapi_documents_every_endpoint(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    predict = schema["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {p["name"] for p in predict["parameters"]} >= {"detect", "digits"}
    assert {"200", "400", "401", "413", "415", "422", "503", "504"} <= set(predict["responses"])


def test_docs_pages_load_nothing_from_a_cdn(api: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = api.get(page)
        assert html.status_code == 200 and "/openapi.json" in html.text
        scripts = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert scripts and all(url.startswith("/") for url in scripts), scripts  # no CDN: offline
        for url in scripts:
            assert api.get(url).status_code == 200, url


def test_page_and_its_files_are_served_from_the_package(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert api.get(asset).status_code == 200
    text = page.text + api.get("/static/app.js").text + api.get("/static/style.css").text
    # No CDN: the page works offline. (An inline SVG's xmlns names a namespace; it loads nothing.)
    text = text.replace("xmlns='http://www.w3.org/2000/svg'", "").replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in text and "https://" not in text
    assert page.headers["set-cookie"].startswith("ferkit_session=") and "HttpOnly" in page.headers["set-cookie"]


# ---------------------------------------------------------------------------------------------
# API key


def test_api_key_guards_the_api(recognizer: EmotionRecognizer, astronaut: bytes,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    with client(recognizer, api_key="s3cret") as c:
        for method, path in (("post", "/v1/predict"), ("get", "/v1/models"), ("get", "/metrics")):
            send = getattr(c, method)
            kwargs = {"files": _files(("a.png", astronaut))} if method == "post" else {}
            missing = send(path, **kwargs)
            assert_error(missing, 401, "missing api key", "Authorization: Bearer")
            assert missing.headers["www-authenticate"] == "Bearer"
            assert_error(send(path, headers={"Authorization": "Bearer nope"}, **kwargs), 401, "wrong api key")
            assert_error(send(path, headers={"Authorization": "Basic czNjcmV0"}, **kwargs), 401)
            assert send(path, headers={"Authorization": "Bearer s3cret"}, **kwargs).status_code == 200
        for open_path in ("/healthz", "/readyz", "/", "/openapi.json"):
            assert c.get(open_path).status_code == 200
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("flag") == "flag"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert resolve_api_key(None) is None


# ---------------------------------------------------------------------------------------------
# Concurrency: batching, a bounded queue, a request timeout (live uvicorn, real concurrent clients)


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


Send = tuple[str, bytes, str]
"""One predict request: the image's name, its bytes, its query string ("" for none)."""


def _eight_at_once(recognizer: EmotionRecognizer, sends: list[Send], window_ms: float
                   ) -> tuple[int, list[httpx.Response], dict[Send, Any]]:
    """Send 8 requests at once while the model is held; (model calls they took, responses, each request's
    records when sent alone)."""
    app = create_app(ServeConfig(batch_window_ms=window_ms, workers=2), recognizer)
    service = app.state.service
    submit, submitted = service.batcher.submit, []

    async def counted_submit(*args: Any) -> Any:  # counts the requests whose faces reached the batcher
        submitted.append(1)
        return await submit(*args)

    service.batcher.submit = counted_submit

    def model_calls() -> float:
        return next(s.value for s in service.metrics.batch_faces.collect()[0].samples if s.name.endswith("_count"))

    def post(name: str, data: bytes, query: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/predict{query}", files=_files((name, data)), timeout=60)

    with live_server(app) as url:
        alone = {send: post(*send).json() for send in dict.fromkeys(sends)}
        before, submitted[:] = model_calls(), []
        gate = threading.Event()
        service.model_thread.submit(gate.wait, 30)  # hold the model while all 8 requests arrive
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, *send) for send in sends]
            _wait_for(lambda: len(submitted) == len(sends))
            gate.set()
            responses = [f.result() for f in futures]
        return int(model_calls() - before), responses, alone


def _same_faces(record: dict[str, Any], expected: dict[str, Any]) -> None:
    assert len(record["faces"]) == len(expected["faces"]) > 0
    assert [f["label"] for f in record["faces"]] == [f["label"] for f in expected["faces"]]
    assert [f["box"] for f in record["faces"]] == [f["box"] for f in expected["faces"]]
    for face, single in zip(record["faces"], expected["faces"], strict=True):
        assert face["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_concurrent_requests_share_one_model_call(recognizer: EmotionRecognizer, two_faces: bytes,
                                                  astronaut: bytes) -> None:
    sends = [("two.png", two_faces, ""), ("astronaut.png", astronaut, "")] * 4  # 12 faces in 8 requests
    # With a window, the requests that arrive while the model is held share one call; the first
    # batch may have closed on its own before the rest came, so 1 or 2 calls. Without one, 8.
    for window_ms, calls in ((20.0, {1, 2}), (0.0, {8})):
        count, responses, alone = _eight_at_once(recognizer, sends, window_ms)
        assert count in calls, f"window {window_ms} ms: {count} model calls for 8 requests"
        for send, response in zip(sends, responses, strict=True):
            assert response.status_code == 200, response.text
            _same_faces(response.json()[0], alone[send][0])


def test_concurrent_requests_with_other_priors_share_a_call_and_keep_their_own(
        recognizer: EmotionRecognizer, two_faces: bytes, astronaut: bytes, weights: Path) -> None:
    """Requests with different priors join one model call; each gets its own prior's probabilities, as a
    recognizer made with that prior gives them, and nothing of one request's prior reaches another."""
    sends = [(name, data, f"?prior={prior}") for name, data in (("two.png", two_faces), ("astronaut.png", astronaut))
             for prior in ("train", "uniform")] * 2  # interleaved: train, uniform, train, uniform, ...
    count, responses, alone = _eight_at_once(recognizer, sends, 20.0)
    assert count in {1, 2}, f"{count} model calls for 8 requests"
    by_prior = {prior: EmotionRecognizer(weights, device="cpu", prior=prior) for prior in ("train", "uniform")}
    for send, response in zip(sends, responses, strict=True):
        assert response.status_code == 200, response.text
        record = response.json()[0]
        _same_faces(record, alone[send][0])
        prior = send[2].removeprefix("?prior=")
        expected = by_prior[prior].predict(decode_image(send[1], send[0], 10**8))
        assert [f["label"] for f in record["faces"]] == [r.label for r in expected]
        for face, result in zip(record["faces"], expected, strict=True):
            assert face["probabilities"] == pytest.approx(result.probabilities, abs=2e-6)
    # The two priors really differ on these faces, so a leak would have shown.
    train, uniform = (responses[i].json()[0]["faces"][0]["probabilities"] for i in (0, 1))
    assert max(abs(train[k] - uniform[k]) for k in train) > 0.01
    assert recognizer.prior == "uniform"  # the shared recognizer's own setting is as it was


def test_model_call_seconds_time_the_call_not_its_wait_for_the_thread() -> None:
    """Without batching, calls queue for the model's thread; ferkit_model_call_seconds must not count the queue."""

    def slow_model(crops: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return np.zeros((len(crops), 7), np.float32)

    seconds: list[float] = []

    async def four_calls_behind_a_held_model() -> None:
        with ThreadPoolExecutor(1) as model_thread:
            batcher = MicroBatcher(slow_model, model_thread, 0.0, 64, lambda faces, took: seconds.append(took))
            gate = threading.Event()
            model_thread.submit(gate.wait, 30)
            crops = np.zeros((1, 48, 48), np.uint8)
            calls = [asyncio.ensure_future(batcher.submit(crops)) for _ in range(4)]
            await asyncio.sleep(1.0)
            gate.set()
            await asyncio.gather(*calls)

    asyncio.run(four_calls_behind_a_held_model())
    # Counting the wait for the thread would put at least 1 s on the first call.
    assert len(seconds) == 4 and all(0.04 < took < 0.8 for took in seconds), seconds


def test_the_batcher_gives_each_request_its_own_rows_of_one_call() -> None:
    """Three requests' crops in one window: one model call, and each request gets back exactly its rows."""
    calls: list[int] = []

    def model(crops: np.ndarray) -> np.ndarray:  # row i's logits: the crop's first pixel, seven times
        calls.append(len(crops))
        return np.repeat(crops[:, :1, 0].astype(np.float32), 7, axis=1)

    async def three_requests() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as model_thread:
            batcher = MicroBatcher(model, model_thread, 0.2, 64)
            batcher.start()
            try:
                requests = [np.full((n, 48, 48), first + np.arange(n)[:, None, None], np.uint8)
                            for n, first in ((2, 10), (1, 20), (3, 30))]
                return list(await asyncio.gather(*(batcher.submit(crops) for crops in requests)))
            finally:
                await batcher.stop()

    answers = asyncio.run(three_requests())
    assert calls == [6]
    assert [a[:, 0].tolist() for a in answers] == [[10, 11], [20], [30, 31, 32]]
    assert all(a.shape[1] == 7 for a in answers)


def test_full_queue_answers_503_with_retry_after(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    app = create_app(ServeConfig(max_pending=2), recognizer)
    service = app.state.service
    with live_server(app) as url:
        gate = threading.Event()
        service.model_thread.submit(gate.wait, 30)
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(httpx.post, f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=60)
                    for _ in range(2)]
            _wait_for(lambda: service.pending == 2)
            refused = httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=60)
            assert_error(refused, 503, "busy", "retry")
            assert refused.headers["retry-after"] == "1"
            assert httpx.get(f"{url}/healthz").status_code == 200
            gate.set()
            assert [f.result().status_code for f in held] == [200, 200]
        assert httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=60).status_code == 200
        samples = _metrics(httpx.get(f"{url}/metrics").text)
        assert samples[("ferkit_http_requests_total", (("method", "POST"), ("path", "/v1/predict"),
                                                       ("status", "503")))] == 1


def test_request_timeout(recognizer: EmotionRecognizer, astronaut: bytes) -> None:
    app = create_app(ServeConfig(timeout_s=0.5), recognizer)
    service = app.state.service
    with live_server(app) as url:
        gate = threading.Event()
        service.model_thread.submit(gate.wait, 30)
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=60)
        assert_error(response, 504, "longer than", "0.5 s")
        assert time.monotonic() - start < 5
        assert service.pending == 0
        gate.set()
        assert httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)), timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------
# The command


def test_serve_command_runs_the_service(tmp_path: Path, weights: Path, astronaut: bytes) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, API_KEY_ENV: "k", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ferkit", "serve", "--port", str(port), "--weights",
                                str(weights), "--device", "cpu", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ferkit serve did not get ready"
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut))).status_code == 401  # key from env
        response = httpx.post(f"{url}/v1/predict", files=_files(("a.png", astronaut)),
                              headers={"Authorization": "Bearer k"}, timeout=60)
        assert response.status_code == 200 and len(response.json()[0]["faces"]) == 1
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in output and "API key required" in output


def test_serve_command_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--weights", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert cli.main(["serve", "--max-files", "0"]) == 2
    assert "max-files" in capsys.readouterr().err


def test_the_detector_choice_reaches_the_service(recognizer: EmotionRecognizer, astronaut: bytes,
                                                 weights: Path) -> None:
    from ferkit.faces import HaarDetector, YuNetDetector
    from ferkit.serve import make_recognizer

    assert ServeConfig().detector == "yunet"
    boxes = {}
    for name, kind in (("yunet", YuNetDetector), ("haar", HaarDetector)):
        assert isinstance(make_recognizer(ServeConfig(weights=str(weights), device="cpu", detector=name)).detector,
                          kind)
        with client(recognizer, detector=name) as c:
            (face,) = c.post("/v1/predict", files=_files(("a.png", astronaut))).json()[0]["faces"]
        (expected,) = EmotionRecognizer(weights, device="cpu", detector=name).predict(skimage_data.astronaut())
        assert face["box"] == list(expected.box) and face["label"] == expected.label
        boxes[name] = face["box"]
    assert boxes["yunet"] != boxes["haar"]  # the two detectors frame the face differently
