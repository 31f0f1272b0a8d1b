"""docs/serve-page.png: the page of `ferkit serve` in headless Chromium, with a photo of several faces.

The photo is four squares cut from two public-domain pictures that ship with scikit-image (the
astronaut Eileen Collins, NASA, public domain; the cameraman, CC0 by Lav Varshney), two of them
mirrored and at other scales: four faces, read by the default model (or `--weights`). It is built in a
temporary folder; only the screenshot is kept. Before the screenshot is written, every box the page drew
is checked against the API's box for its face (within 2% of the image's size): the script fails rather
than ship a picture with boxes off their faces.

    .venv/bin/python benchmarks/serve_page_screenshot.py                   # -> docs/serve-page.png
    .venv/bin/python benchmarks/serve_page_screenshot.py --out /tmp/page.png --weights ferkit-resnet
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import httpx
import numpy as np
from PIL import Image

from ferkit.predict import EmotionRecognizer
from ferkit.serve import ServeConfig, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_live import live_server

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
TOLERANCE = 0.02  # of the image's width or height

# Each drawn box as fractions (x, y, w, h) of its image as drawn.
DRAWN_BOXES = """() => {
  const r = document.querySelector('.result .frame img').getBoundingClientRect();
  return [...document.querySelectorAll('.result .frame .box')].map((box) => {
    const b = box.getBoundingClientRect();
    return [(b.x - r.x) / r.width, (b.y - r.y) / r.height, b.width / r.width, b.height / r.height];
  });
}"""


def square(image: np.ndarray, centre: tuple[int, int], side: int, mirror: bool = False, size: int = 400
           ) -> np.ndarray:
    """A `side`-pixel square of `image` around `centre` (kept inside it), resized to `size`, mirrored if asked."""
    x = min(max(0, centre[0] - side // 2), image.shape[1] - side)
    y = min(max(0, centre[1] - side // 2), image.shape[0] - side)
    crop = cv2.resize(image[y : y + side, x : x + side], (size, size),
                      interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)
    return crop[:, ::-1] if mirror else crop


def scene() -> np.ndarray:
    """An 800x800 RGB photo of four faces: the astronaut and the cameraman, each twice."""
    from skimage import data

    astronaut = data.astronaut()
    cameraman = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2RGB)
    tiles = [square(astronaut, (223, 170), 420), square(cameraman, (226, 200), 300),
             square(cameraman, (226, 160), 200, mirror=True), square(astronaut, (223, 140), 260, mirror=True)]
    return np.ascontiguousarray(np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/serve-page.png"))
    parser.add_argument("--weights", help="a model name or file (default: the shipped default)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    recognizer = EmotionRecognizer(args.weights, device="cpu")
    with tempfile.TemporaryDirectory(prefix="serve-page-") as folder, \
            live_server(create_app(ServeConfig(weights=args.weights), recognizer)) as url:
        photo = Path(folder) / "four-faces.jpg"
        Image.fromarray(scene()).save(photo, quality=92)
        with photo.open("rb") as f:
            record = httpx.post(f"{url}/v1/predict", files={"files": (photo.name, f)}, timeout=60).json()[0]
        want = [[x / record["width"], y / record["height"], w / record["width"], h / record["height"]]
                for x, y, w, h in (face["box"] for face in record["faces"])]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(url)
                page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('model:')")
                page.set_input_files("#file-input", str(photo))
                page.wait_for_function("document.querySelector('#photo-status').textContent === '1 of 1 read'",
                                       timeout=60_000)
                drawn = page.evaluate(DRAWN_BOXES)
                off = [(got, box) for got, box in zip(drawn, want, strict=True)
                       if max(abs(a - b) for a, b in zip(got, box, strict=True)) > TOLERANCE]
                if len(drawn) != len(want) or off:
                    sys.exit(f"the page's boxes are not the API's: drawn {drawn}, API {want}")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                model = page.locator("#model-info").inner_text()
            finally:
                browser.close()
    faces = ", ".join(f"{face['label']} {face['probabilities'][face['label']]:.2f}" for face in record["faces"])
    print(f"{model}; {len(want)} faces ({faces}), each drawn box within {TOLERANCE:.0%} of the API's; wrote {args.out}")


if __name__ == "__main__":
    main()
