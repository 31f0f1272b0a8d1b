"""The one check every command runs on a file it is about to write.

A path may be written when it is a regular file or does not exist yet (nor its folder); it is
refused, with `OutputPathError` naming it, when it is a folder, a FIFO, a socket or a device (a
rename over `/dev/null`, as root, replaces the device), a symbolic link to anything but a regular
file in the link's own folder (image and figure writers follow links), or a place inside the
installed ferkit package (its shipped models are shared by every user of the install, and a pip
install is often read-only). Weights, checkpoints, exports, figures and annotated copies all pass
through here before they are written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


class OutputPathError(ValueError):
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
