"""The API's documented shapes (pydantic models for the OpenAPI schema), the predict body's schema, and the
model list `GET /v1/models` answers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..predict import EmotionRecognizer
from ..weights import WeightsMeta


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong")
    status: int


class FaceRecord(BaseModel):
    box: list[int] = Field(min_length=4, max_length=4, description="[x, y, w, h] in the image's pixels")
    label: str
    probabilities: dict[str, float]
    score: float | None = Field(description="the face detector's score; null without detection")
    track: int | None = Field(None, description="with ?stream=: the face's track id in that stream")
    raw_probabilities: dict[str, float] | None = Field(
        None, description="with ?stream=: this frame's own probabilities (`probabilities` are smoothed)")


class ImageRecord(BaseModel):
    path: str = Field(description="the upload's file name, or images[i] for base64 images")
    faces: list[FaceRecord]
    error: str | None = Field(description="why this file could not be read (its faces are then empty); null when "
                                          "it was read")
    type: str | None
    width: int | None = Field(description="the image's width in pixels; null when it could not be read")
    height: int | None = Field(description="the image's height in pixels; null when it could not be read")


class ModelRecord(BaseModel):
    name: str
    file: str
    loaded: bool
    default: bool
    arch: str | None
    classes: list[str]
    views_per_face: int
    accuracy: dict[str, float | None]
    metadata: dict[str, Any]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model: str
    error: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each a JSON `ErrorBody`."""
    return {code: {"model": ErrorBody} for code in codes}


def predict_body(max_files: int) -> dict[str, Any]:
    """The OpenAPI request body of POST /v1/predict: multipart `files` or JSON base64 `images`, up to `max_files`."""
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1, "maxItems": max_files,
                                     "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "minItems": 1, "maxItems": max_files,
                                      "items": {"type": "string", "contentEncoding": "base64",
                                                "description": "an image file, base64 (a data: URL is fine)"}}}}},
    }}


PATH_LIKE = re.compile(r"^(?![a-z][a-z0-9+.-]*://)[^\s]*[/\\][^\s]*$", re.IGNORECASE)
"""A string without spaces holding a slash or backslash, not a URL: a file or folder of the training machine."""


def without_paths(value: Any) -> Any:
    """`value` (parsed JSON) without the entries whose value is a path: the data, run folders and files of the
    machine that trained the weights are not the business of the service's clients."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if not (isinstance(v, str) and PATH_LIKE.match(v))}
    if isinstance(value, list):
        return [without_paths(v) for v in value if not (isinstance(v, str) and PATH_LIKE.match(v))]
    return value


def model_info(name: str, path: Path, meta: WeightsMeta, *, loaded: bool, default: bool) -> dict[str, Any]:
    """One model as GET /v1/models lists it (a `ModelRecord`): name, architecture, classes, accuracy, views
    per face, metadata (without the training machine's paths)."""
    metadata = without_paths(json.loads(json.dumps(dataclasses.asdict(meta), default=str)))
    metrics = metadata.get("metrics") or {}
    return {
        "name": name, "file": path.name, "loaded": loaded, "default": default,
        "arch": metadata.get("arch"), "classes": list(metadata.get("classes") or []),
        "views_per_face": meta.preprocessing.views,
        "accuracy": {"val": metrics.get("val_acc"), "test": metrics.get("test_acc")},
        "metadata": metadata,
    }


def list_models(recognizer: EmotionRecognizer) -> list[dict[str, Any]]:
    """The shipped models and the loaded one (listed once if it is a shipped one)."""
    from ..weights import DEFAULT_MODEL, WeightsError, read_meta, shipped_models

    loaded_path = Path(recognizer.backend.path).resolve()
    models, seen = [], False
    for name, path in sorted(shipped_models().items()):
        loaded = path.resolve() == loaded_path
        seen |= loaded
        try:
            meta = recognizer.meta if loaded else read_meta(path)
        except WeightsError:
            continue
        models.append(model_info(name, path, meta, loaded=loaded, default=name == DEFAULT_MODEL))
    if not seen:
        models.append(model_info(loaded_path.stem, loaded_path, recognizer.meta, loaded=True, default=False))
    return models
