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
- `scenes`: PublicTest faces pasted three to a 640x480 photo (80-150 px, in a row), each photo upright and
  the same photo turned 15-35 degrees one way or the other about its centre; `EmotionRecognizer().predict`
  (the default model, detector and prior, as `ferkit predict` runs) on both: faces found (a face whose box
  is centred within half the pasted side of the face's centre) and labelled right, upright against tilted.
- `cost`: the median and mean time of `EmotionRecognizer().predict` on `scenes`' upright and tilted photos
  and on as many of `rates`' one-face photos (run it alone: `cpu-alone`).

    .venv/bin/python benchmarks/detection.py rates --data ../shared/data/fer2013 \\
        --output docs/results/detection/detection.json > docs/results/detection/detection.txt
    .venv/bin/python benchmarks/detection.py tilts --data ../shared/data/fer2013 \\
        --output docs/results/detection/tilts.json > docs/results/detection/tilts.txt
    .venv/bin/python benchmarks/detection.py sweep --data ../shared/data/fer2013 \\
        --output docs/results/detection/enlargement_sweep.json > docs/results/detection/enlargement_sweep.txt
    .venv/bin/python benchmarks/detection.py scenes --data ../shared/data/fer2013 \
        --output docs/results/alignment/scenes.json > docs/results/alignment/scenes.txt
    cpu-alone .venv/bin/python benchmarks/detection.py cost --data ../shared/data/fer2013 \
        --output docs/results/alignment/cost.json > docs/results/alignment/cost.txt
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


SCENE_FACES = 3
SCENE_SIDES = (80, 150)
SCENE_TILTS = (15.0, 35.0)
SCENE_CANVAS = 800
"""The side of the square a scene is made on: the diagonal of 640x480."""


def _turn(angle: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 2), angle, 1.0)


def _stays_inside(box: tuple[int, int, int, int], largest: float) -> bool:
    """Whether every corner of `box` stays in the photo when the photo turns by up to `largest` degrees."""
    x, y, w, h = box
    corners = np.array([(x, y), (x + w, y), (x, y + h), (x + w, y + h)], np.float64)
    for angle in (-largest, largest):
        turn = _turn(angle)
        moved = corners @ turn[:, :2].T + turn[:, 2]
        if moved.min() < 0 or (moved[:, 0] > WIDTH).any() or (moved[:, 1] > HEIGHT).any():
            return False
    return True


def scene_photos(data: Path, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` PublicTest faces pasted `SCENE_FACES` to a photo, each photo with its turn (15-35 degrees, either
    way): the upright photo, the turned one, and each face's label, box and centre in both."""
    faces = public_faces(data, count, seed)
    rng = np.random.default_rng(seed + 3)
    columns = WIDTH // SCENE_FACES
    scenes = []
    for first in range(0, len(faces) - SCENE_FACES + 1, SCENE_FACES):
        group = faces[first : first + SCENE_FACES]
        boxes: list[tuple[int, int, int, int]] = []
        for k in range(SCENE_FACES):
            while True:
                side = int(rng.integers(SCENE_SIDES[0], SCENE_SIDES[1] + 1))
                box = (k * columns + int(rng.integers(0, columns - side)), int(rng.integers(0, HEIGHT - side)),
                       side, side)
                if _stays_inside(box, SCENE_TILTS[1]):
                    break
            boxes.append(box)
        angle = float(rng.uniform(*SCENE_TILTS) * rng.choice([-1, 1]))
        # Pasted on a canvas that covers the photo at any turn, so no corner of the turned photo is made up.
        margin = (SCENE_CANVAS - WIDTH) // 2, (SCENE_CANVAS - HEIGHT) // 2
        canvas = photo([face for face, _ in group], [(x + margin[0], y + margin[1], w, h) for x, y, w, h in boxes],
                       SCENE_CANVAS, SCENE_CANVAS, seed=first)
        turned = cv2.warpAffine(canvas, cv2.getRotationMatrix2D((SCENE_CANVAS / 2, SCENE_CANVAS / 2), angle, 1.0),
                                (SCENE_CANVAS, SCENE_CANVAS), flags=cv2.INTER_LINEAR)
        upright, tilted = (np.ascontiguousarray(image[margin[1] : margin[1] + HEIGHT, margin[0] : margin[0] + WIDTH])
                           for image in (canvas, turned))
        turn = _turn(angle)
        centres = np.array([(x + w / 2, y + h / 2) for x, y, w, h in boxes])
        scenes.append({"upright": upright, "tilted": tilted, "angle": angle, "labels": [label for _, label in group],
                       "sides": [b[2] for b in boxes], "centres": {"upright": centres,
                                                                    "tilted": centres @ turn[:, :2].T + turn[:, 2]}})
    return scenes


def matched(boxes: list[tuple[int, int, int, int]], centres: np.ndarray, sides: list[int]) -> tuple[list[int], int]:
    """For each face, the index of the box matched to it (-1: none): the nearest box centre within half the face's
    side of its centre, each box matched once; and how many boxes matched no face."""
    found = np.array([(x + w / 2, y + h / 2) for x, y, w, h in boxes]).reshape(-1, 2)
    pairs = sorted((float(np.hypot(*(found[j] - centres[i]))), i, j)
                   for i in range(len(centres)) for j in range(len(found)))
    match, used = [-1] * len(centres), set()
    for distance, i, j in pairs:
        if distance <= sides[i] / 2 and match[i] < 0 and j not in used:
            match[i] = j
            used.add(j)
    return match, len(found) - len(used)


def scenes(data: Path, count: int = 1800, seed: int = 0) -> dict[str, Any]:
    from ferkit.predict import EmotionRecognizer

    recognizer = EmotionRecognizer()
    photos = scene_photos(data, count, seed)
    result: dict[str, Any] = {"faces": len(photos) * SCENE_FACES, "photos": len(photos),
                              "weights": recognizer.backend.path.name, "prior": recognizer.prior}
    for kind in ("upright", "tilted"):
        labels, found, right, elsewhere = [], 0, 0, 0
        for scene in photos:
            faces = recognizer.predict(scene[kind])
            match, extra = matched([f.box for f in faces], scene["centres"][kind], scene["sides"])
            elsewhere += extra
            for j, truth in zip(match, scene["labels"], strict=True):
                label = recognizer.classes.index(faces[j].label) if j >= 0 else -1
                labels.append(label)
                found += j >= 0
                right += label == truth
        result[kind] = {"found": found, "right": right, "faces_elsewhere": elsewhere, "labels": labels}
    result["truth"] = [label for scene in photos for label in scene["labels"]]
    result["angles"] = [round(scene["angle"], 2) for scene in photos]
    return result


def cost(data: Path, count: int = 300, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """The median ms of one `predict` on `scenes`' photos (each photo's fastest of `repeats`)."""
    import time

    from ferkit.predict import EmotionRecognizer

    recognizer = EmotionRecognizer()
    scenes = scene_photos(data, count, seed)
    photos = {kind: [scene[kind] for scene in scenes] for kind in ("upright", "tilted")}
    photos["one face"] = [image for image, _ in face_photos(data, len(scenes), seed)[0]]
    result: dict[str, Any] = {"photos": len(scenes), "repeats": repeats, "weights": recognizer.backend.path.name}
    for kind, images in photos.items():
        for image in images[:5]:
            recognizer.predict(image)  # warm-up
        times = []
        for image in images:
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                recognizer.predict(image)
                best = min(best, time.perf_counter() - start)
            times.append(1000 * best)
        result[kind] = {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                        "mean_ms": float(np.mean(times))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("rates", "sweep", "tilts", "scenes", "cost"))
    parser.add_argument("--data", type=Path, required=True, help="FER-2013 folder layout")
    parser.add_argument("--count", type=int, help="PublicTest faces (default: 400 for rates, 800 for the sweep, "
                        "1800 for scenes, 300 for cost)")
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
    elif args.what == "scenes":
        result = scenes(args.data, args.count or 1800)
        print(f"{result['faces']} PublicTest faces, {SCENE_FACES} to a 640x480 photo, upright and turned "
              f"{SCENE_TILTS[0]:g}-{SCENE_TILTS[1]:g} degrees ({result['weights']}, {result['prior']} prior)")
        print("| photos | faces found | labelled right | faces elsewhere |")
        print("|---|---|---|---|")
        for kind in ("upright", "tilted"):
            r = result[kind]
            print(f"| {kind} | {r['found']} ({100 * r['found'] / result['faces']:.2f}%) | {r['right']} "
                  f"({100 * r['right'] / result['faces']:.2f}%) | {r['faces_elsewhere']} |")
    elif args.what == "cost":
        result = cost(args.data, args.count or 300)
        print(f"EmotionRecognizer().predict ({result['weights']}) on {result['photos']} photos of {SCENE_FACES} "
              f"faces, upright and tilted, and {result['photos']} photos of one face (`rates`' first), each photo's "
              f"fastest of {result['repeats']}:")
        for kind in ("upright", "tilted", "one face"):
            r = result[kind]
            print(f"{kind}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, mean {r['mean_ms']:.1f} ms")
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
