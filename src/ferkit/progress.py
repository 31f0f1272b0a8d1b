"""Progress of long work on stderr: inputs and frames done, faces a second, time left.

One line, redrawn (tqdm): "1,234/20,000 inputs  48,210 frames  312 faces/s  [05:12<1:02:40]". The bar counts
work in photos and sampled frames (a video's frames as its container counts them), so the time left
holds for a mix of photos and long videos. Quiet when asked, and when stderr is not a terminal. Both
engines report through `Progress.update`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

DELAY = 1.0
"""Seconds before the line first shows: short work stays quiet."""


class Progress:
    """Counts inputs, frames and faces done of `inputs` inputs and `work` units (photos + frames to sample)."""

    def __init__(self, inputs: int, work: int | None = None, enabled: bool | None = None) -> None:
        self.inputs, self.done, self.frames, self.faces = inputs, 0, 0, 0
        self.start = time.monotonic()
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = tqdm(total=work or inputs, unit="item", file=sys.stderr, disable=not enabled, delay=DELAY,
                             dynamic_ncols=True, bar_format="{desc} {bar} [{elapsed}<{remaining}]")
        self._describe()

    def update(self, inputs: int = 0, frames: int = 0, faces: int = 0, work: int | None = None) -> None:
        """Add what was just done: whole inputs, sampled frames, faces; `work` units (default: photos + frames)."""
        self.done, self.frames, self.faces = self.done + inputs, self.frames + frames, self.faces + faces
        self.bar.update(work if work is not None else inputs + frames)
        self._describe()

    def _describe(self) -> None:
        rate = self.faces / max(time.monotonic() - self.start, 1e-9)
        frames = f"  {self.frames:,} frames" if self.frames else ""
        text = f"{self.done:,}/{self.inputs:,} inputs{frames}  {rate:,.0f} faces/s"
        self.bar.set_description_str(text, refresh=False)

    def write(self, line: str) -> None:
        """A line for the user above the bar."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
