"""docs/service.md's `curl` commands, run as written (bash, curl, base64) against a live server on loopback.

The photo is over 96 KB, so that its base64 could not be passed as one argument: the documented JSON
request must send its body through a pipe.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
skimage_data = pytest.importorskip("skimage.data")

from fer_photos import ASTRONAUT_FACE  # noqa: E402
from ferkit.predict import EmotionRecognizer  # noqa: E402
from ferkit.serve import ServeConfig, create_app  # noqa: E402
from serve_live import live_server  # noqa: E402

SERVICE_MD = Path(__file__).resolve().parents[1] / "docs" / "service.md"
ARGUMENT_MAX = 128 * 1024  # Linux's MAX_ARG_STRLEN: the most bytes one argument may hold


def curl_block() -> str:
    """The first ```bash block of docs/service.md that calls curl."""
    blocks = re.findall(r"```bash\n(.*?)```", SERVICE_MD.read_text(), re.S)
    return next(block for block in blocks if "curl" in block)


def json_values(text: str) -> list[Any]:
    """The JSON documents written one after another (curl prints no newline between them)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(text, i)
        values.append(value)
    return values


def test_documented_curl_commands_work_as_written(recognizer: EmotionRecognizer, tmp_path: Path) -> None:
    for tool in ("bash", "curl", "base64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    astronaut = skimage_data.astronaut()
    Image.fromarray(np.kron(astronaut, np.ones((2, 2, 1), np.uint8))).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(np.hstack([astronaut, astronaut[:, ::-1]])).save(tmp_path / "group.png")
    x, y, w, h = ASTRONAUT_FACE
    Image.fromarray(astronaut[y : y + h, x : x + w]).save(tmp_path / "crop.png")
    assert (tmp_path / "photo.jpg").stat().st_size * 4 / 3 > ARGUMENT_MAX  # too long for `-d "$(base64 ...)"`
    block = curl_block()
    assert block.count("curl ") == 4, block
    with live_server(create_app(ServeConfig(), recognizer)) as url:
        script = block.replace("http://127.0.0.1:8000", url)
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "FERKIT_API_KEY": ""})
    assert run.returncode == 0 and not run.stderr, run.stderr
    both, crop, as_json, models = json_values(run.stdout)
    assert [r["path"] for r in both] == ["photo.jpg", "group.png"]
    assert [len(r["faces"]) for r in both] == [1, 2] and not any(r["error"] for r in both), both
    [crop_record] = crop
    assert crop_record["path"] == "crop.png" and len(crop_record["faces"]) == 1
    assert all(len(str(p).split(".")[-1]) <= 3 for p in crop_record["faces"][0]["probabilities"].values())
    [json_record] = as_json
    assert json_record["path"] == "images[0]"
    assert json_record["faces"] == both[0]["faces"]  # the same photo, sent as base64 JSON
    assert sum(model["loaded"] for model in models) == 1
