"""Careless and hostile use of the commands (issue 18): outputs that are not files, the installed
package never written, an `EmotionRecognizer` shared between threads, inputs that are devices.

Every case here was seen to go wrong on ferkit before issue 18; each test says what it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

skimage_data = pytest.importorskip("skimage.data")

from fer_photos import fer_faces, photo, read_gray  # noqa: E402
from ferkit import cli  # noqa: E402
from ferkit.predict import EmotionRecognizer  # noqa: E402

PACKAGE = Path(cli.__file__).resolve().parent
"""The folder of the ferkit package these tests import: nothing a command does may change it."""


def package_state() -> dict[str, tuple[int, int, str]]:
    """(inode, size, sha256) of every file of the package but Python's caches."""
    state = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            info = path.stat()
            state[str(path.relative_to(PACKAGE))] = (info.st_ino, info.st_size,
                                                     hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def _fifo(folder: Path, name: str) -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def _outside_link(folder: Path, name: str, tmp_path: Path) -> Path:
    """A symlink in `folder` to a regular file in another folder."""
    victim = tmp_path / "elsewhere" / ("victim" + Path(name).suffix)
    victim.parent.mkdir(exist_ok=True)
    victim.write_bytes(b"not yours")
    (folder / name).symlink_to(victim)
    return folder / name


# ---------------------------------------------------------------------------------------------
# 1. Output paths: only a regular file or nothing is ever replaced


def test_check_output_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    from ferkit.outputs import OutputPathError, check_output_file

    (tmp_path / "folder").mkdir()
    (tmp_path / "file.onnx").write_bytes(b"old")
    (tmp_path / "inside.onnx").symlink_to(tmp_path / "file.onnx")
    cases = {
        Path("/dev/null"): "not a regular file (a character device)",
        _fifo(tmp_path, "pipe.onnx"): "not a regular file (a FIFO)",
        tmp_path / "folder": "not a regular file (a folder)",
        _outside_link(tmp_path, "link.onnx", tmp_path): "a symbolic link to a file outside its folder",
    }
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere" / "x.onnx")
    cases[dangling] = "a symbolic link to something that is not a regular file"
    for path, reason in cases.items():
        with pytest.raises(OutputPathError, match=re.escape(reason)) as err:
            check_output_file(path)
        assert str(path) in str(err.value)
    for fine in (tmp_path / "file.onnx", tmp_path / "new.onnx", tmp_path / "new" / "deeper.onnx",
                 tmp_path / "inside.onnx"):
        assert check_output_file(fine) == fine
    assert os.path.exists("/dev/null") and not Path("/dev/null").is_file()


@pytest.mark.parametrize("kind", ["fifo", "folder", "link"])
def test_export_never_replaces_what_is_not_a_regular_file(kind: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before issue 18 the final rename replaced a FIFO (or, as root, /dev/null) with the export."""
    target = {"fifo": lambda: _fifo(tmp_path, "model.onnx"),
              "folder": lambda: (tmp_path / "model.onnx").mkdir() or tmp_path / "model.onnx",
              "link": lambda: _outside_link(tmp_path, "model.onnx", tmp_path)}[kind]()
    before = os.lstat(target)
    status = cli.main(["export", "--weights", "ferkit-refcnn", "--output", str(target), "--check-images", "0"])
    assert status == 2
    assert str(target) in capsys.readouterr().err
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not list(tmp_path.glob(".model.onnx.*"))  # no temporary file left behind
    if kind == "link":
        assert (tmp_path / "elsewhere" / "victim.onnx").read_bytes() == b"not yours"


def test_calibrate_evaluate_and_annotate_never_write_through_a_link_out_of_their_folder(
        tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before issue 18 the figures and annotated copies were written through the link, into its target."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes((PACKAGE / "weights" / "ferkit-refcnn.safetensors").read_bytes())
    figures, annotated = tmp_path / "figures", tmp_path / "annotated"
    figures.mkdir()
    annotated.mkdir()
    image = fer_faces(tiny_root, "happy", "PrivateTest")[0]
    commands: list[tuple[list[str], Callable[[], Path]]] = [
        (["calibrate", "--weights", str(run), "--data", str(tiny_root), "--device", "cpu", "--output", "{}"],
         lambda: _fifo(tmp_path, "calibrated.safetensors")),
        (["evaluate", "--weights", str(run), "--data", str(tiny_root), "--device", "cpu", "--figures-dir",
          str(figures)], lambda: _outside_link(figures, "confusion_matrix_test.png", tmp_path)),
        (["predict", "--no-progress", "--no-detect", "--weights", "ferkit-refcnn", "--annotate", str(annotated),
          str(image)], lambda: _outside_link(annotated, image.name, tmp_path)),
    ]
    for argv, make in commands:
        target = make()
        before = os.lstat(target)
        status = cli.main([arg.replace("{}", str(target)) for arg in argv])
        captured = capsys.readouterr()
        err = captured.out + captured.err  # predict reports a failed input in its table
        assert status in (1, 2), (argv, err)
        assert str(target) in err and ("not a regular file (a FIFO)" in err or "outside its folder" in err), err
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    for victim in (tmp_path / "elsewhere").iterdir():
        assert victim.read_bytes() == b"not yours"


# ---------------------------------------------------------------------------------------------
# 6. The installed package is never written


def test_calibrate_and_record_never_write_into_the_package(tiny_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Before issue 18 both rewrote the shipped ferkit-refcnn.safetensors in place."""
    before = package_state()
    shipped = str(PACKAGE / "weights" / "ferkit-refcnn.safetensors")
    for argv in (["calibrate", "--weights", "ferkit-refcnn", "--data", str(tiny_root), "--device", "cpu"],
                 ["calibrate", "--weights", "ferkit-refcnn", "--data", str(tiny_root), "--device", "cpu",
                  "--output", shipped],
                 ["evaluate", "--weights", "ferkit-refcnn", "--data", str(tiny_root), "--device", "cpu",
                  "--figures-dir", str(tmp_path), "--record"],
                 ["evaluate", "--weights", shipped, "--data", str(tiny_root), "--device", "cpu",
                  "--figures-dir", str(tmp_path), "--record", "--output", shipped]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "installed ferkit package" in err or "3,589" in err, err
    assert package_state() == before


def test_record_refuses_a_partial_test_split(tiny_root: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recorded.safetensors"
    status = cli.main(["evaluate", "--weights", "ferkit-refcnn", "--data", str(tiny_root), "--device", "cpu",
                       "--figures-dir", str(tmp_path), "--record", "--output", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert "14 images" in err and "3,589" in err and "PrivateTest" in err, err
    assert not out.exists()


def test_record_writes_the_figures_to_its_output(tiny_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit import evaluate
    from ferkit.weights import read_meta

    # tiny_root's test split stands in for the full one: its own per-class counts are the "manifest" here.
    monkeypatch.setattr(evaluate, "FER2013_TEST_COUNTS", dict.fromkeys(evaluate.EMOTIONS, 2))
    out = tmp_path / "recorded.safetensors"
    report = evaluate.evaluate_weights("ferkit-refcnn", str(tiny_root), "test", figures_dir=str(tmp_path),
                                       device="cpu", record=True, output=str(out))
    assert read_meta(out).metrics["test_acc"] == report.accuracy
    assert read_meta(PACKAGE / "weights" / "ferkit-refcnn.safetensors").metrics["test_acc"] > 0.6


# ---------------------------------------------------------------------------------------------
# 7. One EmotionRecognizer shared by threads gives the results it gives alone


def test_a_recognizer_shared_by_two_threads_gives_sequential_results(data_root: Path) -> None:
    """Before issue 18, 12 of 200 results differed (missed faces, a face with another photo's box)."""
    faces = [read_gray(p) for p in fer_faces(data_root, "happy")[2:5]]
    photos = [photo(faces[:2], [(40, 60, 150, 150), (360, 150, 180, 180)], seed=1),
              photo(faces[2:], [(220, 110, 170, 170)], seed=2), skimage_data.astronaut()]
    recognizer = EmotionRecognizer("ferkit-refcnn", device="cpu")
    expected = [recognizer.predict(p) for p in photos]
    assert [len(e) for e in expected] == [2, 1, 1]
    rounds = 16
    outcomes: dict[int, list[tuple[int, list]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(worker: int) -> None:
        start.wait()
        for n in range(rounds):
            k = (n + worker) % len(photos)
            outcomes[worker].append((k, recognizer.predict(photos[k])))

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [(k, result) for worker in outcomes.values() for k, result in worker]
    assert len(got) == 2 * rounds
    wrong = [k for k, result in got if [(f.box, f.label) for f in result] != [(f.box, f.label) for f in expected[k]]]
    assert not wrong, f"{len(wrong)} of {len(got)} results differ from the sequential ones"
    for k, result in got:
        for face, alone in zip(result, expected[k], strict=True):
            assert np.allclose(list(face.probabilities.values()), list(alone.probabilities.values()), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. A device as an input


def test_predict_names_a_device_as_not_a_regular_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Before issue 18: "/dev/zero: no such file or folder"."""
    pipe = _fifo(tmp_path, "pipe.jpg")
    status = cli.main(["predict", "--no-progress", "--weights", "ferkit-refcnn", "/dev/zero", str(pipe)])
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert status == 1
    assert "/dev/zero: not a regular file (a character device)" in err, err
    assert f"{pipe}: not a regular file (a FIFO)" in err, err


def test_the_readme_never_puts_an_api_key_on_the_command_line() -> None:
    """`ps` shows a process's arguments to every user: the docs' examples take the key from the environment."""
    root = PACKAGE.parents[1]
    for page in (root / "README.md", root / "docs" / "service.md", root / "docs" / "cli.md"):
        text = page.read_text()
        commands = [line for line in text.splitlines() if line.lstrip().startswith("ferkit serve")]
        assert commands and not [line for line in commands if "--api-key" in line.split("#")[0] and "KEY]" not in line]
        assert "FERKIT_API_KEY=" in text, page
