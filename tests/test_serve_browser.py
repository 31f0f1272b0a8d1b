"""The page at / in a real headless Chromium (Debian's, driven by Playwright): photos, and the webcam.

Photos with several FER-2013 faces at known places, in several aspect ratios: every box the page draws
must sit where the API's box is on the image as drawn; a photo over the upload limit is shrunk by the
page before it is sent, its boxes still in the photo's own pixels.

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

from fer_photos import Box, background, fer_faces, iou, paste, photo, read_gray  # noqa: E402
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


def webcam_frames(data_root: Path | None, count: int = 20, height: int = 480) -> list[np.ndarray]:
    """640 x `height` (360 to 480) frames of real faces that drift a little: the astronaut, with FER-2013 faces
    beside her if present."""
    portrait = cv2.resize(skimage_data.astronaut(), (560, 560), interpolation=cv2.INTER_AREA)
    faces = [read_gray(p) for p in fer_faces(data_root, "surprise")[:1]] if data_root else []
    frames = []
    for i in range(count):
        dx = 4 * (i % 5)
        frame = np.full((height, 640, 3), 60, np.uint8)
        frame[:, dx : dx + 400] = portrait[30 : 30 + height, 60:460]
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
            refused: list[str] = []
            page.on("response", lambda r: refused.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(url)
            page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('model:')")
            assert not page.locator("#key-row").is_visible()  # this server has no API key
            # The icon is inline (a browser asks for /favicon.ico, a 404 in the log, only without one).
            icon = page.locator("link[rel~=icon]").get_attribute("href") or ""
            assert icon.startswith("data:image/svg+xml,")
            assert page.evaluate("href => new Promise((ok) => { const i = new Image(); i.onload = () => "
                                 "ok(i.naturalWidth); i.onerror = () => ok(0); i.src = href; })", icon) > 0
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
            assert not errors and not refused, (errors, refused)
        finally:
            browser.close()


@contextmanager
def webcam_page(url: str, tmp_path: Path, request: pytest.FixtureRequest, init_script: str | None = None,
                height: int = 480, viewport: tuple[int, int] = (1100, 720)) -> Iterator[tuple[Any, list[str]]]:
    """The page at `url` in Chromium whose camera plays real faces (the astronaut alone without FER-2013)
    in 640 x `height` frames, and the list its JavaScript errors go to."""
    sync_playwright = _require_browser()
    try:
        data_root: Path | None = request.getfixturevalue("data_root")
    except pytest.skip.Exception:
        data_root = None
    video = write_y4m(tmp_path / "faces.y4m", webcam_frames(data_root, height=height))
    with sync_playwright() as playwright:
        browser = _launch(playwright, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                          f"--use-file-for-fake-video-capture={video}")
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
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


# Each live box as drawn, and as sent, in fractions (x, y, w, h) of the video.
LIVE_BOXES = """() => {
  const video = document.querySelector('#video');
  const r = video.getBoundingClientRect();
  return [...document.querySelectorAll('#overlay .live-box')].map((box) => {
    const b = box.getBoundingClientRect();
    const [x, y, w, h] = box.dataset.box.split(',').map(Number);
    return [[(b.x - r.x) / r.width, (b.y - r.y) / r.height, b.width / r.width, b.height / r.height],
            [x / video.videoWidth, y / video.videoHeight, w / video.videoWidth, h / video.videoHeight]];
  });
}"""


def test_page_labels_the_webcam_live(url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A 16:9 camera on a narrow (phone-sized) page: the video is drawn smaller than the stage's least
    height, and each live box still sits where its face is on the video."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with webcam_page(url, tmp_path, request, height=360, viewport=(400, 800)) as (page, errors):
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
        assert page.locator("#video").evaluate("v => [v.videoWidth, v.videoHeight]") == [640, 360]
        page.add_style_tag(content=".live-box { transition: none !important; }")  # boxes where they are going
        live = page.evaluate(LIVE_BOXES)
        assert live and all(drawn == pytest.approx(sent, abs=0.02) for drawn, sent in live), live
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


# Each drawn box of each result card as fractions (x, y, w, h) of its image as drawn; null for a card
# without an image (an error).
DRAWN_BOXES = """cards => cards.map((card) => {
  const img = card.querySelector('.frame img');
  if (!img) return null;
  const r = img.getBoundingClientRect();
  return [...card.querySelectorAll('.frame .box')].map((box) => {
    const b = box.getBoundingClientRect();
    return [(b.x - r.x) / r.width, (b.y - r.y) / r.height, b.width / r.width, b.height / r.height];
  });
})"""

# Where three FER-2013 faces are pasted (x, y, w, h) in photos of three shapes: 4:3, wide and tall.
SCENES: dict[str, tuple[tuple[int, int], list[Box]]] = {
    "three.png": ((640, 480), [(40, 120, 160, 160), (250, 60, 150, 150), (440, 200, 170, 170)]),
    "wide.png": ((1200, 420), [(60, 150, 180, 180), (520, 40, 200, 200), (930, 180, 190, 190)]),
    "tall.png": ((420, 900), [(40, 60, 170, 170), (220, 380, 160, 160), (90, 650, 190, 190)]),
}


def three_faces(data_root: Path) -> list[np.ndarray]:
    """Three PrivateTest faces that the detector finds (happy, surprise, neutral)."""
    return [read_gray(fer_faces(data_root, cls)[i]) for cls, i in (("happy", 0), ("surprise", 0), ("neutral", 1))]


def fractions(box: list[int] | tuple[int, ...], width: int, height: int) -> list[float]:
    x, y, w, h = box
    return [x / width, y / height, w / width, h / height]


# Counts the predict requests in flight at once (window.mostInFlight).
COUNT_IN_FLIGHT = """
const originalFetch = window.fetch;
window.inFlight = 0;
window.mostInFlight = 0;
window.fetch = async (...args) => {
  const predict = String(args[0]).includes("/v1/predict");
  if (predict) window.mostInFlight = Math.max(window.mostInFlight, ++window.inFlight);
  try { return await originalFetch(...args); } finally { if (predict) window.inFlight -= 1; }
};
"""


def test_page_boxes_sit_on_every_face_in_the_order_picked(url: str, tmp_path: Path, data_root: Path) -> None:
    """Three faces in a 4:3, a wide and a tall photo (and two more copies), and a text file named .jpg
    among them: each photo's card, in the order picked, draws the API's boxes on its faces (within 2% of
    the image's size), the bad file's card says why beside them, and at most 4 requests run at once."""
    sync_playwright = _require_browser()
    faces = three_faces(data_root)
    picked: list[Path] = []
    expected: dict[str, dict[str, Any]] = {}
    for seed, (name, ((width, height), boxes)) in enumerate(SCENES.items()):
        path = tmp_path / name
        Image.fromarray(photo(faces, boxes, width, height, seed)).save(path)
        with path.open("rb") as f:
            record = httpx.post(f"{url}/v1/predict", files={"files": (name, f)}, timeout=60).json()[0]
        found = [tuple(face["box"]) for face in record["faces"]]
        assert len(found) == 3 and all(max(iou(b, f) for f in found) > 0.5 for b in boxes), (name, found)
        expected[name] = record
        picked.append(path)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo\n")
    picked.insert(1, bad)
    for name in ("wide.png", "three.png"):
        copy = tmp_path / f"again-{name}"
        shutil.copy(tmp_path / name, copy)
        expected[copy.name] = {**expected[name], "path": copy.name}
        picked.append(copy)
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.add_init_script(COUNT_IN_FLIGHT)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            page.set_input_files("#file-input", [str(p) for p in picked])
            page.wait_for_function("document.querySelector('#photo-status').textContent.startsWith('6 of 6 read')",
                                   timeout=60_000)
            assert page.locator("#photo-status").inner_text() == "6 of 6 read, 1 failed"
            assert 2 <= page.evaluate("window.mostInFlight") <= 4
            titles = page.locator(".result h3").all_inner_texts()
            assert [t.split(":")[0] for t in titles] == [p.name for p in picked], titles
            assert page.locator(".result").nth(1).locator(".error").inner_text()  # the server's reason
            drawn = page.locator(".result").evaluate_all(DRAWN_BOXES)
            assert drawn[1] is None
            for name, boxes in zip([p.name for p in picked], drawn, strict=True):
                if name == bad.name:
                    continue
                record = expected[name]
                want = [fractions(face["box"], record["width"], record["height"]) for face in record["faces"]]
                assert len(boxes) == len(want) == 3
                for got, box in zip(boxes, want, strict=True):
                    assert got == pytest.approx(box, abs=0.02), (name, got, box)
            page.screenshot(path=str(ARTIFACTS / "serve-three-faces.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def big_photo(path: Path, faces: list[np.ndarray]) -> list[Box]:
    """A 4000x3000 JPEG of about 11.8 MB (a noisy scene, so that it compresses badly) with three faces."""
    rng = np.random.default_rng(0)
    canvas = cv2.resize(background(400, 300), (4000, 3000), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    canvas = np.clip(canvas + rng.integers(-60, 61, canvas.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    boxes: list[Box] = [(300, 900, 900, 900), (1500, 400, 800, 800), (2700, 1300, 1000, 1000)]
    for face, box in zip(faces, boxes, strict=True):
        paste(canvas, face, box)
    Image.fromarray(canvas).save(path, quality=98)
    return boxes


def test_page_shrinks_a_photo_over_the_upload_limit(url: str, tmp_path: Path, data_root: Path,
                                                     recognizer: EmotionRecognizer) -> None:
    """A photo the server refuses as too large is shrunk on a canvas and sent; its boxes, scaled back
    to the photo's own 4000x3000 pixels, are those found in the full photo (within 2% of its size)."""
    sync_playwright = _require_browser()
    path = tmp_path / "big.jpg"
    big_photo(path, three_faces(data_root))
    assert path.stat().st_size > ServeConfig().max_file_bytes
    with path.open("rb") as f:
        assert httpx.post(f"{url}/v1/predict", files={"files": ("big.jpg", f)}, timeout=60).status_code == 413
    full = recognizer.predict(path)
    want = [fractions(face.box, 4000, 3000) for face in full]
    assert len(want) == 3
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            page.set_input_files("#file-input", str(path))
            page.locator(".result .shrunk").wait_for(timeout=60_000)
            assert "4000x3000: sent shrunk to 3072x2304" in page.locator(".result .shrunk").inner_text()
            drawn = page.locator(".result").evaluate_all(DRAWN_BOXES)[0]
            recorded = page.locator(".result .box").evaluate_all("boxes => boxes.map(b => b.dataset.box)")
            assert len(drawn) == len(recorded) == 3
            for got, box, in_pixels in zip(drawn, want, recorded, strict=True):
                assert got == pytest.approx(box, abs=0.02)
                assert fractions([int(v) for v in in_pixels.split(",")], 4000, 3000) == pytest.approx(box, abs=0.02)
            assert not errors, errors
        finally:
            browser.close()
