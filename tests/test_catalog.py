"""`ferkit models`: what the shipped files hold, their size and cost, and speed: stored, or measured here."""

from __future__ import annotations

import json

import pytest

from ferkit import cli
from ferkit.catalog import describe_shipped_models
from ferkit.weights import DEFAULT_MODEL

# The reference CNN's size, worked out by hand from its layers (tests/test_models.py checks the registry's
# docstrings): four 3x3 conv blocks with BatchNorm, 1-32-64-128-256 channels on 48, 24, 12 and 6 px, max-pooled to
# 3x3, then FC 2304 -> 256 -> 7.
CONVS = [(1, 32, 48), (32, 64, 24), (64, 128, 12), (128, 256, 6)]
REFCNN_PARAMETERS = sum(9 * i * o + o + 2 * o for i, o, _ in CONVS) + (2304 * 256 + 256) + (256 * 7 + 7)
REFCNN_MACS = sum(side * side * 9 * i * o for i, o, side in CONVS) + 2304 * 256 + 256 * 7
RESNET_PARAMETERS, RESNET_MACS = 2_797_351, 79_111_936  # as docs/training.md lists them
# What each shipped file holds: accuracy as correct / faces (PrivateTest's 3,589; FER+'s 3,152), the other test
# figures as docs/results/ recorded them (v2-step/, calibration/, ferkit-resnet-robust/calibrated/,
# ferplus-average/).
SHIPPED = {
    "ferkit-resnet-robust-v2": dict(arch="resnet", views=1, temperature=0.865133, parameters=RESNET_PARAMETERS,
                                    macs=RESNET_MACS, test_accuracy=2497 / 3589, test_balanced_accuracy=0.6792,
                                    test_ece=0.0242, mean_corruption_accuracy=0.6441),
    "ferkit-resnet-robust": dict(arch="resnet", views=1, temperature=0.833578, parameters=RESNET_PARAMETERS,
                                 macs=RESNET_MACS, test_accuracy=2500 / 3589, test_balanced_accuracy=0.6799,
                                 test_ece=0.0293, mean_corruption_accuracy=0.6412),
    "ferkit-refcnn": dict(arch="refcnn", views=1, temperature=1.694157, parameters=REFCNN_PARAMETERS,
                          macs=REFCNN_MACS, test_accuracy=2299 / 3589, test_balanced_accuracy=0.5490, test_ece=0.0388,
                          mean_corruption_accuracy=0.5079),
    "ferkit-resnet": dict(arch="resnet", views=10, temperature=0.828152, parameters=RESNET_PARAMETERS,
                          macs=10 * RESNET_MACS, test_accuracy=2577 / 3589, test_balanced_accuracy=0.7067,
                          test_ece=0.0381, mean_corruption_accuracy=0.5704),
    # The same ResNet with an eighth output (contempt): 256 weights and a bias more.
    "ferkit-resnet-ferplus": dict(arch="resnet", views=1, temperature=0.599252, parameters=RESNET_PARAMETERS + 257,
                                  macs=RESNET_MACS + 256, test_accuracy=2675 / 3152, test_balanced_accuracy=0.6489,
                                  test_ece=0.0223, mean_corruption_accuracy=None),
}


def test_the_hand_count_is_the_reference_cnns() -> None:
    assert (REFCNN_PARAMETERS, REFCNN_MACS) == (980_679, 33_105_664)


def test_models_prints_what_the_files_hold(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--json", "--speed-seconds", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "ferkit-resnet-robust-v2" and {r["name"] for r in rows} == set(SHIPPED)
    for row in rows:
        expected = SHIPPED[row["name"]]
        got = {key: row[key] for key in expected}
        assert got == pytest.approx(expected, abs=5e-5), row["name"]
        assert row["crops_per_s"] > 0 and row["speed_source"] == "stored"  # measured once (catalog.json)

    assert cli.main(["models", "--speed-seconds", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    for name, accuracy, parameters in [("ferkit-resnet-robust-v2", "69.57", "2,797,351"),
                                       ("ferkit-resnet-robust", "69.66", "2,797,351"), ("ferkit-refcnn", "64.06",
                                       "980,679"), ("ferkit-resnet", "71.80", "2,797,351"),
                                       ("ferkit-resnet-ferplus", "84.87", "2,797,608")]:
        line = next(line for line in table if line.split() and line.split()[0].rstrip("*") == name)
        assert accuracy in line and parameters in line, line
    # Which model is the default, and why: the rule's PublicTest figure from the file's metadata.
    assert [r["default"] for r in rows] == [True] + [False] * (len(rows) - 1)
    assert table[-1].startswith("* the default, ferkit-resnet-robust-v2: one view; PublicTest accuracy 69.49%, ")
    assert "crops/s as measured once, on " in table[-2] and "(--speed: measure here)" in table[-2]
    assert rows[0]["default_reason"] == table[-1].split(": ", 1)[1]


@pytest.mark.slow
def test_models_measures_speed_on_this_machine() -> None:
    rows = describe_shipped_models(speed_seconds=0.2)
    assert all(r["speed_source"] == "measured here" for r in rows)
    speeds = {r["name"]: r["crops_per_s"] for r in rows}
    assert all(s > 0 for s in speeds.values())
    # The reference CNN, one view of 33 M multiply-adds, outruns the ResNet's ten views of 79 M each; the
    # default, the same ResNet with one view, is the ten-view model's speed many times over.
    assert speeds["ferkit-refcnn"] > 3 * speeds["ferkit-resnet"]
    assert speeds[DEFAULT_MODEL] > 5 * speeds["ferkit-resnet"]
