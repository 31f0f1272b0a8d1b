"""The README's video timeline: a clip built here from real FER-2013 faces, read by `ferkit predict`.

Two people in a 640x480 clip at 10 fps, fresh noise in every frame: on the left a face that is
happy for 6 s and then surprised (two FER-2013 PrivateTest faces, one after the other), on the
right a neutral face that drifts, leaves the frame for 1 s at 5 s, comes back, and turns sad
(another face) at 9 s. Each is the first PrivateTest face of its class that the detector finds and
the model reads as that class, so that the figure shows what the tracks do: it is a picture of the
outputs, not a measure of accuracy. The clip lives in a temporary folder only; the figure, the
JSON record and the summary table are kept.

    .venv/bin/python benchmarks/video_timeline_demo.py --data ../shared/data/fer2013 \\
        --weights ferkit-resnet-robust --out docs/video-timeline.png --json docs/results/video/timeline-demo.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ferkit import cli
from ferkit.labels import EMOTIONS
from ferkit.predict import EmotionRecognizer
from ferkit.predict_files import summary_table
from ferkit.tracking import TrackSummary

FPS, SECONDS, SIZE = 10, 12, 170


def pick_face(recognizer: EmotionRecognizer, data: Path, cls: str) -> np.ndarray:
    """The first PrivateTest face of a class that is found, alone on a canvas, and read as its class."""
    for path in sorted((data / "test" / cls).glob("PrivateTest_*.jpg")):
        face = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        canvas = np.full((480, 640), 110, np.uint8)
        canvas[150 : 150 + SIZE, 230 : 230 + SIZE] = cv2.resize(face, (SIZE, SIZE))
        found = recognizer.predict(canvas)
        if len(found) == 1 and found[0].label == cls:
            return face
    sys.exit(f"no {cls} face in {data} is both found and read as {cls}")


def build_clip(data: Path, path: Path, weights: str) -> Path:
    recognizer = EmotionRecognizer(None if weights == "default" else weights, device="cpu")
    left = [pick_face(recognizer, data, "happy"), pick_face(recognizer, data, "surprise")]
    right = [pick_face(recognizer, data, "neutral"), pick_face(recognizer, data, "sad")]
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), FPS, (640, 480))
    for i in range(FPS * SECONDS):
        t = i / FPS
        frame = np.full((480, 640), 100, np.float32) + np.linspace(0, 40, 640)[None]
        frame[120 : 120 + SIZE, 40 : 40 + SIZE] = cv2.resize(left[t >= 6], (SIZE, SIZE))
        if not 5 <= t < 6:
            x = 400 + int(20 * np.sin(t))
            frame[160 : 160 + SIZE, x : x + SIZE] = cv2.resize(right[t >= 9], (SIZE, SIZE))
        noisy = np.clip(frame + rng.normal(0, 8, frame.shape), 0, 255).astype(np.uint8)
        writer.write(cv2.cvtColor(noisy, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the FER-2013 image folder")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--out", type=Path, default=Path("docs/video-timeline.png"))
    parser.add_argument("--json", type=Path, help="keep `ferkit predict --json`'s record here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_clip(args.data, Path(tmp) / "two-people.avi", args.weights)
        command = ["predict", "--json", "--no-progress", "--weights", args.weights, "--timeline", str(args.out),
                   str(clip)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = cli.main(command)
    if status != 0:
        sys.exit(status)
    [record] = json.loads(out.getvalue())
    record["path"] = "two-people.avi (built by benchmarks/video_timeline_demo.py, not kept)"
    tracks = [TrackSummary(t["track"], t["first_seen"], t["last_seen"], t["frames"], t["seconds"], t["shares"],
                           t["dominant"]) for t in record["tracks"]]
    print("\n".join(summary_table(tracks, EMOTIONS)))
    print(f"timeline: {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record["command"] = "ferkit " + " ".join([*command[:-1], "two-people.avi"])
        args.json.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
