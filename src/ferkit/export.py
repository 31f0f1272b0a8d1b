"""Export a weights file to ONNX or TorchScript, metadata inside, and check it against PyTorch.

An exported model is `inference.InferenceModel` as a graph: uint8 face crops (N, 1, 48, 48) in,
(N, classes) float32 calibrated logits out, the batch size free. Normalisation, the test-time views
(the weights' own, or `views=`), the calibration (temperature, map, confidence step) and the prior are
inside the graph, so it computes what `inference.adjusted_logits` makes of `inference.predict_logits`
under `prior` (default "uniform", `ferkit predict`'s default: the log class prior subtracted; "train":
as `ferkit evaluate` scores), and a program using it needs only the crop and a softmax to get the
labels and probabilities `ferkit predict` gives. The metadata inside says so: its temperature is 1 and
it has no map, as they are already applied, and the export record's `prior` names the graph's prior
(files written before it was recorded hold the training prior).

ONNX files carry the weights' metadata as JSON in their metadata_props under `ferkit`, and what the
export did under `ferkit_export`; TorchScript files carry the same as extra files `ferkit.json` and
`ferkit_export.json`. torch 2.13's default ONNX exporter (torch.export based) needs onnxscript.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import UsageError
from .inference import (
    DEFAULT_PRIOR,
    PRIORS,
    VIEW_COUNTS,
    InferenceModel,
    adjusted_logits,
    predict_logits,
    to_tensor,
)
from .labels import IMAGE_SIZE
from .outputs import OutputPathError, atomic_write, check_output_file
from .weights import (
    EXPORT_KEY,
    METADATA_KEY,
    WeightsMeta,
    load_model,
    meta_from_json,
    parse_json_object,
    resolve_weights,
)

EXPORT_FORMATS = ("onnx", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4


class ExportError(UsageError):
    """An export that cannot be written where asked, or that this install cannot make."""


def format_for(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """`fmt` if given, else the format the output file's suffix names (.onnx, .pt / .ts / .torchscript)."""
    if fmt:
        if fmt not in EXPORT_FORMATS:
            raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".ts", ".torchscript"):
        return "torchscript"
    raise UsageError(f"{path}: cannot tell the format from the suffix; pass --format onnx or torchscript")


class _WithPrior(nn.Module):
    """Calibrated logits minus the log training class prior: the uniform prior, in the graph."""

    log_prior: torch.Tensor

    def __init__(self, model: nn.Module, class_prior: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("log_prior", torch.log(torch.tensor(class_prior, dtype=torch.float32)), persistent=False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.model(crops) - self.log_prior


def export_model(
    weights: str | os.PathLike[str] | None, output: str | os.PathLike[str], fmt: str | None = None,
    views: int | None = None, opset: int | None = None, prior: str | None = None,
) -> Path:
    """Write `weights` (a file, run folder or shipped name) as ONNX or TorchScript to `output`.

    `views`: test-time views built into the graph (default: the weights' own); the metadata
    inside the exported file says how many. `prior`: "uniform" (the graph subtracts the log training
    class prior) or "train" (probabilities under FER-2013's class mix, as trained); None, the default:
    `ferkit predict`'s for these weights ("uniform" where they carry a class prior, else "train"), so
    the graph's argmax is predict's label. The export record holds it.
    """
    fmt = format_for(output, fmt)
    if views is not None and views not in VIEW_COUNTS:
        raise UsageError(f"views {views}: choose one of {', '.join(map(str, VIEW_COUNTS))}")
    if prior is not None and prior not in PRIORS:
        raise UsageError(f"prior {prior!r}: choose one of {', '.join(PRIORS)}")
    out = Path(output)
    check_writable(out)  # before the export, which takes seconds to minutes, not after it
    source = resolve_weights(weights)
    model, meta = load_model(source, "cpu")
    pre = meta.preprocessing.with_views(views)
    prior = prior or (DEFAULT_PRIOR if pre.class_prior is not None else "train")
    if prior == "uniform" and pre.class_prior is None:
        raise UsageError(f"{source.name} carries no training class prior to divide out: export with --prior train")
    wrapped: nn.Module = InferenceModel(model, pre, channels_last=False, calibrate=True).eval()
    if prior == "uniform":
        assert pre.class_prior is not None
        wrapped = _WithPrior(wrapped, pre.class_prior).eval()
    # The graph applies the calibration, so the metadata inside the export must not apply it again.
    meta = dataclasses.replace(meta, preprocessing=pre.without_calibration())
    info = {"format": fmt, "views": meta.views, "source": source.name, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "calibrated": True, "prior": prior, "ferkit_version": __version__}
    with atomic_write(out) as tmp:  # which checks `out` again before its rename: the export took a while
        if fmt == "onnx":
            _write_onnx(wrapped, meta, info, tmp, opset)
        else:
            _write_torchscript(wrapped, meta, info, tmp)
    return out


def check_writable(out: Path) -> None:
    """ExportError naming `out` unless a file can be written there: it must be a regular file or nothing
    (`ferkit.outputs.check_output_file`); its folder is made if missing, and a probe file created and removed
    (permission bits alone do not tell: root, read-only mounts, ACLs)."""
    try:
        check_output_file(out)
    except OutputPathError as err:
        raise ExportError(str(err)) from None
    probe = out.with_name(f".{out.name}.probe{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.open("xb").close()
        probe.unlink()
    except FileExistsError:  # mkdir(exist_ok=True) over something that is not a folder
        raise ExportError(f"{out}: cannot write the export there (Not a directory)") from None
    except OSError as err:
        raise ExportError(f"{out}: cannot write the export there ({err.strerror or err})") from None


def synthetic_crops(count: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """`count` seeded uint8 crops (count, size, size) for a parity check where no face images are at hand.

    The check compares two implementations of the same function, so faces are not needed, only inputs
    that exercise it: every other crop is uniform noise (every pixel value, the extremes included), the
    rest smooth gradients in random directions and ranges with mild noise, closer to a face's statistics.
    """
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    angle = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min(axis=(1, 2), keepdims=True)) / np.ptp(ramp, axis=(1, 2), keepdims=True)
    low, high = rng.uniform(0, 110, (count, 1, 1)), rng.uniform(145, 255, (count, 1, 1))
    smooth = np.clip(low + (high - low) * ramp + rng.normal(0, 8, (count, size, size)), 0, 255).astype(np.uint8)
    return np.where((np.arange(count) % 2 == 0)[:, None, None], noise, smooth)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and its warnings about optional packages (torchvision)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            yield
    finally:
        logger.setLevel(level)


def _write_onnx(model: nn.Module, meta: WeightsMeta, info: dict[str, Any], path: Path, opset: int | None) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it; fail here with a clear message)
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxscript ({err}); pip install 'ferkit[export]'") from None
    example = _example_input(meta)
    with _quiet_exporter():
        program = torch.onnx.export(
            model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    for key, value in ((METADATA_KEY, meta.to_json()), (EXPORT_KEY, json.dumps(info))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    size = meta.preprocessing.image_size
    how = ("the uniform prior applied (the log training class prior subtracted), as ferkit predict reports them"
           if info["prior"] == "uniform" else "under the training class prior; softmax(logits - log(class_prior)) "
           "for the uniform prior ferkit predict reports")
    proto.doc_string = (f"ferkit {meta.arch}: uint8 face crops (N, 1, {size}, {size}) -> (N, {len(meta.classes)}) "
                        f"calibrated logits over {', '.join(meta.classes)}; {meta.views} view(s) averaged; "
                        f"probabilities = softmax(logits), {how}")
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _example_input(meta: WeightsMeta) -> torch.Tensor:
    size = meta.preprocessing.image_size
    return torch.zeros(2, 1, size, size, dtype=torch.uint8)


def _write_torchscript(model: nn.Module, meta: WeightsMeta, info: dict[str, Any], path: Path) -> None:
    example = _example_input(meta)
    # torch.jit is deprecated in torch 2.13 but still the format C++ (libtorch) deployments load.
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(model, (example,))
        torch.jit.save(traced, str(path), _extra_files={"ferkit.json": meta.to_json(),
                                                        "ferkit_export.json": json.dumps(info)})


def read_export_info(path: str | os.PathLike[str]) -> tuple[WeightsMeta, dict[str, Any]]:
    """The weights' metadata and the export record inside an exported ONNX or TorchScript file."""
    if format_for(path) == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        extra = {"ferkit.json": "", "ferkit_export.json": ""}
        with _quiet_exporter():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        props = {METADATA_KEY: extra["ferkit.json"], EXPORT_KEY: extra["ferkit_export.json"]}
    return meta_from_json(props.get(METADATA_KEY), path), parse_json_object(props.get(EXPORT_KEY))


def exported_logits(path: str | os.PathLike[str], images: np.ndarray, batch_size: int = 256, graph: bool = False
                    ) -> np.ndarray:
    """Run an exported model on uint8 crops (N, 48, 48): ONNX through ferkit's onnxruntime backend, TorchScript on
    torch.jit (which ferkit loads only here, for files it has just written). The calibrated logits under the
    training prior, as the backend gives them, or with `graph` the graph's own output (under its prior)."""
    if format_for(path) == "onnx":
        from .predict import OnnxBackend

        backend = OnnxBackend(path, "cpu", batch_size)
        return backend.graph_logits(images) if graph else backend.logits(images)
    with _quiet_exporter():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        outputs = [module(to_tensor(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    logits = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    meta, info = read_export_info(path)
    if graph or graph_prior(info) == "train" or meta.preprocessing.class_prior is None:
        return logits
    return logits + np.log(np.asarray(meta.preprocessing.class_prior, dtype=np.float32))


def graph_prior(info: dict[str, Any]) -> str:
    """The prior an exported graph's logits are under, from its export record (older files: "train")."""
    prior = info.get("prior", "train")
    return prior if prior in PRIORS else "train"


def check_parity(
    weights: str | os.PathLike[str] | None, exported: str | os.PathLike[str], images: np.ndarray
) -> float:
    """Largest absolute difference between the logits ferkit reports (under the graph's prior) through the exported
    model's graph and through PyTorch, on uint8 crops."""
    model, source = load_model(resolve_weights(weights), "cpu")
    meta, info = read_export_info(exported)
    prior = graph_prior(info)
    reference = adjusted_logits(predict_logits(model, images, "cpu", preprocessing=meta.preprocessing).numpy(),
                                source.preprocessing.with_views(meta.views), prior)
    return float(np.abs(exported_logits(exported, images, graph=True) - reference).max())
