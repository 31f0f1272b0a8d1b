"""Fuzzing weights files: mutated ferkit metadata (formats 1 and 2) and corrupted bytes in real safetensors files.

The invariant, for every generated file: `read_meta` and `load_model` either succeed, and then the model
runs a real 48x48 face to finite logits, one per class, and the metadata survives a round trip through
its JSON; or they raise `WeightsError` whose message starts with the file's path and is one printable
line. Any other exception type fails the test, as does a hang (each load runs under a time limit).

Metadata is mutated as data (values of the wrong type, nulls, missing and extra keys, huge, negative and
non-finite numbers, odd strings with control characters and escape codes, deep nesting) and as text
(truncated, spliced, not an object, nested past any recursion limit); files are corrupted byte by byte.

Bounded for CI: example counts below (times FERKIT_FUZZ_SCALE, default 1), derandomized, no deadline
but a per-case time limit: 800 cases in about 25 s on a 2-core machine.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import warnings
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import currently_in_test_context, event, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import DATA_ROOT
from ferkit.inference import Preprocessing, predict_logits
from ferkit.labels import EMOTIONS
from ferkit.models import create_model
from ferkit.weights import METADATA_KEY, WeightsError, WeightsMeta, load_model, meta_from_json, read_meta
from fuzzing import call_with_timeout, fuzz_settings

TIME_LIMIT = 10.0  # seconds per load: a hang, not a slow machine (a load here takes about 20 ms)


FORMAT_2 = json.loads(WeightsMeta(
    arch="refcnn", data_source="fer2013.zip", epoch=3, metrics={"val_acc": 0.5, "per_class": {"happy": [1, 2]}},
    preprocessing=Preprocessing(views=2, temperature=1.5, class_prior=tuple([1 / 7] * 7)),
    recipe={"epochs": 3, "arch": "refcnn", "lr": 0.001},
).to_json())
FORMAT_1 = {"arch": "seed", "classes": list(EMOTIONS), "image_size": 48, "normalization": {"mean": 0.5, "std": 0.5},
            "data_source": "fer2013.csv", "epoch": 4, "metrics": {"val_acc": 0.5}, "tta": "flip",
            "ferkit_version": "0.1.0"}
KEYS = sorted({*FORMAT_1, *FORMAT_2, *FORMAT_2["preprocessing"], "mean", "std", "format"})

# Values a hostile or broken writer might put anywhere: wrong types, edge numbers, odd strings.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([0, -1, 1, 2, 3, 7, 10, 47, 48, 2**31, 2**63, -(2**63), 10**30, 10**400, -(10**400)]),
    st.floats(),  # NaN and the infinities included: json writes them as NaN / Infinity
    st.sampled_from([0.0, -0.0, 0.5, 0.49, 1.05, 3.0001, 1e-300, 1e308, -1e308]),
    st.text(max_size=20),
    st.sampled_from(["", " ", "refcnn", "seed", "resnet", "vgg", "none", "flip", "crops", "48", "0.5", "NaN",
                     "\x1b[31mred", "\x1b]0;title\x07", "line\nbreak", "tab\there", "\r", "\x00", "\u202eevil",
                     "\ufeff", "\u2028", " happy", "happy ", "x" * 41, "é" * 40]),
    st.integers(41, 5000).map(lambda n: "y" * n),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=8),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4)),
    max_leaves=12,
)


def _places(value: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a JSON value: ('preprocessing', 'views'), ('classes', 3), ..."""
    out = [trail] if trail else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _places(inner, (*trail, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            out += _places(inner, (*trail, index))
    return out


@st.composite
def mutated_metadata(draw: st.DrawFn) -> str:
    """A valid metadata JSON of either format with data-level mutations, then perhaps a text-level one."""
    meta = copy.deepcopy(draw(st.sampled_from([FORMAT_1, FORMAT_2])))
    for _ in range(draw(st.integers(0, 4))):
        places = _places(meta)
        trail = draw(st.sampled_from(places)) if places else ()
        parent: Any = meta
        for step in trail[:-1]:
            parent = parent[step]
        if not isinstance(parent, dict | list):
            continue
        key = trail[-1] if trail else None
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if action == "replace" and key is not None:
            parent[key] = draw(VALUES)
        elif action == "delete" and key is not None:
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)))] = draw(VALUES)
        elif action == "duplicate" and isinstance(parent, list) and parent:
            parent.append(copy.deepcopy(parent[0]))
        elif isinstance(parent, list):
            parent.append(draw(VALUES))
    text = json.dumps(meta)
    how = draw(st.sampled_from(["as is"] * 6 + ["truncate", "splice", "not an object", "deep", "random"]))
    event(f"text: {how}")
    if how == "truncate":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]
    elif how == "not an object":
        text = json.dumps(draw(VALUES))
    elif how == "deep":
        depth = draw(st.sampled_from([50, 1_000, 100_000]))
        nest = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = text[:-1] + ', "metrics": ' + nest[0] * depth + "1" + nest[1] * depth + "}"
    elif how == "random":
        text = draw(st.text(max_size=60))
    return text


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A 7-class refcnn's tensors, with non-default values."""
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in create_model("refcnn").state_dict().items()}


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real 48x48 FER-2013 face (a seeded synthetic one where the data set is absent)."""
    from PIL import Image

    files = sorted((DATA_ROOT / "test" / "happy").glob("PrivateTest_*.jpg")) if DATA_ROOT.is_dir() else []
    if files:
        return np.array(Image.open(files[0]).convert("L"))[None]
    from ferkit.export import synthetic_crops

    return synthetic_crops(2)[1:]


def check_invariant(path: Path, face: np.ndarray) -> None:
    """Loads and runs, or a one-line WeightsError that starts with the path; nothing else, and never a hang."""

    def load() -> tuple[Any, WeightsMeta, WeightsMeta]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # old names ('seed') load with a warning
            return (*load_model(path), read_meta(path))

    try:
        model, meta, again = call_with_timeout(load, TIME_LIMIT)
    except WeightsError as err:
        message = str(err)
        assert message.startswith(f"{path}: "), message
        assert message.isprintable(), message  # one line, no escape codes: it goes to terminals as it is
        assert len(message) <= len(str(path)) + 400, message  # values from the file are quoted, shortened
        if currently_in_test_context():
            event(f"refused: {message[len(str(path)) + 2:].split(':')[0].split('(')[0][:40]}")
        return
    if currently_in_test_context():
        event("loaded")
    assert again.to_json() == meta.to_json()
    assert meta_from_json(meta.to_json(), path).to_json() == meta.to_json()  # the round trip
    logits = predict_logits(model, face, "cpu", preprocessing=meta.preprocessing)
    assert logits.shape == (len(face), len(meta.classes)) and bool(torch.isfinite(logits).all())
    assert all(name.isprintable() and len(name) > 0 for name in meta.classes)
    assert math.isfinite(meta.preprocessing.temperature) and meta.preprocessing.temperature > 0


_names = count()


@pytest.mark.slow
@fuzz_settings(650)
@given(text=mutated_metadata())
def test_mutated_metadata_loads_or_names_the_file(
    text: str, state: dict[str, torch.Tensor], face: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / f"weights-{next(_names)}.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: text})
    try:
        check_invariant(path, face)
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def valid_file(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "w.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(FORMAT_2)})
    return path.read_bytes()


@pytest.mark.slow
@fuzz_settings(150)
@given(data=st.data())
def test_corrupted_files_load_or_name_the_file(
    data: st.DataObject, valid_file: bytes, face: np.ndarray, tmp_path: Path
) -> None:
    """Bytes flipped, inserted or cut in the header (where the parsing is), or the file cut anywhere."""
    blob = bytearray(valid_file)
    (header_length,) = struct.unpack("<Q", blob[:8])
    end = 8 + header_length
    how = data.draw(st.sampled_from(["flip", "flip", "insert", "delete", "cut", "length", "garbage"]))
    event(f"bytes: {how}")
    if how == "flip":
        for at in data.draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=8)):
            blob[at] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        at = data.draw(st.integers(8, end))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    elif how == "delete":
        at = data.draw(st.integers(8, end - 1))
        del blob[at : at + data.draw(st.integers(1, 16))]
    elif how == "cut":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    elif how == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, end, header_length + 1, len(blob), 2**40,
                                                                 2**64 - 1])))
    else:
        blob = bytearray(data.draw(st.binary(max_size=200)))
    path = tmp_path / f"corrupt-{next(_names)}.safetensors"
    path.write_bytes(bytes(blob))
    try:
        check_invariant(path, face)
    finally:
        path.unlink()


@pytest.mark.parametrize("text", [
    # What the fuzzing found (each escaped as another exception, or made a message unfit for a terminal):
    '{"arch": "refcnn", "format": 2, "metrics": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError
    '{"arch": "refcnn", "format": 2, "preprocessing": {"mean": 1' + "0" * 400 + "}}",  # OverflowError in float()
    '{"arch": "refcnn", "format": 2, "epoch": 1' + "0" * 5000 + "}",  # ValueError: over 4,300 digits
    json.dumps({"arch": "refcnn", "format": 2, "\x1b[2J\x1f": 1}),  # unknown key with escape codes, printed raw
    json.dumps({"arch": "y" * 5000}),  # a 5,000-character message
    json.dumps({"arch": "refcnn", "format": 2, "classes": ["a", "b", "c"]}),  # PyTorch's mismatch list, many lines
])
@pytest.mark.slow
def test_found_by_fuzzing(text: str, state: dict[str, torch.Tensor], face: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "found.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: text})
    with pytest.raises(WeightsError):
        load_model(path)
    check_invariant(path, face)
