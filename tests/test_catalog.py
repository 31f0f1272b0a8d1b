"""`ferkit models`: what the shipped files hold, their size and cost, and speed measured here."""

from __future__ import annotations

import json

import pytest

from ferkit import cli
from ferkit.catalog import describe_shipped_models
from ferkit.models import count_macs, count_parameters
from ferkit.weights import DEFAULT_MODEL, load_model, read_meta, shipped_models


def test_models_prints_what_the_files_hold(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--json", "--speed-seconds", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == DEFAULT_MODEL and {r["name"] for r in rows} == set(shipped_models())
    for row in rows:
        model, meta = load_model(row["name"])
        assert (row["arch"], row["views"]) == (meta.arch, meta.views)
        assert row["temperature"] == meta.preprocessing.temperature
        assert row["parameters"] == count_parameters(model) and row["macs"] == count_macs(model) * meta.views
        assert row["test_accuracy"] == meta.metrics.get("test_acc")
        assert row["test_balanced_accuracy"] == meta.metrics.get("test_balanced_acc")
        assert row["test_ece"] == meta.metrics.get("test_ece")
        assert row["mean_corruption_accuracy"] == meta.metrics.get("mean_corruption_acc")
        assert row["crops_per_s"] is None

    assert cli.main(["models", "--speed-seconds", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    for row in rows:
        line = next(line for line in table if line.split() and line.split()[0].rstrip("*") == row["name"])
        assert f"{100 * row['test_accuracy']:.2f}" in line and f"{row['parameters']:,}" in line
    # Which model is the default, and why: the rule's PublicTest figures from the file's metadata.
    default = read_meta(shipped_models()[DEFAULT_MODEL])
    assert [r["default"] for r in rows] == [True] + [False] * (len(rows) - 1) and default.views == 1
    assert table[-1].startswith(f"* the default, {DEFAULT_MODEL}: one view; PublicTest accuracy "
                                f"{100 * default.metrics['val_acc']:.2f}%, ")
    assert rows[0]["default_reason"] == table[-1].split(": ", 1)[1]


def test_models_measures_speed_on_this_machine() -> None:
    rows = describe_shipped_models(speed_seconds=0.2)
    speeds = {r["name"]: r["crops_per_s"] for r in rows}
    assert all(s > 0 for s in speeds.values())
    # The reference CNN, one view of 33 M multiply-adds, outruns the ResNet's ten views of 79 M each; the
    # default, the same ResNet with one view, is the ten-view model's speed many times over.
    assert speeds["ferkit-refcnn"] > 3 * speeds["ferkit-resnet"]
    assert speeds[DEFAULT_MODEL] > 5 * speeds["ferkit-resnet"]
