"""Atomic writes (`ferkit.outputs.atomic_write`): the whole new file or the old one, never a part, and never a
temporary file left behind; the one place in ferkit that renames a file over another."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from ferkit.outputs import (
    TEMP_FILE,
    OutputPathError,
    atomic_write,
    temp_path,
    write_bytes_atomic,
    write_csv_atomic,
    write_text_atomic,
)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ferkit"


def test_the_new_file_replaces_the_old_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "weights.bin"  # the folder is made
    with atomic_write(target) as tmp:
        assert TEMP_FILE.match(tmp.name) and tmp.parent == target.parent and not target.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.bin"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "config.json", "old\n")
    with pytest.raises(RuntimeError, match="died"), atomic_write(target) as tmp:
        tmp.write_text("half of the n")
        raise RuntimeError("died while writing")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_files_get_the_mode_of_a_new_file_even_where_the_writer_made_them_private(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "shared.bin") as tmp:
        tmp.write_bytes(b"x")
        tmp.chmod(0o600)  # as safetensors does
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # a new file, as open() makes it under this process's umask
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_target_that_is_not_a_regular_file_is_refused_before_writing(tmp_path: Path) -> None:
    folder = tmp_path / "metrics.csv"
    folder.mkdir()
    with pytest.raises(OutputPathError, match=r"not a regular file \(a folder\)"), atomic_write(folder):
        pytest.fail("the block must not run")
    with pytest.raises(OutputPathError):
        write_csv_atomic(folder, [{"epoch": 1}])
    assert list(folder.iterdir()) == []


def test_csv_rows_under_a_header(tmp_path: Path) -> None:
    path = write_csv_atomic(tmp_path / "metrics.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}])
    assert path.read_text() == "epoch,loss\n1,0.5\n2,0.25\n"
    assert temp_path(path).name == f".metrics.csv.tmp{os.getpid()}"


def test_only_outputs_renames_files_into_place() -> None:
    """Weights, checkpoints, run records, exports, caches: all through `atomic_write`, no copy of it elsewhere."""
    renames = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                renames.append(path.name)
    assert renames == ["outputs.py"]
