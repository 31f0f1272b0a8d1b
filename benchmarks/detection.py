"""Face detection on FER-2013 faces pasted into photos: detection rates, and YuNet's crop enlargement.

PublicTest faces only (the validation split: these figures choose settings); PrivateTest is untouched.

- `rates`: 400 PublicTest faces, one per 640x480 photo, upscaled to a side drawn from 70-200 px and
  pasted at a random place on a smooth noisy background (tests/fer_photos.py). A face is found when
  the FER crop region the detector gives (its box, enlarged by its crop scale) overlaps the pasted
  square with IoU >= 0.5 (PASCAL VOC, the criterion of Haar's earlier 71%); also counted: a
  detection centred on the face whatever its framing, and detections elsewhere. Also: detections on
  20 face-free scikit-image photos, each letterboxed to 640x480. YuNet and Haar (the defaults of
  each) in the same run, each as `find_faces` runs it (with `faces.TILTS`), and YuNet without tilts.
- `tilts`: the same photos, YuNet with each candidate set of turns for photos without an upright face
  (`find_faces`): this chose `faces.TILTS`.
- `sweep`: PublicTest faces pasted the same way at each of several sides; for every face YuNet finds,
  crops at each enlargement of YuNet's box, classified by the default model (train prior); accuracy
  per enlargement over the same faces. The best enlargement is YuNet's `crop_scale`.

    .venv/bin/python benchmarks/detection.py rates --data ../shared/data/fer2013 \\
        --output docs/results/detection/detection.json > docs/results/detection/detection.txt
    .venv/bin/python benchmarks/detection.py tilts --data ../shared/data/fer2013 \\
        --output docs/results/detection/tilts.json > docs/results/detection/tilts.txt
    .venv/bin/python benchmarks/detection.py sweep --data ../shared/data/fer2013 \\
        --output docs/results/detection/enlargement_sweep.json > docs/results/detection/enlargement_sweep.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import fer_faces, iou, photo, read_gray
from ferkit.faces import TILTS, FaceDetector, HaarDetector, YuNetDetector, crop_box, crop_face, find_faces
from ferkit.labels import EMOTIONS

WIDTH, HEIGHT = 640, 480
FACE_FREE = ("coffee", "chelsea", "coins", "horse", "moon", "page", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina", "colorwheel", "brick", "grass", "gravel", "text", "clock",
             "checkerboard", "logo", "microaneurysms", "cell")
"""scikit-image's sample photos that show no human face (astronaut and camera do)."""
ENLARGEMENTS = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
SIDES = (80, 120, 160, 200)


def public_faces(data: Path, count: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """`count` PublicTest faces drawn at random (seeded), with their class ids."""
    files = [(path, EMOTIONS.index(cls)) for cls in EMOTIONS for path in fer_faces(data, cls, "PublicTest")]
    chosen = np.random.default_rng(seed).permutation(len(files))[:count]
    return [(read_gray(files[i][0]), files[i][1]) for i in chosen]


def pasted(face: np.ndarray, side: int, rng: np.random.Generator, seed: int) -> tuple[np.ndarray, tuple[int, ...]]:
    box = (int(rng.integers(0, WIDTH - side)), int(rng.integers(0, HEIGHT - side)), side, side)
    return photo([face], [box], WIDTH, HEIGHT, seed=seed), box


def found(detector: FaceDetector, image: np.ndarray, box: tuple[int, ...],
          tilts: tuple[float, ...] = TILTS) -> tuple[bool, bool, int]:
    """Whether the face at `box` was found (`find_faces`, as predict finds faces) with a crop that frames it
    (IoU >= 0.5), found at all (a face centred inside it), and how many faces lay elsewhere (false positives).
    A face found in the turned photo is framed by the bounds of the turned square it was read from."""
    x, y, w, h = box
    framed, on_face, elsewhere = False, False, 0
    for face in find_faces(image, detector, tilts):
        cx, cy = face.box[0] + face.box[2] / 2, face.box[1] + face.box[3] / 2
        inside = x <= cx <= x + w and y <= cy <= y + h
        framed |= iou(face.box, box) >= 0.5
        on_face |= inside
        elsewhere += not inside
    return framed, on_face, elsewhere


def letterbox(image: np.ndarray) -> np.ndarray:
    """An image scaled to fit 640x480, centred on gray."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
    scale = min(WIDTH / rgb.shape[1], HEIGHT / rgb.shape[0])
    size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    small = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)
    canvas = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    y, x = (HEIGHT - size[1]) // 2, (WIDTH - size[0]) // 2
    canvas[y : y + size[1], x : x + size[0]] = small
    return canvas


def face_photos(data: Path, count: int, seed: int) -> tuple[list[tuple[np.ndarray, tuple[int, ...]]], list[np.ndarray]]:
    """`count` PublicTest faces pasted one per photo at 70-200 px (with their boxes), and the face-free photos."""
    import skimage.data
    from skimage.util import img_as_ubyte

    faces = public_faces(data, count, seed)
    rng = np.random.default_rng(seed + 1)
    photos = [pasted(face, int(rng.integers(70, 201)), rng, seed=i) for i, (face, _) in enumerate(faces)]
    return photos, [letterbox(img_as_ubyte(getattr(skimage.data, name)())) for name in FACE_FREE]


def rates(data: Path, count: int = 400, seed: int = 0) -> dict[str, Any]:
    photos, empty = face_photos(data, count, seed)
    result: dict[str, Any] = {"faces": count, "face_free_photos": len(empty), "tilts": list(TILTS), "detectors": {}}
    runs: dict[str, tuple[FaceDetector, tuple[float, ...]]] = {
        "yunet": (YuNetDetector(), TILTS), "haar": (HaarDetector(), TILTS), "yunet, no tilts": (YuNetDetector(), ())}
    for name, (detector, tilts) in runs.items():
        result["detectors"][name] = outcome(detector, tilts, photos, empty)
    return result


def outcome(detector: FaceDetector, tilts: tuple[float, ...], photos: list[tuple[np.ndarray, tuple[int, ...]]],
            empty: list[np.ndarray]) -> dict[str, Any]:
    """Faces found and framed, and false detections, of one detector with one set of tilts."""
    outcomes = [found(detector, image, box, tilts) for image, box in photos]
    return {"found": sum(o[0] for o in outcomes), "found_any_framing": sum(o[1] for o in outcomes),
            "false_positives_on_face_photos": sum(o[2] for o in outcomes),
            "detections_on_face_free_photos": sum(len(find_faces(image, detector, tilts)) for image in empty),
            "crop_scale": detector.crop_scale, "tilts": list(tilts)}


TILT_CHOICES = ((), (15.0, -15.0), (30.0, -30.0), (45.0, -45.0), (15.0, -15.0, 30.0, -30.0))


def tilts(data: Path, count: int = 400, seed: int = 0) -> dict[str, Any]:
    """`rates`' photos with YuNet and each candidate set of tilts (PublicTest: this chooses `faces.TILTS`)."""
    photos, empty = face_photos(data, count, seed)
    detector = YuNetDetector()
    return {"faces": count, "face_free_photos": len(empty),
            "choices": {" ".join(f"{t:g}" for t in choice) or "none": outcome(detector, choice, photos, empty)
                        for choice in TILT_CHOICES}}


def sweep(data: Path, count: int = 800, seed: int = 0, weights: str | None = None,
          enlargements: tuple[float, ...] = ENLARGEMENTS) -> dict[str, Any]:
    from ferkit.inference import adjusted_logits
    from ferkit.predict import TorchBackend

    backend = TorchBackend(weights, "cpu")
    detector = YuNetDetector()
    faces = public_faces(data, count, seed)
    rng = np.random.default_rng(seed + 2)
    crops: dict[float, list[np.ndarray]] = {e: [] for e in enlargements}
    labels, sides, missed = [], [], 0
    for i, (face, label) in enumerate(faces):
        for side in SIDES:
            image, box = pasted(face, side, rng, seed=i)
            detections = [d for d in detector.detect(image) if iou(d.box, box) > 0.3]
            if not detections:
                missed += 1
                continue
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            for e in enlargements:
                crops[e].append(crop_face(gray, crop_box(detections[0].box, e)))
            labels.append(label)
            sides.append(side)
    truth, side_of = np.array(labels), np.array(sides)
    accuracy: dict[str, Any] = {}
    for e in enlargements:
        predicted = adjusted_logits(backend.logits(np.stack(crops[e])), backend.meta.preprocessing).argmax(1)
        accuracy[str(e)] = {"all": float((predicted == truth).mean()),
                            **{str(s): float((predicted == truth)[side_of == s].mean()) for s in SIDES}}
    best = max(enlargements, key=lambda e: accuracy[str(e)]["all"])
    return {"faces": count, "sides": list(SIDES), "photos": count * len(SIDES), "found": len(labels),
            "missed": missed, "weights": str(backend.path.name), "accuracy": accuracy, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("rates", "sweep", "tilts"))
    parser.add_argument("--data", type=Path, required=True, help="FER-2013 folder layout")
    parser.add_argument("--count", type=int, help="PublicTest faces (default: 400 for rates, 800 for the sweep)")
    parser.add_argument("--weights", help="the model of the sweep (default: the shipped default)")
    parser.add_argument("--enlargements", type=float, nargs="+", default=ENLARGEMENTS,
                        help=f"the sweep's enlargements (default: {' '.join(map(str, ENLARGEMENTS))})")
    parser.add_argument("--output", type=Path, help="write the JSON here")
    args = parser.parse_args()
    if args.what in ("rates", "tilts"):
        result = (rates if args.what == "rates" else tilts)(args.data, args.count or 400)
        for name, r in result["detectors" if args.what == "rates" else "choices"].items():
            print(f"{name} (tilts: {' '.join(f'{t:g}' for t in r['tilts']) or 'none'}): found {r['found']} of "
                  f"{result['faces']} pasted PublicTest faces with a crop that frames them, IoU >= 0.5 "
                  f"({100 * r['found'] / result['faces']:.1f}%); {r['found_any_framing']} "
                  f"({100 * r['found_any_framing'] / result['faces']:.1f}%) with a face centred on them; "
                  f"{r['false_positives_on_face_photos']} faces elsewhere; "
                  f"{r['detections_on_face_free_photos']} faces on {result['face_free_photos']} face-free photos")
    else:
        result = sweep(args.data, args.count or 800, weights=args.weights, enlargements=tuple(args.enlargements))
        print(f"YuNet found {result['found']} of {result['photos']} photos ({result['weights']}, train prior)")
        print("| enlargement | all | " + " | ".join(f"{s} px" for s in result["sides"]) + " |")
        print("|---|---|" + "---|" * len(result["sides"]))
        for e, acc in result["accuracy"].items():
            print(f"| {e} | {100 * acc['all']:.2f} | " + " | ".join(f"{100 * acc[str(s)]:.2f}" for s in result["sides"])
                  + " |")
        print(f"best: {result['best']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
