"""Export a weights file to ONNX or TorchScript, metadata inside, and check it against PyTorch.

An exported model maps a float32 (N, 1, 48, 48) batch normalised as `augment.preprocess` makes it
to (N, classes) logits, the batch size free. The weights' test-time augmentation (their `tta`
metadata, or `tta=`) is built into the graph, so the exported model computes what
`evaluate.predict_logits` does and `ferkit evaluate` scores.

ONNX files carry the weights' metadata as JSON in their metadata_props under `ferkit`, and what the
export did under `ferkit_export`; TorchScript files carry the same as extra files `ferkit.json` and
`ferkit_export.json`. torch 2.13's default ONNX exporter (torch.export based) needs onnxscript.
"""

from __future__ import annotations

import contextlib
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
from .augment import preprocess, preprocess_numpy
from .evaluate import TTA_MODES, predict_logits, tta_views
from .weights import METADATA_KEY, WeightsError, WeightsMeta, load_model, resolve_weights

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_KEY = "ferkit_export"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that failed, or whose outputs do not match PyTorch's."""


class InferenceModel(nn.Module):
    """A model with its test-time augmentation: `predict_logits`'s computation after preprocessing."""

    def __init__(self, model: nn.Module, tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
        self.model = model
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(view).float() for view in tta_views(x, self.tta)]).mean(0)


def format_for(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """`fmt` if given, else the format the output file's suffix names (.onnx, .pt / .ts / .torchscript)."""
    if fmt:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".ts", ".torchscript"):
        return "torchscript"
    raise ValueError(f"{path}: cannot tell the format from the suffix; pass --format onnx or torchscript")


def export_model(
    weights: str | os.PathLike[str] | None, out: str | os.PathLike[str], fmt: str | None = None,
    tta: str = "auto", opset: int | None = None,
) -> Path:
    """Write `weights` (a file, run folder or shipped name) as ONNX or TorchScript to `out`."""
    fmt = format_for(out, fmt)
    source = resolve_weights(weights)
    model, meta = load_model(source, "cpu")
    chosen_tta = meta.tta if tta == "auto" else tta
    wrapped = InferenceModel(model, chosen_tta).eval()
    info = {"format": fmt, "tta": chosen_tta, "source": source.name, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "ferkit_version": __version__}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        if fmt == "onnx":
            _write_onnx(wrapped, meta, info, tmp, opset)
        else:
            _write_torchscript(wrapped, meta, info, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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
    example = torch.zeros(2, 1, meta.image_size, meta.image_size)
    with _quiet_exporter():
        program = torch.onnx.export(
            model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    for key, value in ((METADATA_KEY, json.dumps(meta.__dict__)), (EXPORT_KEY, json.dumps(info))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"ferkit {meta.arch}: float32 (N, 1, {meta.image_size}, {meta.image_size}) in [-1, 1] -> "
                        f"(N, {len(meta.classes)}) logits over {', '.join(meta.classes)}; tta {info['tta']}")
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _write_torchscript(model: nn.Module, meta: WeightsMeta, info: dict[str, Any], path: Path) -> None:
    example = torch.zeros(2, 1, meta.image_size, meta.image_size)
    # torch.jit is deprecated in torch 2.13 but still the format C++ (libtorch) deployments load.
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(model, (example,))
        torch.jit.save(traced, str(path), _extra_files={"ferkit.json": json.dumps(meta.__dict__),
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
    return meta_from_json(props.get(METADATA_KEY), path), json.loads(props.get(EXPORT_KEY) or "{}")


def meta_from_json(text: str | bytes | None, path: str | os.PathLike[str]) -> WeightsMeta:
    """WeightsMeta from the JSON an export embeds, with the weights loader's errors."""
    if not text:
        raise WeightsError(f"{path}: no ferkit metadata in this model file (export it with `ferkit export`)")
    try:
        return WeightsMeta(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as err:
        raise WeightsError(f"{path}: malformed ferkit metadata ({err})") from None


def exported_logits(path: str | os.PathLike[str], images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run an exported model on uint8 crops (N, 48, 48): ONNX on onnxruntime, TorchScript on torch.jit."""
    outputs = []
    if format_for(path) == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for start in range(0, len(images), batch_size):
            batch = preprocess_numpy(images[start : start + batch_size])
            outputs.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    else:
        with _quiet_exporter():
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                outputs.append(module(preprocess(images[start : start + batch_size])).numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def check_parity(
    weights: str | os.PathLike[str] | None, exported: str | os.PathLike[str], images: np.ndarray
) -> float:
    """Largest absolute difference between the exported model's logits and PyTorch's on uint8 crops."""
    model, _ = load_model(resolve_weights(weights), "cpu")
    _, info = read_export_info(exported)
    reference = predict_logits(model, images, "cpu", tta=info.get("tta", "none")).numpy()
    return float(np.abs(exported_logits(exported, images) - reference).max())
