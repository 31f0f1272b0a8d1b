"""`EmotionRecognizer`: the emotions of the faces in photos, video frames and face crops.

An image (path, PIL image or numpy array; see `ferkit.images` for the conventions) is loaded
upright, its faces are found and cropped the FER-2013 way (`ferkit.faces`), and the crops go
through the model. Two backends run the model:

- PyTorch, for safetensors weights: crops go through `inference.predict_logits`, the very code that
  `ferkit evaluate` scores, views included, so predictions on face crops are exactly evaluate's.
- onnxruntime, for an exported .onnx file: runs no torch code; the graph takes the uint8 crops and
  holds the same normalisation and views (`inference.InferenceModel`, exported).

Probabilities are the softmax of the logits through the weights' calibration (temperature and map,
fitted on PublicTest); `prior="uniform"`, the default, also divides out the training set's class
prior, FER-2013's class mix (see `inference.adjusted_logits`); `prior="train"` keeps it.

What may differ from one call to the next is an argument of the call, as in Hugging Face pipelines:
`predict`, `predict_batch` and `classify` take `prior=` and `top_k=` (and `predict`/`find_faces` a
`detector=`), defaulting to the recognizer's own settings, so one recognizer serves every caller
(the service keeps one for all its requests) and no call changes what another sees.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UsageError
from .faces import (
    DEFAULT_DETECT_MAX_SIDE,
    DEFAULT_DETECTOR,
    DEFAULT_MIN_FACE,
    LANDMARKS,
    Box,
    Face,
    FaceDetector,
    find_faces,
    make_detector,
    whole_image_face,
)
from .images import DEFAULT_MAX_PIXELS, ColorOrder, ImageError, ImageInput, load_image
from .labels import IMAGE_SIZE
from .metadata import WeightsError, WeightsMeta
from .preprocessing import DEFAULT_PRIOR, PRIORS, adjusted_logits, softmax


@dataclass(frozen=True)
class FaceResult:
    """One face: where it is, how likely each emotion is, the most likely one, and the detector's score.

    `box` is (x, y, w, h) in the upright original image's pixels: the square region the model read
    (FER-2013 framing), clipped to the image; the whole image when detection is off. `probabilities`
    holds every class in the model's order, or, with a call's `top_k`, the k most likely, most likely
    first. `score` is the detector's (see `ferkit.faces`), None when detection is off. In video and
    camera streams (`ferkit.tracking`), `track` is the face's track id, `probabilities` and `label`
    are smoothed over time and `raw_probabilities` are this frame's own; both are None for photos.
    `landmarks`: {name: (x, y)} in the same pixels for the detector's landmarks (YuNet: eyes, nose
    tip, mouth corners; see `ferkit.faces.LANDMARKS`), None where it gives none (Haar, no detection);
    `tilt`: degrees (counter-clockwise) the photo was turned about the box's centre before the box was read,
    to level the eyes or where the face was found in a turned photo (`ferkit.faces.find_faces`); neither in
    `to_dict`.
    """

    box: Box
    probabilities: dict[str, float]
    label: str
    score: float | None
    track: int | None = None
    raw_probabilities: dict[str, float] | None = None
    landmarks: dict[str, tuple[float, float]] | None = None
    tilt: float = 0.0

    def to_dict(self, digits: int | None = None) -> dict[str, Any]:
        """JSON-ready: box as [x, y, w, h], probabilities as {emotion: p}; probabilities and score optionally
        rounded to `digits`."""
        def rounded(values: dict[str, float]) -> dict[str, float]:
            return {k: (round(v, digits) if digits is not None else v) for k, v in values.items()}

        score = self.score if self.score is None or digits is None else round(self.score, digits)
        record = {"box": list(self.box), "label": self.label, "probabilities": rounded(self.probabilities),
                  "score": score}
        if self.track is not None:
            record = {"track": self.track, **record}
        if self.raw_probabilities is not None:
            record["raw_probabilities"] = rounded(self.raw_probabilities)
        return record


class FaceResults(list[FaceResult]):
    """The faces of one image (a list), with `to_pandas()`: one row per face in the columns of `ferkit.records`.

    `error`: why the image could not be read (`predict_batch(errors="record")`), its faces then empty; else None.
    """

    def __init__(self, faces: Iterable[FaceResult] = (), classes: Sequence[str] = (), path: str | None = None,
                 error: str | None = None) -> None:
        super().__init__(faces)
        self.classes, self.path, self.error = list(classes), path, error

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per face (one row with empty face columns when there is none, with the
        error where the image could not be read)."""
        from .records import error_row, face_rows, path_identity, rows_frame

        identity = path_identity(self.path)
        rows = [error_row(identity, self.error)] if self.error is not None else face_rows(identity, self)
        return rows_frame(rows, self.classes)


class Backend(Protocol):
    """What runs the model: uint8 crops (N, 48, 48) -> float32 logits (N, classes)."""

    name: str
    meta: WeightsMeta
    path: Path

    def logits(self, crops: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """Safetensors weights on PyTorch, through `inference.predict_logits` with the weights' preprocessing."""

    name = "torch"

    def __init__(self, weights: str | os.PathLike[str] | None, device: str = "auto", batch_size: int = 512) -> None:
        from .devices import pick_device
        from .weights import load_model, resolve_weights

        self.path = resolve_weights(weights)
        self.device = pick_device(device)
        self.model, self.meta = load_model(self.path, self.device)
        self.batch_size = batch_size

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """Raw logits; runs on the intra-op threads the process has (`torch.set_num_threads`, OMP_NUM_THREADS)."""
        from .inference import predict_logits

        # The thread count is left alone, here and at start-up. It is process-wide: ferkit once set it to
        # 1 around batches of up to 16 crops (on a busy machine OpenMP's barriers cost the few faces of a
        # photo up to 100 ms), which also changed it under every other thread's torch calls, the
        # caller's included. One count set at start-up cannot suit both the few faces of a photo and
        # `ferkit predict`'s batches of hundreds, so the process keeps torch's default (one thread a
        # core, what `ferkit evaluate` runs on), and a program or deployment that wants otherwise sets it
        # once itself (OMP_NUM_THREADS=1, or torch.set_num_threads).
        return predict_logits(self.model, crops, self.device, self.batch_size, self.meta.preprocessing).numpy()


class OnnxBackend:
    """An exported .onnx model on onnxruntime; no torch code runs."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", batch_size: int = 512) -> None:
        from .metadata import EXPORT_KEY, METADATA_KEY, meta_from_json, parse_json_object

        try:
            import onnxruntime as ort
        except ImportError:
            raise WeightsError(f"{path}: ONNX models need onnxruntime (a ferkit dependency)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{path}: no such ONNX file")
        available = ort.get_available_providers()
        wanted = _onnx_providers(device, available)
        options = ort.SessionOptions()
        # Idle threads that spin steal the cores face detection runs on (a 640x480 photo took 24
        # instead of 15 ms on 2 cores); throughput on batches is the same without spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise WeightsError(f"{path}: not an ONNX model onnxruntime can load ({err})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = meta_from_json(props.get(METADATA_KEY), path)
        self.export_info = parse_json_object(props.get(EXPORT_KEY))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        size = self.meta.preprocessing.image_size
        if len(inputs) != 1 or list(inputs[0].shape)[1:] != [1, size, size] or inputs[0].type != "tensor(uint8)":
            raise WeightsError(f"{path}: expects input {[(i.type, i.shape) for i in inputs]}, not one uint8 "
                               f"(N, 1, {size}, {size}); models exported before ferkit 0.2 took floats: export again")
        if list(outputs[0].shape)[1:] != [len(self.meta.classes)]:
            raise WeightsError(f"{path}: outputs {outputs[0].shape} do not fit {len(self.meta.classes)} classes")
        # The prior the graph's logits are under (files exported before it was recorded: the training prior).
        prior = self.meta.preprocessing.class_prior
        uniform = self.export_info.get("prior") == "uniform" and prior is not None
        self.log_prior = np.log(np.asarray(prior, dtype=np.float32)) if uniform else None
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.batch_size = batch_size

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """Calibrated logits under the training prior, as every backend gives them (`results` applies the call's
        prior): a graph exported under the uniform prior (`ferkit export --prior uniform`, the default) has the
        log class prior added back."""
        logits = self.graph_logits(crops)
        return logits if self.log_prior is None else logits + self.log_prior

    def graph_logits(self, crops: np.ndarray) -> np.ndarray:
        """The graph's own output; it takes the uint8 crops as they are: normalisation and views are inside it."""
        outputs = [
            self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch[:, None])})[0]
            for batch in (crops[i : i + self.batch_size] for i in range(0, len(crops), self.batch_size))
        ]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.meta.classes)), np.float32)


def _onnx_providers(device: str, available: list[str]) -> list[str]:
    """onnxruntime's execution providers for a ferkit device name; DeviceError naming what it runs on here."""
    from .devices import DeviceError

    has = ", ".join(["cpu", *(["cuda"] if "CUDAExecutionProvider" in available else [])])
    kind, _, index = device.partition(":")
    wanted = {"auto": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider"]}.get(kind)
    if wanted is None or (index and not (kind == "cuda" and index.isdigit())):
        raise DeviceError(f"device {device!r} is not a device onnxruntime runs on: choose auto, cpu, cuda or "
                          f"cuda:N; onnxruntime here runs on: {has}")
    if kind == "cuda" and "CUDAExecutionProvider" not in available:
        raise DeviceError(f"device {device!r} is not available to onnxruntime here (no CUDAExecutionProvider: "
                          f"install onnxruntime-gpu); onnxruntime here runs on: {has}")
    return [p for p in wanted if p in available]


def open_backend(weights: str | os.PathLike[str] | None, device: str = "auto", batch_size: int = 512) -> Backend:
    """ONNX for a .onnx path, else PyTorch on a safetensors file, run folder or shipped model name.

    A shipped model named (or the default, `weights=None`) on the CPU runs its shipped ONNX twin where it has
    one: the same model, and one face's forward pass takes about 1.7 ms on onnxruntime against 4.5 ms on
    PyTorch (2-core Xeon, this repository's measurement; docs/results/peers/). A path to its safetensors file
    always runs PyTorch.
    """
    if weights is not None and str(weights).lower().endswith(".onnx"):
        return OnnxBackend(weights, device, batch_size)
    twin = _cpu_twin(weights, device)
    if twin is not None:
        return OnnxBackend(twin, "cpu", batch_size)
    if weights is not None and Path(weights).suffix.lower() in (".pt", ".pth", ".ts", ".ckpt", ".torchscript"):
        raise WeightsError(f"{weights}: ferkit loads only safetensors weights or exported .onnx models; pickle-based "
                           "files (TorchScript, torch.save checkpoints) are never loaded")
    return TorchBackend(weights, device, batch_size)


def _torch_device(name: str) -> str:
    from .devices import pick_device

    return pick_device(name).type


def surely_cpu_only() -> bool:
    """Whether this machine surely has no GPU that torch could run on, told without importing torch (which takes
    seconds), so that `device="auto"` on a CPU machine runs the ONNX twin at once.

    Only where it can be told for certain: on Linux, no NVIDIA driver (/proc/driver/nvidia, /dev/nvidiactl), no
    ROCm (/dev/kfd) and no WSL GPU (/dev/dxg); elsewhere (macOS's MPS, Windows) torch is asked.
    """
    import sys

    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def _cpu_twin(weights: str | os.PathLike[str] | None, device: str) -> Path | None:
    from .metadata import default_model, shipped_models, shipped_onnx_twin

    name = default_model() if weights is None or str(weights) == "default" else str(weights)
    if name not in shipped_models() or Path(name).exists():
        return None
    twin = shipped_onnx_twin(name)
    if twin is None:
        return None
    on_cpu = device == "cpu" or (device == "auto" and surely_cpu_only()) or _torch_device(device) == "cpu"
    return twin if on_cpu else None


class EmotionRecognizer:
    """Reads the emotion of every face in an image.

    >>> recognizer = EmotionRecognizer()              # the shipped default model, best device
    >>> for face in recognizer.predict("photo.jpg"):  # doctest: +SKIP
    ...     print(face.box, face.label, face.probabilities[face.label])
    >>> recognizer.predict("photo.jpg", prior="train", top_k=3)  # doctest: +SKIP

    `weights`: None (the shipped default, see `weights.choose_default`), a shipped model's name, a
    safetensors file, a run folder, or an exported .onnx file (runs on onnxruntime). `detect=False`
    treats each image as one face crop, like FER-2013's. `detector`: "yunet" (the default, shipped),
    "haar", a YuNet .onnx model, a Haar cascade .xml, or an object with `detect()` and `crop_scale`
    (see `ferkit.faces`). `min_face`: smallest face side in pixels;
    `detect_max_side`: larger images are downscaled to this for detection (crops come from the original).
    `max_pixels`: image files over this many pixels are refused (decompression bombs). `prior`: the
    default of every call's `prior`: "uniform" (FER-2013's class mix divided out, for faces whose
    emotions are not mixed like FER-2013's; it can change the label) or "train" (probabilities under
    FER-2013's class mix, as trained); None: "uniform" where the weights carry their training class
    prior, else "train".

    Call-time options (`predict`, `predict_batch`, `classify`): `prior` (None: the recognizer's),
    `top_k` (None: every class's probability in class order; k: the k most likely, most likely first)
    and, for `predict`, `predict_batch` and `find_faces`, `detector` (a face detector object of the
    caller's, used for that call instead of the recognizer's own). They change nothing in the
    recognizer: concurrent calls with different options each get their own.

    Threads: one recognizer may be shared by any number of threads and gives each the results it
    gives alone. Face detection with the recognizer's own detector is serialised by a lock of the
    recognizer's (OpenCV's detectors keep state between calls and return wrong boxes when two threads
    share one); the model call is not (PyTorch in eval mode and onnxruntime's `InferenceSession.run`
    are both safe to call at once). For detection in parallel, pass each thread's own detector
    (`ferkit.faces.make_detector`) as `detector=`: a detector passed in is not locked.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        detect: bool = True,
        detector: str | os.PathLike[str] | FaceDetector = DEFAULT_DETECTOR,
        min_face: int = DEFAULT_MIN_FACE,
        detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 512,
        prior: str | None = None,
    ) -> None:
        if prior is not None and prior not in PRIORS:
            raise UsageError(f"prior {prior!r}: choose one of {', '.join(PRIORS)}")
        self.backend = open_backend(weights, device, batch_size)
        self.meta = self.backend.meta
        self.classes = list(self.meta.classes)
        self.detect = detect
        self.detector = make_detector(detector, min_face, detect_max_side) if detect else None
        self._detect_lock = threading.Lock()
        self.max_pixels = max_pixels
        has_prior = self.meta.preprocessing.class_prior is not None
        self.prior = self.resolve_prior(prior) if prior is not None else DEFAULT_PRIOR if has_prior else "train"

    def __repr__(self) -> str:
        return (f"EmotionRecognizer(weights={str(self.backend.path)!r}, backend={self.backend.name!r}, "
                f"detect={self.detect})")

    def resolve_prior(self, prior: str | None = None) -> str:
        """The prior a call uses: `prior`, or the recognizer's own for None.

        ValueError for a name that is not a prior; WeightsError (a ValueError) for "uniform" when the
        weights carry no training class prior to divide out.
        """
        if prior is None:
            return self.prior
        if prior not in PRIORS:
            raise ValueError(f"prior {prior!r}: choose one of {', '.join(PRIORS)}")
        if prior == "uniform" and self.meta.preprocessing.class_prior is None:
            raise WeightsError(f"prior 'uniform': {self.backend.path.name} carries no training class prior to "
                               "divide out; choose prior 'train'")
        return prior

    def check_top_k(self, top_k: int | None) -> int | None:
        """`top_k` if it is None or a class count of this model (1..classes); ValueError otherwise."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= len(self.classes)):
            raise ValueError(f"top_k {top_k!r}: choose a whole number from 1 to {len(self.classes)}, or None")
        return top_k

    def load(self, image: ImageInput, color_order: ColorOrder = "rgb") -> np.ndarray:
        """The upright gray or RGB uint8 array of an input (see `ferkit.images.load_image`)."""
        return load_image(image, color_order, self.max_pixels)

    def find_faces(self, image: np.ndarray, *, detector: FaceDetector | None = None) -> list[Face]:
        """Faces (box, score, 48x48 crop) in a loaded image; the whole image when detection is off.

        `detector`: the caller's own detector for this call (not locked: one thread's at a time),
        used even on a recognizer made with `detect=False`; None: the recognizer's, under its lock.
        """
        if detector is not None:
            return find_faces(image, detector)
        if self.detector is None:
            return [whole_image_face(image)]
        with self._detect_lock:
            return find_faces(image, self.detector)

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """float32 logits (N, classes) for uint8 face crops (N, 48, 48)."""
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 3 or crops.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise UsageError(f"expected uint8 crops of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {crops.dtype} "
                             f"{crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.asarray(self.backend.logits(crops), dtype=np.float32)

    def classify(self, faces: Sequence[Face], *, prior: str | None = None, top_k: int | None = None
                 ) -> list[FaceResult]:
        """Run the model on found faces, all in one batch; `prior` and `top_k` as in the class docstring."""
        prior, top_k = self.resolve_prior(prior), self.check_top_k(top_k)  # refused before the model runs
        if not faces:
            return []
        return self.results(faces, self.logits(np.stack([face.crop for face in faces])), prior=prior, top_k=top_k)

    def results(self, faces: Sequence[Face], logits: np.ndarray, *, prior: str | None = None,
                top_k: int | None = None) -> list[FaceResult]:
        """The results of `faces` from their raw logits (one row a face, as `logits` gives them).

        `classify` is `results(faces, logits(crops))`; apart, one model call can serve callers with
        different options (the service runs the faces of concurrent requests through one).
        """
        prior, top_k = self.resolve_prior(prior), self.check_top_k(top_k)
        if not faces:
            return []
        adjusted = adjusted_logits(logits, self.meta.preprocessing, prior)
        probabilities = softmax(adjusted)
        # The label is the argmax of the calibrated logits, exactly as `ferkit evaluate` counts it (the
        # calibration map's biases and the uniform prior can change it); top_k orders by them too, so
        # the first of the k is the label.
        order = [range(len(self.classes)) if top_k is None else np.argsort(-row, kind="stable")[:top_k]
                 for row in adjusted]
        return [
            FaceResult(face.box, {self.classes[int(i)]: float(p[i]) for i in keys}, self.classes[int(np.argmax(z))],
                       face.score,
                       landmarks=dict(zip(LANDMARKS, face.landmarks, strict=True)) if face.landmarks else None,
                       tilt=face.tilt)
            for face, p, z, keys in zip(faces, probabilities, adjusted, order, strict=True)
        ]

    def predict(self, image: ImageInput, *, color_order: ColorOrder = "rgb", prior: str | None = None,
                top_k: int | None = None, detector: FaceDetector | None = None) -> FaceResults:
        """One result per face found in `image` (a path, PIL image or numpy array), largest face first.

        No face is not an error: the list is empty. Unreadable input raises `ferkit.images.ImageError`.
        The list's `to_pandas()` gives its faces as table rows (`ferkit.records`).
        `color_order="bgr"` for 3- or 4-channel numpy arrays from OpenCV. `prior`, `top_k`, `detector`:
        this call's options (see the class docstring).
        """
        faces = self.classify(self.find_faces(self.load(image, color_order), detector=detector), prior=prior,
                              top_k=top_k)
        return FaceResults(faces, self.classes, _path_of(image))

    def predict_batch(
        self, images: Iterable[ImageInput], *, color_order: ColorOrder = "rgb", prior: str | None = None,
        top_k: int | None = None, detector: FaceDetector | None = None, errors: str = "record",
    ) -> list[FaceResults]:
        """`predict` for many images, with one batched model call for all their faces; one result per image, in order.

        `errors="record"` (the default): an image that cannot be read (not an image, truncated, over
        `max_pixels`, a missing file: `ImageError` or `OSError`) gives an empty `FaceResults` whose
        `error` says why, and the other images' faces are still returned. It is the default because a batch
        is usually a folder of other people's files, where one bad file is to be expected and should not cost
        the good ones their results; `ferkit predict` and `ferkit serve` record errors the same way. Check
        `.error` (an image without faces has none). `errors="raise"`: the first unreadable image raises, as
        `predict` does, and nothing is returned.
        """
        if errors not in ("record", "raise"):
            raise ValueError(f"errors {errors!r}: choose 'record' or 'raise'")
        prior, top_k = self.resolve_prior(prior), self.check_top_k(top_k)  # refused before any image is read
        images = list(images)
        per_image: list[list[Face]] = []
        failures: dict[int, str] = {}
        for i, image in enumerate(images):
            try:
                per_image.append(self.find_faces(self.load(image, color_order), detector=detector))
            except (ImageError, OSError) as err:
                if errors == "raise":
                    raise
                per_image.append([])
                failures[i] = _error_text(image, err)
        results = iter(self.classify([face for faces in per_image for face in faces], prior=prior, top_k=top_k))
        return [FaceResults([next(results) for _ in faces], self.classes, _path_of(image), failures.get(i))
                for i, (faces, image) in enumerate(zip(per_image, images, strict=True))]


def _path_of(image: ImageInput) -> str | None:
    return str(image) if isinstance(image, (str, os.PathLike)) else None


def _error_text(image: ImageInput, err: BaseException) -> str:
    """An unreadable image's error as one line naming it (ImageError's messages name the file already)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err) or type(err).__name__
    path = _path_of(image)
    return text if path is None or text.startswith(path) else f"{path}: {text}"
