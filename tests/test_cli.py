"""The `ferkit` command line: help, data info, train then evaluate, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ferkit
from ferkit import cli
from ferkit.labels import EMOTIONS
from ferkit.weights import read_meta


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_through_python_m_ferkit() -> None:
    result = subprocess.run([sys.executable, "-m", "ferkit", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ferkit")
    for command in ("data", "train", "evaluate"):
        assert command in result.stdout


def test_train_help_lists_the_config_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--run-dir", "--arch", "--epochs", "--batch-size", "--lr", "--limit-train", "--resume",
                 "--no-resume", "--amp", "--no-amp", "--channels-last", "--progress", "--no-progress"):
        assert f" {flag}" in out, flag


def test_a_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "usage: ferkit" in capsys.readouterr().err


def test_data_info_table(tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "data", "info", "--data", str(tiny_root))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"source: {tiny_root} (folder)"
    assert lines[1].split() == ["split", "usage", *EMOTIONS, "total"]
    assert lines[2].split() == ["train", "Training", *["2"] * 7, "14"]
    assert lines[3].split() == ["val", "PublicTest", *["2"] * 7, "14"]
    assert lines[4].split() == ["test", "PrivateTest", *["2"] * 7, "14"]
    assert "converted to 48x48 grayscale: 0" in lines
    assert any(line.startswith("exact duplicates: 0 groups, 0 extra copies") for line in lines)
    assert not any(line.startswith("note:") for line in lines)
    code, out, _ = run_cli(capsys, "data", "info", "--data", str(tiny_root))
    assert code == 0 and out.splitlines()[0] == f"source: {tiny_root} (folder, from cache)"
    code, out, _ = run_cli(capsys, "data", "info", "--data", str(tiny_root), "--no-cache")
    assert code == 0 and out.splitlines()[0] == f"source: {tiny_root} (folder)"


def test_train_then_evaluate(small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", str(small_root), "--run-dir", str(run), "--limit-train", "64",
                             "--epochs", "1", "--eval-batch-size", "64", "--no-progress")
    assert code == 0, err
    assert "64 images" in out and "epoch   1/1" in out
    assert {"best.safetensors", "last.safetensors", "checkpoint.safetensors", "metrics.csv", "test_metrics.json",
            "curves.png", "confusion_matrix_test.png", "config.json"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["run_dir"] == str(run) and config["config"]["limit_train"] == 64
    assert config["ferkit_version"] == ferkit.__version__ and config["torch_version"] == torch.__version__
    assert config["data"]["source"] == str(small_root) and config["data"]["counts"]["test"] == 42
    assert len(config["data"]["sha256"]) == 64
    assert read_meta(run / "best.safetensors").recipe == config["config"]  # the weights carry the recipe

    code, out, err = run_cli(capsys, "evaluate", "--weights", str(run), "--data", str(small_root), "--json")
    assert code == 0, err
    report = json.loads(out)  # nothing but JSON on stdout
    assert {"accuracy", "loss", "per_class", "confusion_matrix", "num_images"} <= report.keys()
    assert report["num_images"] == 42 and report["split"] == "test" and report["views"] == 1
    assert 0 <= report["accuracy"] <= 1
    trained = json.loads((run / "test_metrics.json").read_text())
    assert report["accuracy"] == trained["accuracy"]
    assert report["confusion_matrix"] == trained["confusion_matrix"]

    code, out, _ = run_cli(capsys, "evaluate", "--weights", str(run), "--data", str(small_root), "--split", "val")
    assert code == 0
    assert out.startswith(f"{run / 'best.safetensors'} on val (42 images): accuracy ")
    assert f"wrote {run / 'confusion_matrix_val.png'}" in out

    # A second plain run into the same folder is refused.
    code, _, err = run_cli(capsys, "train", "--data", str(small_root), "--out", str(run), "--limit-train", "64",
                           "--epochs", "1", "--no-progress")
    assert code == 2 and "already holds a run: pass --resume" in err
    assert "--out is now --run-dir" in err  # the old name still works, with a warning


@pytest.mark.parametrize("command", [
    ["data", "info"],
    ["train", "--epochs", "1", "--no-progress"],
    ["evaluate"],
])
def test_a_bad_data_path_exits_2_with_a_clear_message(
    command: list[str], tmp_path: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "fer2013"
    argv = [*command, "--data", str(missing)]
    if command[0] == "train":
        argv += ["--run-dir", str(tmp_path / "run")]
    if command[0] == "evaluate":
        argv += ["--weights", str(tiny_run)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err == f"ferkit: error: {missing}: no such file or folder (pass --data or set FERKIT_DATA)\n"
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "run").exists()


def test_bad_inputs_of_other_kinds_exit_2(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "evaluate", "--weights", str(tmp_path / "none.safetensors"),
                           "--data", str(tiny_root))
    assert code == 2 and err.startswith(f"ferkit: error: {tmp_path / 'none.safetensors'}: no such weights file")
    code, _, err = run_cli(capsys, "train", "--data", str(tiny_root), "--run-dir", str(tmp_path / "r"), "--resume",
                           "--no-progress")
    assert code == 2 and err == f"ferkit: error: {tmp_path / 'r' / 'checkpoint.safetensors'}: nothing to resume\n"
    bad_csv = tmp_path / "fer2013.csv"
    bad_csv.write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    code, _, err = run_cli(capsys, "data", "info", "--data", str(bad_csv))
    assert code == 2 and err.startswith(f"ferkit: error: {bad_csv}: 1 problem(s):")
    assert "row 2: expected 2304 pixels, got 3" in err
