"""The one check every command runs on a file it is about to write, and the one way files are written.

A path may be written when it is a regular file or does not exist yet (nor its folder); it is
refused, with `OutputPathError` naming it, when it is a folder, a FIFO, a socket or a device (a
rename over `/dev/null`, as root, replaces the device), a symbolic link to anything but a regular
file in the link's own folder (image and figure writers follow links), or a place inside the
installed ferkit package (its shipped models are shared by every user of the install, and a pip
install is often read-only). Weights, checkpoints, exports, figures and annotated copies all pass
through here before they are written.

Files that a kill must not leave half-written (weights, checkpoints, run records, exports, caches) are
written by `atomic_write`: to a temporary file beside the target, then renamed over it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


TEMP_FILE = re.compile(r"^\..+\.tmp(\d+)$")
"""`.NAME.tmpPID`: the temporary file that `atomic_write` writes beside NAME before its rename."""


class OutputPathError(UsageError):
    """A path that ferkit will not write: not a regular file, a link out of its folder, or inside the package."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, from its `st_mode`: "a FIFO", "a character device", ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def package_folder() -> Path:
    """The folder of the installed ferkit package."""
    return Path(__file__).resolve().parent


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path if a file may be written there; OutputPathError naming it and saying why if not."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_file():
            raise OutputPathError(f"{path}: a symbolic link to something that is not a regular file ({target}); "
                                  "ferkit does not write through it")
        if target.parent != Path(os.path.realpath(path.parent)):
            raise OutputPathError(f"{path}: a symbolic link to a file outside its folder ({target}); ferkit does "
                                  "not write through it")
    elif info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputPathError(f"{path}: not a regular file ({file_kind(info.st_mode)}); ferkit writes only regular "
                              "files")
    package = package_folder()
    if Path(os.path.realpath(path)).is_relative_to(package):
        raise OutputPathError(f"{path}: inside the installed ferkit package ({package}), whose files every user of "
                              "the install shares; write the file elsewhere (--output FILE)")
    return path


def temp_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` before the rename: `.NAME.tmpPID` in the same folder (same file system)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """Write `path` by write-then-rename, so that a kill leaves the old file or the new one, never part of one.

    Checks `path` (`check_output_file`) and makes its folder, then yields the temporary path for the caller
    to write. When the block ends without an error the file gets the mode a new file gets under the umask
    (some writers, safetensors among them, make theirs private), its bytes reach the disk first if `durable`,
    `path` is checked again (the writing may have taken minutes) and the file is renamed over it. The
    temporary file never outlives the block.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        check_output_file(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def _umask() -> int:
    # Read once: os.umask can only be read by setting it, and threads creating files meanwhile would get mode 0666.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """`text` into `path`, atomically (`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike[str], blob: bytes) -> Path:
    """`blob` into `path`, atomically and on disk before the rename: a kill or a crash leaves the old file or
    the new."""
    with atomic_write(path, durable=True) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


def write_csv_atomic(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """`rows` as CSV with a header of the first row's keys, atomically (`atomic_write`)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
