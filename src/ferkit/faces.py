"""Face detection and FER-2013-style face crops.

Detectors find faces in an upright gray or RGB uint8 image and return boxes in that image's pixels.
Large images are downscaled for detection only; the crop is always taken from the original.

- `YuNetDetector` (the default, "yunet") runs the YuNet CNN on onnxruntime with the model
  file shipped inside ferkit (`detectors/`, Apache-2.0, its LICENSE and provenance beside it), or one
  the user supplies. It also finds five landmarks per face (eyes, nose tip, mouth corners).
- `HaarDetector` ("haar") uses OpenCV's frontal-face Haar cascade, which ships inside the
  opencv-python(-headless) 4.x wheel. OpenCV 5 dropped the cascades, hence the `<5` bound in
  pyproject.toml. It finds fewer FER-2013 faces than YuNet, in more time (see `YuNetDetector`).

The crop matches FER-2013's framing. FER-2013 faces are tight: on 600 PrivateTest faces pasted,
upscaled, onto noise, the Haar box covered a median 0.96 of the crop's side and sat centred within
2% of it; a model scored best on crops about 1.05x the Haar box (0.85x to 1.3x tried). So a crop
is the square of side 1.05 x the detector's box about its centre, read from the original gray
image (edges replicated where it leaves the image) and resized to 48x48 with area averaging.
YuNet's enlargement was measured the same way (`YuNetDetector`).

Tilted heads (YuNet only: Haar gives no landmarks, so its crops and search are as they were). A YuNet crop
is turned about its centre so the eyes are level, by `ROLL_GAIN` times the angle of the eye line (capped at
`MAX_TURN`): YuNet's landmarks follow the face's own tilt only by about a quarter (on PublicTest faces in
photos turned 15-35 degrees, the eye line's angle rose 0.26 degree per degree of turn), so the angle alone
would leave a tilted face three quarters tilted. Where every face of a photo leans the same way
(`SEARCH_TILT`; `SEARCH_TILT_ALONE` for a lone face), the photo is searched again turned by `SEARCH_TURNS` that
way, for the faces of a tilted photo that the upright search missed; where no face is found, turned by `TILTS`.
Chosen on PublicTest faces three to a photo, upright and turned 15-35 degrees (docs/results/alignment/).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .errors import UsageError
from .images import to_bgr, to_gray
from .labels import IMAGE_SIZE

Box = tuple[int, int, int, int]
"""x, y, width, height in pixels of the (upright) original image."""
Landmarks = tuple[tuple[float, float], ...]
"""(x, y) points in pixels of the (upright) original image, in the order of `LANDMARKS`."""
LANDMARKS = ("right_eye", "left_eye", "nose_tip", "right_mouth_corner", "left_mouth_corner")
"""YuNet's five landmarks; right and left are the person's own (their right eye is on the image's left)."""

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_CROP_SCALE = 1.05
DEFAULT_MIN_FACE = 64
DEFAULT_DETECT_MAX_SIDE = 640
TILTS = (30.0, -30.0)
"""Turns (degrees, counter-clockwise) of a photo in which no upright face was found, tried in turn (`find_faces`).
Chosen on PublicTest faces pasted into photos, none of them false detections on the face-free photos
(docs/results/detection/tilts.txt). A photo with faces costs no more; one without costs up to 3 detections."""
ROLL_GAIN = 4.0
"""A crop's turn over the angle of its eye line (YuNet's landmarks), chosen on PublicTest (module docstring)."""
MAX_TURN = 30.0
"""The most a crop is turned, in degrees, to level its eyes."""
SEARCH_TILT = 6.0
"""Degrees: where every face found in a photo (two or more) needs a levelling turn of this or more the same way,
the photo is searched again turned (`SEARCH_TURNS`)."""
SEARCH_TILT_ALONE = MAX_TURN
"""The same for a photo with one face found: one face's landmarks are weak evidence of a tilted photo (the eye
line of 90% of upright PublicTest faces in photos lay within 4.6 degrees, a levelling turn of 18)."""
SEARCH_TURNS = (20.0, 35.0)
"""The turns (degrees, in the direction the faces lean) of that second search."""
DEFAULT_DETECTOR = "yunet"
"""By name: "yunet" (shipped) or "haar"; a YuNet .onnx or Haar cascade .xml file name also works."""
YUNET_MODEL = "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


class DetectorError(UsageError):
    """A face detector that cannot be built (missing cascade or model file)."""


@dataclass(frozen=True)
class Detection:
    """One face as a detector reports it: its own box and score, and its landmarks where it finds them."""

    box: Box
    score: float
    landmarks: Landmarks | None = None


@dataclass(frozen=True)
class Face:
    """A face ready for the model: the square region read (clipped to the image), score, 48x48 crop and the
    detector's landmarks (None where it finds none)."""

    box: Box
    score: float | None
    crop: np.ndarray
    landmarks: Landmarks | None = None
    tilt: float = 0.0
    """Degrees (counter-clockwise) the photo was turned about the square's centre to read `crop`: to level the
    eyes, and by the turn of the photo it was found in (`TILTS`, `SEARCH_TURNS`). `box` is the square unturned,
    or, for a face found in a turned photo, the bounds of the square turned by that photo's turn."""


def shipped_yunet() -> Path:
    """The YuNet model file inside the package."""
    return Path(str(resources.files("ferkit") / "detectors" / YUNET_MODEL))


class FaceDetector(Protocol):
    """Anything that finds faces; `crop_scale` is its box-to-FER-crop enlargement."""

    crop_scale: float

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an upright gray or RGB uint8 image, largest first."""
        ...


def detection_scale(height: int, width: int, detect_max_side: int | None) -> float:
    """The factor (<= 1) that brings the longer side down to `detect_max_side` for detection."""
    longer = max(height, width)
    return 1.0 if not detect_max_side or longer <= detect_max_side else detect_max_side / longer


def _downscale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _to_original(box: np.ndarray, scale: float) -> Box:
    x, y, w, h = (float(v) / scale for v in box)
    return round(x), round(y), round(w), round(h)


def _points_to_original(values: np.ndarray, scale: float) -> Landmarks:
    return tuple((round(float(x) / scale, 1), round(float(y) / scale, 1)) for x, y in np.reshape(values, (-1, 2)))


class HaarDetector:
    """OpenCV's frontal-face Haar cascade from the installed wheel.

    `score` is the cascade's final-stage sum for the face (OpenCV's levelWeights): higher is more
    face-like; it is not a probability, and not comparable with other detectors' scores.
    `min_face` is in original pixels; after downscaling it never drops below the cascade's window.

    The defaults trade a little recall for speed: on 400 FER-2013 faces pasted (70-200 px) into
    640x480 photos, scale_factor 1.2 / min_neighbors 4 found 283 (1 false positive) in about half
    the time of 1.1 / 5, which found 305 (1 false positive); neither fired on 20 face-free
    scikit-image photos. Pass scale_factor=1.1, min_neighbors=5 to favour recall.
    """

    crop_scale = HAAR_CROP_SCALE

    def __init__(
        self,
        cascade: str | os.PathLike[str] = HAAR_CASCADE,
        scale_factor: float = 1.2,
        min_neighbors: int = 4,
        min_face: int = DEFAULT_MIN_FACE,
        detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE,
    ) -> None:
        path = Path(cascade)
        if not path.is_file():
            folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
            if folder is None:
                raise DetectorError(
                    f"OpenCV {cv2.__version__} ships no Haar cascades (OpenCV 5 removed them); "
                    "install opencv-python-headless<5 or use the YuNet detector ('yunet', the default)"
                )
            path = Path(folder) / str(cascade)
        if not path.is_file():
            raise DetectorError(f"{path}: no such Haar cascade file")
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise DetectorError(f"{path}: not a readable Haar cascade")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face = min_face
        self.detect_max_side = detect_max_side
        self.window = max(self.cascade.getOriginalWindowSize())

    def detect(self, image: np.ndarray) -> list[Detection]:
        gray = to_gray(image)
        scale = detection_scale(gray.shape[0], gray.shape[1], self.detect_max_side)
        small = _downscale(gray, scale)
        min_size = max(self.window, round(self.min_face * scale))
        if min(small.shape[:2]) < min_size:
            return []
        boxes, _levels, weights = self.cascade.detectMultiScale3(
            small, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(min_size, min_size), outputRejectLevels=True,
        )
        found = [
            Detection(_to_original(box, scale), float(weight))
            for box, weight in zip(np.reshape(boxes, (-1, 4)), np.ravel(weights), strict=True)
        ]
        return sorted(found, key=lambda d: (-d.box[2] * d.box[3], d.box[0], d.box[1]))


class YuNetDetector:
    """YuNet (libfacedetection's face detector, 2023mar ONNX) run on onnxruntime: the model file shipped
    inside ferkit, or another YuNet ONNX file with the same outputs.

    `score` is YuNet's face confidence in [0, 1]; each detection also carries five landmarks
    (`LANDMARKS`). Its boxes are taller than Haar's (on FER-2013 faces, the longer side is about the
    whole FER crop's), so its crop enlargement was measured as Haar's was: 800 PublicTest faces pasted
    into 640x480 photos at 80, 120, 160 and 200 px; of the enlargements 0.8 to 1.3 of the box's longer
    side, the default model scored best on crops 0.9x (69.15% against 66.90% at the former guess, 1.1x;
    docs/results/detection/enlargement_sweep*.txt; PrivateTest untouched). Detection rates against
    Haar's, same run: docs/results/detection/detection.txt.

    OpenCV's `cv2.FaceDetectorYN` runs the same network and decoding, but its DNN engine took about twice
    onnxruntime's time on a 640x480 photo here, and detection is most of a photo's time. The decoding
    below gives OpenCV's boxes, landmarks and scores (tests/test_faces.py compares them).
    """

    crop_scale = 0.9
    strides = (8, 16, 32)

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        top_k: int = 100,
        min_face: int = DEFAULT_MIN_FACE,
        detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE,
    ) -> None:
        model = shipped_yunet() if model is None else model
        if not Path(model).is_file():
            raise DetectorError(f"{model}: no such YuNet model file")
        self.session = _yunet_session(Path(model))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        self.min_face = min_face
        self.detect_max_side = detect_max_side

    def detect(self, image: np.ndarray) -> list[Detection]:
        scale = detection_scale(image.shape[0], image.shape[1], self.detect_max_side)
        rows = self._raw(_downscale(to_bgr(image), scale))
        found = []
        for row in rows:
            box = _to_original(row[:4], scale)
            if max(box[2], box[3]) >= self.min_face:
                found.append(Detection(box, float(row[-1]), _points_to_original(row[4:14], scale)))
        return sorted(found, key=lambda d: (-d.box[2] * d.box[3], d.box[0], d.box[1]))

    def _raw(self, bgr: np.ndarray) -> np.ndarray:
        """Rows as cv2.FaceDetectorYN gives them: x, y, w, h, five (x, y) landmarks, score."""
        height, width = bgr.shape[:2]
        # The network takes raw 0-255 BGR planes, zero-padded to a multiple of its largest stride.
        padded = np.zeros((1, 3, -(-height // 32) * 32, -(-width // 32) * 32), np.float32)
        padded[0, :, :height, :width] = bgr.transpose(2, 0, 1)
        out = dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: padded}), strict=True))
        rows = np.concatenate([_decode(out, stride, padded.shape[3] // stride, self.score_threshold)
                               for stride in self.strides])
        rows = rows[np.isfinite(rows).all(1)]  # a 1x1 image can give a box of infinite size
        keep = cv2.dnn.NMSBoxes(rows[:, :4].tolist(), rows[:, 14].tolist(), self.score_threshold,
                                self.nms_threshold, top_k=self.top_k)
        return rows[np.asarray(keep, dtype=int).reshape(-1)]


def _decode(out: dict[str, np.ndarray], stride: int, columns: int, score_threshold: float) -> np.ndarray:
    """One stride's grid cells that score at least `score_threshold` (NMS would drop the others): each cell's
    box centre and landmarks are offsets from the cell in cells, its size a log of cells; the score is the
    geometric mean of the class and objectness scores."""
    try:
        cls, obj = out[f"cls_{stride}"].reshape(-1), out[f"obj_{stride}"].reshape(-1)
        box, points = out[f"bbox_{stride}"].reshape(-1, 4), out[f"kps_{stride}"].reshape(-1, 10)
    except KeyError as err:
        raise DetectorError(f"not a YuNet 2023mar model: it has no output {err}") from None
    score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
    cells = np.flatnonzero(score >= score_threshold)
    cell = np.stack(np.divmod(cells, columns)[::-1], 1)  # column, row
    size = np.exp(box[cells, 2:4]) * stride
    centre = (cell + box[cells, :2]) * stride
    landmarks = (points[cells].reshape(-1, 5, 2) + cell[:, None, :]) * stride
    return np.concatenate([centre - size / 2, size, landmarks.reshape(-1, 10), score[cells, None]], 1)


def _yunet_session(model: Path) -> Any:
    """An onnxruntime session for a YuNet file. The 2023mar file declares a fixed 640x640 input, though its
    graph works at any size that is a multiple of 32; the declared sizes are freed in memory, so the
    file itself stays as shipped."""
    import onnxruntime as ort

    freed = _freed_yunet(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Spinning idle threads would steal the cores the emotion model runs on next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(freed, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors derive from Exception only
        raise DetectorError(f"{model}: not a YuNet model onnxruntime can load ({err})") from None


def _freed_yunet(model: Path) -> bytes:
    """The YuNet file's bytes with its input sizes freed; kept in ferkit's cache folder ($FERKIT_CACHE), keyed by
    the file's contents, because the `onnx` package that edits the graph takes most of a second to import (a
    one-photo `ferkit predict` should not pay for it every time)."""
    import hashlib

    blob = Path(model).read_bytes()
    cache = Path(os.environ.get("FERKIT_CACHE") or Path.home() / ".cache" / "ferkit")
    cached = cache / f"yunet-free-{hashlib.sha256(blob).hexdigest()[:16]}.onnx"
    if cached.is_file():
        return cached.read_bytes()
    import onnx

    try:
        graph = onnx.load_from_string(blob)
    except Exception as err:  # onnx raises DecodeError and others, all plain Exceptions
        raise DetectorError(f"{model}: not a YuNet model (not ONNX: {err})") from None
    if len(graph.graph.input) != 1 or len(graph.graph.input[0].type.tensor_type.shape.dim) != 4:
        raise DetectorError(f"{model}: not a YuNet model (it needs one NCHW image input)")
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for output in graph.graph.output:
        output.type.tensor_type.ClearField("shape")
    freed: bytes = graph.SerializeToString()
    with contextlib.suppress(OSError):  # a cache that cannot be written costs the next run time, nothing else
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
        partial.write_bytes(freed)
        partial.replace(cached)
    return freed


def make_detector(
    detector: str | os.PathLike[str] | FaceDetector = DEFAULT_DETECTOR,
    min_face: int = DEFAULT_MIN_FACE,
    detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE,
) -> FaceDetector:
    """'yunet' (the default: the shipped YuNet), 'haar', a YuNet .onnx model or Haar cascade .xml file, or a
    detector object."""
    if not isinstance(detector, (str, os.PathLike)):
        return detector
    name = str(detector)
    if name == "yunet":
        return YuNetDetector(min_face=min_face, detect_max_side=detect_max_side)
    if name == "haar":
        return HaarDetector(min_face=min_face, detect_max_side=detect_max_side)
    if name.lower().endswith(".xml"):
        return HaarDetector(name, min_face=min_face, detect_max_side=detect_max_side)
    if name.lower().endswith(".onnx"):
        return YuNetDetector(name, min_face=min_face, detect_max_side=detect_max_side)
    raise DetectorError(f"unknown detector {name!r}: use 'yunet', 'haar', a YuNet .onnx model or a Haar cascade "
                        ".xml file")


def crop_box(box: Box, crop_scale: float) -> Box:
    """The square FER-framed region for a detector box: side crop_scale x the longer side, same centre."""
    x, y, w, h = box
    side = max(1, round(max(w, h) * crop_scale))
    return round(x + w / 2 - side / 2), round(y + h / 2 - side / 2), side, side


def clip_box(box: Box, height: int, width: int) -> Box:
    """`box` clipped to a height x width image."""
    x, y, w, h = box
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    return x0, y0, x1 - x0, y1 - y0


def resize_to_input(gray: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A gray region -> size x size uint8: area averaging to shrink, bilinear to enlarge.

    Returns the array itself, untouched, when it already has the size.
    """
    height, width = gray.shape[:2]
    if (height, width) == (size, size):
        return gray
    shrinking = height * width > size * size
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def crop_face(image: np.ndarray, square: Box | None = None, size: int = IMAGE_SIZE, turn: float = 0.0) -> np.ndarray:
    """The size x size uint8 model crop of a gray (or RGB) uint8 image: the one way ferkit makes a face crop.

    `square` is the FER-framed region (`crop_box` of a detector's box), read with the image's edges
    replicated where it leaves the image; None takes the whole image, squashed to a square if it is
    not one, which is how data-set images and `--no-detect` inputs are read. Both the data loader
    (for any data-set image that is not already 48x48 gray) and face detection at prediction time
    call this, so a model sees a face framed and resampled the same way in training and in use.
    A gray image that already has the size comes back untouched (the array itself). `turn`: degrees
    (counter-clockwise) the image is turned about the square's centre before the square is read (bilinear, at
    the image's own resolution, then resized as an upright square is).
    """
    gray = to_gray(image)
    if square is None:
        return resize_to_input(gray, size)
    x, y, side, _ = square
    if turn:
        matrix = cv2.getRotationMatrix2D((x + side / 2, y + side / 2), turn, 1.0)
        matrix[:, 2] -= x, y
        region = cv2.warpAffine(gray, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return resize_to_input(region, size)
    height, width = gray.shape[:2]
    region = gray[max(y, 0) : max(min(y + side, height), 0), max(x, 0) : max(min(x + side, width), 0)]
    pad = (max(-y, 0), max(y + side - height, 0), max(-x, 0), max(x + side - width, 0))
    if region.size == 0:
        raise ValueError(f"box {square} lies outside the {width}x{height} image")
    if any(pad):
        region = cv2.copyMakeBorder(region, *pad, borderType=cv2.BORDER_REPLICATE)
    return resize_to_input(region, size)


def find_faces(image: np.ndarray, detector: FaceDetector, tilts: Sequence[float] = TILTS, align: bool = True
               ) -> list[Face]:
    """Detect faces in an upright gray or RGB uint8 image and cut FER-2013-style crops from it.

    Where none is found, look again in the photo turned by each of `tilts` in turn, for heads tilted beyond
    the detector's reach. `align` (landmarks needed: YuNet): each crop is turned to level its eyes, and
    where every face found leans the same way by `SEARCH_TILT` or more (`SEARCH_TILT_ALONE` for a lone face),
    the photo turned by `SEARCH_TURNS` that way is searched too, for the faces the upright search missed (see
    the module docstring). `align=False`: crops upright (unless found in a turned photo), no second search."""
    found = _found_in(image, detector, 0.0)
    leaning = [f.levelling for f in found if f.detection.landmarks is not None]
    least = SEARCH_TILT if len(leaning) > 1 else SEARCH_TILT_ALONE
    if align and leaning and (min(leaning) >= least or max(leaning) <= -least):
        for turn in SEARCH_TURNS:
            found += [f for f in _found_in(image, detector, math.copysign(turn, leaning[0])) if not _seen(f, found)]
    for angle in tilts:
        if found:
            break
        found = _found_in(image, detector, angle)
    gray = to_gray(image)
    return [f.face(gray, align) for f in found]


@dataclass(frozen=True)
class _Found:
    """A detection in the photo turned by `angle` (counter-clockwise, about the centre of a canvas that holds it
    all); `back` maps that canvas's pixels to the photo's."""

    detection: Detection
    angle: float
    back: np.ndarray
    crop_scale: float

    @property
    def levelling(self) -> float:
        """Degrees to turn the face by, beyond `angle`, to level its eyes (0 without landmarks)."""
        points = self.detection.landmarks
        if points is None:
            return 0.0
        (rx, ry), (lx, ly) = points[0], points[1]
        return float(np.clip(ROLL_GAIN * math.degrees(math.atan2(ly - ry, lx - rx)), -MAX_TURN, MAX_TURN))

    @property
    def square(self) -> Box:
        """The FER-framed square in the photo's pixels (unturned), centred where the face is."""
        x, y, side, _ = crop_box(self.detection.box, self.crop_scale)
        (cx, cy), = _mapped(self.back, [(x + side / 2, y + side / 2)])
        return round(cx - side / 2), round(cy - side / 2), side, side

    def face(self, gray: np.ndarray, align: bool) -> Face:
        square = self.square
        turn = self.angle + (self.levelling if align else 0.0)
        points = self.detection.landmarks
        if points is not None and self.angle:
            points = tuple((round(float(px), 1), round(float(py), 1)) for px, py in _mapped(self.back, points))
        return Face(clip_box(self.bounds if self.angle else square, *gray.shape[:2]), self.detection.score,
                    crop_face(gray, square, turn=turn), points, turn)

    @property
    def bounds(self) -> Box:
        """The photo's pixels that hold the square as found in the turned photo (its box since issue 17)."""
        x, y, side, _ = crop_box(self.detection.box, self.crop_scale)
        corners = _mapped(self.back, [(x, y), (x + side, y), (x, y + side), (x + side, y + side)])
        low, high = corners.min(0), corners.max(0)
        return round(low[0]), round(low[1]), round(high[0] - low[0]), round(high[1] - low[1])


def _found_in(image: np.ndarray, detector: FaceDetector, angle: float) -> list[_Found]:
    """The faces found in `image` turned by `angle` degrees on a canvas that holds all of it."""
    if not angle:
        return [_Found(d, 0.0, _IDENTITY, detector.crop_scale) for d in detector.detect(image)]
    height, width = image.shape[:2]
    turn = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(turn[0, 0]), abs(turn[0, 1])
    size = (round(width * cos + height * sin), round(width * sin + height * cos))
    turn[:, 2] += (size[0] - width) / 2, (size[1] - height) / 2
    turned = cv2.warpAffine(image, turn, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    back = cv2.invertAffineTransform(turn)
    return [_Found(d, angle, back, detector.crop_scale) for d in detector.detect(turned)]


_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _seen(new: _Found, found: list[_Found]) -> bool:
    """Whether `new` is a face already in `found`: either's centre within half the other's square."""
    x, y, side, _ = new.square
    for old in found:
        ox, oy, oside, _ = old.square
        distance = math.hypot(x + side / 2 - ox - oside / 2, y + side / 2 - oy - oside / 2)
        if distance <= max(side, oside) / 2:
            return True
    return False


def _mapped(matrix: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """(x, y) points through a 2x3 affine matrix."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def whole_image_face(image: np.ndarray) -> Face:
    """The image itself as one face, for inputs that are already face crops (no detection)."""
    height, width = image.shape[:2]
    return Face((0, 0, width, height), None, crop_face(image))
