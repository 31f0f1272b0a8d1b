"""ferkit: facial expression recognition on FER-2013, from training to reading emotions in photos."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = ["EmotionRecognizer", "FaceResult", "VideoRecognizer", "__version__", "read_results"]

if TYPE_CHECKING:
    from .predict import EmotionRecognizer, FaceResult
    from .tables import read_results
    from .video import VideoRecognizer


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), so that `import ferkit` stays light: no torch, no OpenCV.
    if name in ("EmotionRecognizer", "FaceResult"):
        from . import predict

        return getattr(predict, name)
    if name == "VideoRecognizer":
        from .video import VideoRecognizer

        return VideoRecognizer
    if name == "read_results":
        from .tables import read_results

        return read_results
    raise AttributeError(f"module 'ferkit' has no attribute {name!r}")
