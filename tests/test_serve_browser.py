"""The page at / in a real headless Chromium (Debian's, driven by Playwright): a photo, and the webcam.

The webcam is Chromium's fake capture device fed a .y4m video written here from real faces
(scikit-image's astronaut, and FER-2013 faces where the data set is present). Screenshots go to
$FERKIT_ARTIFACTS (default: test-artifacts/). Without Chromium the tests skip, except under CI
(`CI` set), where they must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
skimage_data = pytest.importorskip("skimage.data")

from fer_photos import fer_faces, paste, read_gray  # noqa: E402
from ferkit.labels import EMOTIONS  # noqa: E402
from ferkit.predict import EmotionRecognizer  # noqa: E402
from ferkit.serve import ServeConfig, create_app  # noqa: E402
from serve_live import live_server  # noqa: E402

CHROMIUM = os.environ.get("FERKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("FERKIT_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")


def _require_browser() -> Any:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium package")
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium); CI runs these tests")
    if os.environ.get("CI"):
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    return sync_playwright


@pytest.fixture(scope="module")
def url(recognizer: EmotionRecognizer) -> Iterator[str]:
    with live_server(create_app(ServeConfig(), recognizer)) as base:
        yield base


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """RGB frames -> a YUV4MPEG2 (4:2:0) file, the format Chromium's fake capture device reads."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


def webcam_frames(data_root: Path | None, count: int = 20) -> list[np.ndarray]:
    """640x480 frames of real faces that drift a little: the astronaut, with FER-2013 faces beside her if present."""
    portrait = cv2.resize(skimage_data.astronaut(), (560, 560), interpolation=cv2.INTER_AREA)
    faces = [read_gray(p) for p in fer_faces(data_root, "surprise")[:1]] if data_root else []
    frames = []
    for i in range(count):
        dx = 4 * (i % 5)
        frame = np.full((480, 640, 3), 60, np.uint8)
        frame[:, dx : dx + 400] = portrait[30:510, 60:460]
        for face in faces:
            paste(frame, face, (455, 160 + dx, 170, 170))
        frames.append(frame)
    return frames


def _launch(playwright: Any, *extra: str) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra], headless=True)


def test_page_reads_an_uploaded_photo(url: str, tmp_path: Path) -> None:
    sync_playwright = _require_browser()
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    with photo.open("rb") as f:
        expected = httpx.post(f"{url}/v1/predict", files={"files": ("astronaut.png", f)}, timeout=60).json()[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('model:')")
            assert not page.locator("#key-row").is_visible()  # this server has no API key
            page.set_input_files("#file-input", str(photo))
            label = page.locator(".result .face .label").first
            label.wait_for(timeout=30_000)
            assert label.inner_text() == expected["faces"][0]["label"] in EMOTIONS
            bars = page.locator(".result .face .bars .bar")
            assert bars.count() == len(EMOTIONS)
            widths = [float(bars.nth(i).get_attribute("aria-valuenow") or -1) for i in range(bars.count())]
            probabilities = expected["faces"][0]["probabilities"]
            assert widths == pytest.approx([probabilities[e] for e in EMOTIONS], abs=1e-3)
            box_label = page.locator(".result .picture .box .box-label").first
            assert box_label.is_visible() and expected["faces"][0]["label"] in box_label.inner_text()
            page.screenshot(path=str(ARTIFACTS / "serve-photo.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


@contextmanager
def webcam_page(url: str, tmp_path: Path, request: pytest.FixtureRequest,
                init_script: str | None = None) -> Iterator[tuple[Any, list[str]]]:
    """The page at `url` in Chromium whose camera plays real faces (the astronaut alone without FER-2013),
    and the list its JavaScript errors go to."""
    sync_playwright = _require_browser()
    try:
        data_root: Path | None = request.getfixturevalue("data_root")
    except pytest.skip.Exception:
        data_root = None
    video = write_y4m(tmp_path / "faces.y4m", webcam_frames(data_root))
    with sync_playwright() as playwright:
        browser = _launch(playwright, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                          f"--use-file-for-fake-video-capture={video}")
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 720})
            context.grant_permissions(["camera"], origin=url)
            if init_script is not None:
                context.add_init_script(init_script)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


def test_page_labels_the_webcam_live(url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with webcam_page(url, tmp_path, request) as (page, errors):
        page.click("#tab-webcam")
        page.click("#webcam-start")
        page.wait_for_function("document.querySelectorAll('#overlay .live-box').length > 0", timeout=30_000)
        # Live: later frames replace the boxes; wait for a few rounds and read the last.
        page.wait_for_function("document.querySelector('#webcam-status').textContent.includes('ms a frame')")
        page.wait_for_timeout(1500)
        labels = page.locator("#overlay .live-box .box-label").all_inner_texts()
        assert labels and all(text.startswith("#") and text.split()[1] in EMOTIONS for text in labels), labels
        assert page.locator("#live-label").inner_text().split()[1] in EMOTIONS
        assert page.locator("#live-bars .bar").count() == len(EMOTIONS)
        assert page.locator("#video").evaluate("v => v.videoWidth") == 640
        page.screenshot(path=str(ARTIFACTS / "serve-webcam.png"), full_page=True)
        page.click("#webcam-stop")
        assert not errors, errors


# Records each webcam frame's faces as the page receives them: [[track, box, label], ...] per frame.
RECORD_STREAM = """
const originalFetch = window.fetch;
window.streamFrames = [];
window.fetch = async (...args) => {
  const response = await originalFetch(...args);
  if (String(args[0]).includes("stream=") && response.ok) {
    const [record] = await response.clone().json();
    window.streamFrames.push(record.faces.map((f) => [f.track, f.box, f.label]));
  }
  return response;
};
"""


def test_webcam_faces_keep_their_track_over_consecutive_frames(url: str, tmp_path: Path,
                                                                request: pytest.FixtureRequest) -> None:
    """The page sends its frames as one stream; the server's tracker gives each face one id throughout."""
    with webcam_page(url, tmp_path, request, init_script=RECORD_STREAM) as (page, errors):
        page.click("#tab-webcam")
        page.click("#webcam-start")
        page.wait_for_function("window.streamFrames.length >= 8", timeout=60_000)
        frames = page.evaluate("window.streamFrames")
        largest = [faces[0][0] for faces in frames if faces]  # the astronaut, largest face in every frame
        assert len(largest) >= 7 and len(set(largest)) == 1, frames
        assert all(isinstance(track, int) for faces in frames for track, _, _ in faces)
        assert len({track for faces in frames for track, _, _ in faces}) <= 3, frames
        shown = page.locator("#overlay .live-box").evaluate_all("boxes => boxes.map(b => b.dataset.track)")
        assert str(largest[0]) in shown
        assert page.locator("#live-label").inner_text().startswith(f"#{largest[0]} ")
        page.click("#webcam-stop")
        assert not errors, errors


def test_docs_render_offline(url: str) -> None:
    """Swagger UI at /docs draws the API with every request to anywhere but the server refused."""
    sync_playwright = _require_browser()
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page()
            outside: list[str] = []

            def only_the_server(route: Any) -> None:
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_the_server)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(f"{url}/docs")
            page.locator(".opblock-summary-path", has_text="/v1/predict").wait_for(timeout=30_000)
            assert not outside and not errors, (outside, errors)
        finally:
            browser.close()
