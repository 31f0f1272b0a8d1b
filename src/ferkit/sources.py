"""Sources of `ferkit predict`: paths, folders and globs -> inputs, each a photo, a video or an argument that failed.

Folders are searched recursively for image and video files (hidden ones skipped, and folders holding an
--annotate marker, `ANNOTATED_MARKER`, so ferkit's annotated copies are not read back as inputs); a glob is
expanded here when the shell did not. An argument that names nothing readable (no such file, a FIFO, an
empty folder, a glob matching nothing) becomes an input with its error, so the others go on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS
from .outputs import file_kind
from .records import Identity, identify
from .video import VIDEO_EXTENSIONS

ANNOTATED_MARKER = ".ferkit-annotated"
"""The file in an --annotate folder that keeps folder searches out of it."""


@dataclass(frozen=True)
class InputItem:
    """One input to predict on, or an argument that already failed (`error` set, `path` None)."""

    display: str
    path: Path | None = None
    kind: str = "image"  # "image" or "video"
    relative: Path | None = None  # its annotated copy's place under --annotate
    error: str | None = None

    def identity(self) -> Identity:
        """How the results table knows this input: its path as shown, its file's size and mtime."""
        return identify(self.path, self.display) if self.path is not None else Identity(self.display)



def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def _folder_items(folder: Path, display: str) -> list[InputItem]:
    files, others = [], 0
    annotated = {marker.parent for marker in folder.rglob(ANNOTATED_MARKER) if marker.parent != folder}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if annotated and any(parent in annotated for parent in path.parents):
            continue  # ferkit's own annotated copies, from an earlier run
        if path.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            files.append(InputItem(str(path), path, _kind(path), Path(folder.resolve().name) / relative))
        else:
            others += 1
    if not files:
        note = f" ({others} other file{'s' * (others != 1)})" if others else ""
        return [InputItem(display, error=f"{display}: folder holds no images or videos{note}")]
    return files


def _not_a_file(path: Path) -> str:
    try:
        return f"not a regular file ({file_kind(path.stat().st_mode)})"
    except OSError as err:  # a dangling link, a loop of links
        return f"cannot be opened ({err.strerror or err})"


def expand_inputs(arguments: Sequence[str]) -> list[InputItem]:
    """Files, folders (recursively) and globs -> inputs, in argument order, each folder and glob sorted."""
    items: list[InputItem] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            items += _folder_items(path, argument)
        elif path.is_file():
            items.append(InputItem(argument, path, _kind(path), Path(path.name)))
        elif any(c in argument for c in "*?["):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                items.append(InputItem(argument, error=f"{argument}: no files match"))
            for match in matches:
                found = Path(match)
                if found.is_dir():
                    items += _folder_items(found, match)
                else:
                    items.append(InputItem(match, found, _kind(found), Path(found.name)))
        elif os.path.lexists(path):  # a device, FIFO or socket (or a dangling link): not something to read
            items.append(InputItem(argument, error=f"{argument}: {_not_a_file(path)}"))
        else:
            items.append(InputItem(argument, error=f"{argument}: no such file or folder"))
    return items
