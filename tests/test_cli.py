"""The `ferkit` command line: help, data info, train then evaluate, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ferkit
from ferkit import cli
from ferkit.data import DataError
from ferkit.errors import InputError, RunError, UsageError
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


@pytest.mark.slow
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
    assert out.startswith(f"{run / 'best.safetensors'} on val (42 images, 1 view(s), prior train): accuracy ")
    assert "wrote" not in out and not (run / "confusion_matrix_val.png").exists()  # figures only where asked
    figures = tmp_path / "figures"
    code, out, _ = run_cli(capsys, "evaluate", "--weights", str(run), "--data", str(small_root), "--split", "val",
                           "--figures-dir", str(figures))
    assert code == 0 and f"wrote {figures / 'confusion_matrix_val.png'}" in out

    # A second plain run into the same folder is refused.
    code, _, err = run_cli(capsys, "train", "--data", str(small_root), "--run-dir", str(run), "--limit-train", "64",
                           "--epochs", "1", "--no-progress")
    assert code == 2 and "already holds a run: pass --resume" in err


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
    assert code == 2 and err == f"ferkit: error: {bad_csv}: row 2: expected 2304 pixels, got 3\n"


# ---------------------------------------------------------------------------------------------
# Issue 11: every failure is one line naming what was wrong, without a traceback; bugs say they are bugs.

ON_CPU_ONLY = not torch.cuda.is_available()
BAD_DEVICES = ["gpu", *(["cuda"] if ON_CPU_ONLY else [])]


@pytest.fixture(scope="module")
def made_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained refcnn in a weights file: quick to make, and enough where only the failure matters."""
    from ferkit.models import create_model
    from ferkit.weights import WeightsMeta, save_weights

    path = tmp_path_factory.mktemp("weights") / "refcnn.safetensors"
    torch.manual_seed(0)
    save_weights(path, create_model("refcnn"), WeightsMeta(arch="refcnn"))
    return path


def run_ferkit(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m ferkit ARGV` in a real process: what a user sees on the terminal."""
    import os

    return subprocess.run([sys.executable, "-m", "ferkit", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(code: int, err: str, start: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("ferkit: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ferkit: error: {start}"), err


def device_argv(command: str, device: str, tiny_root: Path, made_weights: Path, tmp_path: Path) -> list[str]:
    face = sorted((tiny_root / "test" / "happy").iterdir())[0]
    return {
        "train": ["train", "--data", str(tiny_root), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                  "--no-progress", "--device", device],
        "evaluate": ["evaluate", "--weights", str(made_weights), "--data", str(tiny_root), "--device", device],
        "predict": ["predict", str(face), "--no-detect", "--weights", str(made_weights), "--device", device],
        "serve": ["serve", "--weights", str(made_weights), "--port", "0", "--device", device],
    }[command]


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "serve"])
def test_a_device_this_machine_lacks_is_one_line_naming_what_it_has(
    command: str, device: str, tiny_root: Path, made_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11, case 16: `--device gpu` was a RuntimeError traceback, `--device cuda` on CPU-only torch an
    AssertionError traceback."""
    from ferkit.devices import available_devices

    code, out, err = run_cli(capsys, *device_argv(command, device, tiny_root, made_weights, tmp_path))
    assert_one_line_error(code, err, f"device {device!r} is not ")
    assert err.rstrip().endswith(", ".join(available_devices()) + ")" * (device == "gpu"))
    assert out == "" and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_bad_device_in_a_real_process(tiny_root: Path, made_weights: Path, tmp_path: Path) -> None:
    result = run_ferkit(*device_argv("predict", "gpu", tiny_root, made_weights, tmp_path))
    assert_one_line_error(result.returncode, result.stderr, "device 'gpu' is not a device ferkit runs on")
    assert result.stdout == ""


def bad_weights(tmp_path: Path, metadata: str, name: str = "odd.safetensors") -> Path:
    from safetensors.torch import save_file

    from ferkit.models import create_model
    from ferkit.weights import METADATA_KEY

    path = tmp_path / name
    save_file(dict(create_model("refcnn").state_dict()), str(path), metadata={METADATA_KEY: metadata})
    return path


BAD_METADATA = {
    "classes null": json.dumps({"arch": "refcnn", "classes": None}),  # case 7
    "bad tta": json.dumps({"arch": "refcnn", "tta": "bogus"}),  # case 7; `tta`: an old name (metadata format 1)
    "epoch as text": json.dumps({"arch": "refcnn", "format": 2, "epoch": "7"}),  # case 7
    "escape code": json.dumps({"arch": "refcnn", "classes": ["\x1b[2J\x1b[31mred", *EMOTIONS[1:]]}),  # case 9
    "line break": json.dumps({"arch": "refcnn", "classes": ["happy\nFAKE LINE", *EMOTIONS[1:]]}),  # case 9
}


@pytest.mark.parametrize("case", BAD_METADATA)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_bad_metadata_is_one_line_naming_the_file(
    command: str, case: str, tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11, cases 7 and 9: wrong types in the metadata, and class names that would reach the terminal raw."""
    path = bad_weights(tmp_path, BAD_METADATA[case])
    face = sorted((tiny_root / "test" / "happy").iterdir())[0]
    argv = (["evaluate", "--data", str(tiny_root)] if command == "evaluate" else ["predict", str(face)])
    code, out, err = run_cli(capsys, *argv, "--weights", str(path))
    assert_one_line_error(code, err, f"{path}: bad ferkit metadata: ")
    assert "\x1b" not in err and out == ""


@pytest.mark.slow
def test_bad_metadata_in_a_real_process(tiny_root: Path, tmp_path: Path) -> None:
    path = bad_weights(tmp_path, BAD_METADATA["classes null"])
    face = sorted((tiny_root / "test" / "happy").iterdir())[0]
    for argv in (["evaluate", "--data", str(tiny_root)], ["predict", str(face)]):
        result = run_ferkit(*argv, "--weights", str(path))
        assert_one_line_error(result.returncode, result.stderr,
                              f"{path}: bad ferkit metadata: classes must be a list of names, not None")
        assert result.stdout == ""


def boom(args: object) -> int:
    return 1 // 0


@pytest.mark.parametrize("how", ["plain", "--debug", "FERKIT_DEBUG=1"])
def test_a_bug_says_so_and_shows_the_traceback_only_when_asked(
    how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "cmd_data_info", boom)
    if how == "FERKIT_DEBUG=1":
        monkeypatch.setenv("FERKIT_DEBUG", "1")
    code, out, err = run_cli(capsys, *(["--debug"] if how == "--debug" else []), "data", "info")
    assert code == 70 and out == ""
    last = err.splitlines()[-1]
    assert last == ("ferkit: internal error (a bug: please report it): ZeroDivisionError: integer division or modulo "
                    "by zero" + ("" if how != "plain" else "; run with --debug or FERKIT_DEBUG=1 for the traceback"))
    if how == "plain":
        assert err.count("\n") == 1 and "Traceback" not in err
    else:
        assert "Traceback (most recent call last):" in err and "1 // 0" in err


@pytest.mark.parametrize(("error", "code", "message"), [
    (PermissionError(13, "Permission denied", "/srv/x.csv"), 2, "ferkit: error: /srv/x.csv: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/srv"), 2, "ferkit: error: /srv: Is a directory"),
    (OSError(28, "No space left on device"), 2, "ferkit: error: [Errno 28] No space left on device"),
    (UsageError("a\x1b[31m value\x07"), 2, "ferkit: error: a\\x1b[31m value\\x07"),
    (InputError("x.csv: row 2: expected 2304 pixels"), 2, "ferkit: error: x.csv: row 2: expected 2304 pixels"),
    (DataError("x.csv: empty"), 2, "ferkit: error: x.csv: empty"),  # the older classes are ferkit errors too
    (RunError("m.onnx: differs from PyTorch"), 1, "ferkit: error: m.onnx: differs from PyTorch"),
    (KeyboardInterrupt(), 130, "ferkit: interrupted"),
])
def test_expected_failures_are_one_line(
    error: BaseException, code: int, message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_data_info", fail)
    assert run_cli(capsys, "data", "info") == (code, "", message + "\n")


def reshape_in_numpy(args: object) -> int:
    np.arange(2).reshape(3)  # numpy raises a ValueError: no fault of the user's
    return 0


@pytest.mark.parametrize("debug", [False, True])
def test_a_value_error_from_inside_numpy_is_a_bug_not_bad_usage(
    debug: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "cmd_data_info", reshape_in_numpy)
    code, out, err = run_cli(capsys, *(["--debug"] if debug else []), "data", "info")
    assert (code, out) == (70, "")
    assert err.splitlines()[-1] == ("ferkit: internal error (a bug: please report it): ValueError: cannot reshape "
                                    "array of size 2 into shape (3,)" + ("" if debug else "; run with --debug or "
                                                                         "FERKIT_DEBUG=1 for the traceback"))
    assert ("Traceback (most recent call last):" in err and "reshape(3)" in err) == debug
    assert err.count("\n") == 1 or debug


@pytest.mark.parametrize("debug", [False, True])
def test_a_failed_run_is_exit_status_1(debug: bool, made_weights: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An export whose outputs differ from PyTorch's: the inputs were fine, the work failed its own check."""
    import ferkit.export

    monkeypatch.setattr(ferkit.export, "check_parity", lambda *args: 0.5)
    monkeypatch.chdir(tmp_path)  # no data here: the check runs on made images
    out_file = tmp_path / "model.pt"
    code, out, err = run_cli(capsys, *(["--debug"] if debug else []), "export", "--weights", str(made_weights),
                             "--output", str(out_file), "--check-images", "4")
    assert code == 1
    assert out.splitlines()[-1].endswith("max |logit difference| 5.00e-01 (tolerance 1e-04): MISMATCH")
    assert err.splitlines()[-1] == (f"ferkit: error: {out_file}: its logits differ from PyTorch's by up to 5.00e-01, "
                                    "over the tolerance 1e-04")
    assert ("Traceback (most recent call last):" in err) == debug


def test_debug_shows_the_traceback_of_expected_failures_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none"
    code, _, err = run_cli(capsys, "--debug", "data", "info", "--data", str(missing))
    assert code == 2 and "Traceback (most recent call last):" in err
    assert err.splitlines()[-1].startswith(f"ferkit: error: {missing}: no such file or folder")


@pytest.mark.slow
def test_export_to_a_place_it_cannot_write_is_one_line(made_weights: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11, case 17: a PermissionError traceback, after the whole export had run."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    places = [(a_file / "model.pt", "cannot write the export there (Not a directory)"),
              (tmp_path / "folder.pt", "not a regular file (a folder)")]  # issue 18: one check for every output
    (tmp_path / "folder.pt").mkdir()
    if Path("/sys").is_dir():  # read-only, even for root
        places.append((Path("/sys/ferkit-model.pt"), "cannot write the export there (Permission denied)"))
    for place, reason in places:
        code, out, err = run_cli(capsys, "export", "--weights", str(made_weights), "--output", str(place))
        assert_one_line_error(code, err, f"{place}: {reason}")
        assert out == ""
    result = run_ferkit("export", "--weights", str(made_weights), "--output", str(a_file / "model.onnx"))
    assert_one_line_error(result.returncode, result.stderr, f"{a_file / 'model.onnx'}: cannot write the export there")


def test_export_without_data_checks_parity_on_made_images(made_weights: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11, case 17: without data the parity check was skipped silently, with exit status 0."""
    monkeypatch.chdir(tmp_path)  # no ./data/fer2013 here, and FERKIT_DATA is unset
    out_file = tmp_path / "model.pt"
    code, out, err = run_cli(capsys, "export", "--weights", str(made_weights), "--output", str(out_file),
                             "--check-images", "32")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {out_file} (torchscript")
    assert lines[1].startswith("parity with PyTorch on 32 synthetic images (seeded noise and gradients): "
                               "max |logit difference| ") and lines[1].endswith(": ok")
    assert err == ("ferkit: note: no FER-2013 test images (data/fer2013: no such file or folder (pass --data or set "
                   "FERKIT_DATA)); parity checked on synthetic images\n")


def test_export_with_data_that_does_not_load_is_an_error(made_weights: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing"
    code, out, err = run_cli(capsys, "export", "--weights", str(made_weights), "--output", str(tmp_path / "m.pt"),
                             "--data", str(missing))
    assert_one_line_error(code, err, f"{missing}: no such file or folder")
    assert out == "" and not (tmp_path / "m.pt").exists()


def test_ci_runs_the_readme_setup_commands() -> None:
    """Issue 11, case 18: the README's CPU install lines are what CI runs, word for word; the GPU line stands beside."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    setup = readme.split("## Setup", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in setup.split("```bash\n")[1:]]
    cpu = [line for line in blocks[0].splitlines() if line.startswith("pip install")]
    assert cpu == ['pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu',
                   'pip install -e ".[dev]"']
    assert 'pip install torch==2.13.0 -e ".[dev]"' in blocks[1]
    # CI sets the fresh clone up with `make demo`, whose setup recipe runs the README's CPU lines word for word.
    recipe = (root / "Makefile").read_text().split("\n$(SETUP): pyproject.toml\n", 1)[1].split("\n\n", 1)[0]
    make_pip = [line.strip().replace(".venv/bin/pip install ", "pip install ") for line in recipe.splitlines()
                if ".venv/bin/pip install " in line]
    assert make_pip == cpu
    assert "make demo" in (root / ".ci" / "run").read_text().splitlines()


def test_licence_and_a_model_card_for_every_shipped_model() -> None:
    """Issue 11, case 19: no LICENSE although pyproject said MIT; no model card."""
    import re

    from ferkit.weights import shipped_models

    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 the ferkit authors\n")
    project = (root / "pyproject.toml").read_text()
    # ferkit's code and weights: MIT; the shipped YuNet face detector: Apache-2.0, its text in the wheel too.
    assert 'license = "MIT AND Apache-2.0"' in project
    assert 'license-files = ["LICENSE", "src/ferkit/detectors/LICENSE"]' in project
    assert (root / "src/ferkit/detectors/LICENSE").read_text().count("Apache License") >= 1
    card = (root / "MODEL_CARD.md").read_text()
    for name in shipped_models():
        assert f"\n## `{name}`" in card, name
    # Every percentage in the card is in the README or docs/, a per-class score in docs/results or a class share in
    # the weights.
    known = " ".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    for run in ("best/test_metrics.json", "seed/test_metrics.json", "ferkit-resnet-robust/test_metrics.json",
                "v2-step/evaluate_test.json"):
        per_class = json.loads((root / "docs/results" / run).read_text())["per_class"]
        known += " ".join(f"{100 * m[k]:.1f}%" for m in per_class.values() for k in ("recall", "f1"))
    for path in shipped_models().values():
        known += " ".join(f"{100 * p:.1f}%" for p in read_meta(path).preprocessing.class_prior or ())
    for figure in set(re.findall(r"\d+(?:\.\d+)?%", card)):
        assert figure in known, figure
