"""The robustness benchmark: every corruption changes real faces as specified, the same way every time."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferkit import cli
from ferkit.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from ferkit.data import FerData
from ferkit.evaluate import corruption_report
from ferkit.inference import DEFAULT_PREPROCESSING
from ferkit.labels import EMOTIONS
from ferkit.weights import load_model


@pytest.fixture(scope="module")
def faces(small_data: FerData) -> np.ndarray:
    return small_data["test"].images


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_keeps_the_format_changes_the_faces_and_is_deterministic(name: str, faces: np.ndarray) -> None:
    changes = []
    for severity in SEVERITIES:
        out = corrupt(faces, name, severity)
        assert out.shape == faces.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, corrupt(faces.copy(), name, severity))  # seeded: the same every call
        changes.append(float(np.abs(out.astype(np.int16) - faces).mean()))
    assert changes[0] > 0.5, f"{name} at severity 1 barely changes the faces: {changes[0]:.2f} grey levels"
    # Harder as the severity rises (on average over real faces; small steps may tie).
    assert all(b >= a * 0.95 for a, b in itertools.pairwise(changes)), changes
    assert changes[-1] > 1.5 * changes[0], changes


def test_corruptions_do_what_their_names_say(faces: np.ndarray) -> None:
    x = faces.astype(np.float64)
    contrast = corrupt(faces, "contrast", 3).astype(np.float64)
    assert contrast.std(axis=(1, 2)).mean() < 0.6 * x.std(axis=(1, 2)).mean()
    blur = corrupt(faces, "gaussian_blur", 3).astype(np.float64)
    assert np.abs(np.diff(blur, axis=2)).mean() < 0.8 * np.abs(np.diff(x, axis=2)).mean()  # fewer edges
    bright = corrupt(faces, "brightness", 2).astype(np.float64)
    shifted = bright.mean(axis=(1, 2)) - x.mean(axis=(1, 2))
    assert (np.abs(shifted) > 15).mean() > 0.8 and (shifted > 0).any() and (shifted < 0).any()  # both ways
    noise = corrupt(faces, "gaussian_noise", 3).astype(np.float64) - x
    assert abs(noise.mean()) < 3 and 15 < noise.std() < 30  # std 0.09 * 255 = 23, less what clipping takes
    low = corrupt(faces, "low_resolution", 5)
    assert len(np.unique(low[0])) < len(np.unique(faces[0])) + 20
    rotated = corrupt(faces, "rotation", 5)
    assert not np.array_equal(rotated[:, 24], faces[:, 24])


def test_bad_arguments_are_refused(faces: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(faces, "fog", 1)
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(faces, "jpeg", 6)
    with pytest.raises(ValueError, match="expected uint8 crops"):
        corrupt(faces.astype(np.float32), "jpeg", 1)


def test_the_benchmark_gives_the_same_figures_every_run(tiny_run: Path, small_data: FerData) -> None:
    model, meta = load_model(tiny_run / "best.safetensors")
    test = small_data["test"]
    first = corruption_report(model, test.images, test.labels, meta.preprocessing, torch.device("cpu"),
                              severities=(1, 5))
    second = corruption_report(model, test.images, test.labels, meta.preprocessing, torch.device("cpu"),
                               severities=(1, 5))
    assert first == second
    assert set(first.per_corruption) == set(CORRUPTIONS) and first.severities == [1, 5]
    for by_severity in first.per_severity.values():
        assert all(v * len(test) == pytest.approx(round(v * len(test))) for v in by_severity.values())
    assert DEFAULT_PREPROCESSING.views == meta.views


class FlatOrNot(torch.nn.Module):
    """Class 0 for a flat image (pixel std under about 2.5 grey levels), class 1 for any other: a model whose
    answers under each corruption can be worked out by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = x.flatten(1).std(1) - 0.02  # normalised to [-1, 1]: one grey level is 2 / 255
        return torch.stack([-spread, spread, *[torch.full_like(spread, -10.0)] * (len(EMOTIONS) - 2)], 1)


def test_the_benchmark_averages_as_worked_out_by_hand() -> None:
    """Three flat grey faces (class 0) and one half black, half white (class 1). Every corruption keeps a flat
    image flat and a half-and-half one far from flat, except sensor noise, which makes the flat ones textured:
    under noise 1 of 4 is right at every severity, under the other eight 4 of 4; the mean over the nine
    corruptions is (8 + 1/4) / 9 = 11/12."""
    flat = np.full((3, 48, 48), 128, np.uint8)
    halves = np.zeros((1, 48, 48), np.uint8)
    halves[:, :, 24:] = 255
    images, labels = np.concatenate([flat, halves]), np.array([0, 0, 0, 1])
    report = corruption_report(FlatOrNot(), images, labels, DEFAULT_PREPROCESSING, torch.device("cpu"))
    assert report.clean_accuracy == 1.0 and report.severities == [1, 2, 3, 4, 5]
    assert report.per_corruption == {name: 0.25 if name == "gaussian_noise" else 1.0 for name in CORRUPTIONS}
    assert report.per_severity["gaussian_noise"] == {str(s): 0.25 for s in SEVERITIES}
    assert report.mean_corruption_accuracy == pytest.approx(11 / 12)


def test_cli_evaluate_with_corruptions(tiny_run: Path, small_root: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "--weights", str(tiny_run), "--data", str(small_root), "--corruptions",
                     "--severities", "2", "--figures-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bench = report["corruptions"]
    assert bench["severities"] == [2] and bench["clean_accuracy"] == report["accuracy"]
    assert cli.main(["evaluate", "--weights", str(tiny_run), "--data", str(small_root), "--corruptions",
                     "--severities", "2", "--figures-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"mean over corruptions {100 * bench['mean_corruption_accuracy']:.2f}%" in out
    for name in CORRUPTIONS:
        assert f"\n{name:<16}{100 * bench['per_corruption'][name]:>8.2f}" in out
