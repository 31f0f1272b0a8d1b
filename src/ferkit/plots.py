"""Figures: training curves from a run's metrics, confusion matrices, reliability diagrams."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np

from .outputs import check_output_file


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Accuracy and loss per epoch, train and val, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "--")):
        acc_ax.plot(epochs, [100 * row[f"{split}_acc"] for row in history], style, label=split)
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], style, label=split)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    counts = np.asarray(matrix)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, values, fmt, name in ((axes[0], counts, "d", "counts"), (axes[1], normalised, ".2f", "row-normalised")):
        ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=name)
        threshold = values.max() / 2 if values.size else 0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                color = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", color=color, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    try:
        check_output_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_reliability(probabilities: np.ndarray, targets: np.ndarray, path: str | os.PathLike[str], title: str = "",
                     bins: int = 15) -> Path:
    """Reliability diagram: accuracy against confidence of the top label in equal-width bins, with counts."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(targets)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, (ax, count_ax) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[counts > 0], accuracy[counts > 0], width=1 / bins, edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title or "Reliability")
    ax.legend(loc="upper left")
    count_ax.bar(centres, counts, width=1 / bins, edgecolor="black", color="gray")
    count_ax.set(xlabel="confidence of the top label", ylabel="faces")
    fig.tight_layout()
    return _save(fig, path)


EMOTION_COLORS = {"angry": "#e62828", "disgust": "#289628", "fear": "#a050b4", "happy": "#fac81e", "sad": "#1e78c8",
                  "surprise": "#3cc8fa", "neutral": "#b4b4b4"}


def plot_timeline(frames: Sequence[Any], classes: Sequence[str], path: str | os.PathLike[str], title: str = "",
                  min_frames: int = 3) -> Path:
    """Each track's (smoothed) emotion probabilities over time as stacked areas, one panel per track.

    `frames` are `ferkit.tracking.FrameResult`s with tracked faces; a track's area breaks where its
    face was not seen for more than two sampling steps. Tracks seen in fewer than `min_frames`
    sampled frames (a detector's passing false alarm, mostly) get no panel; the title counts them.
    """
    series: dict[int, list[tuple[float, list[float]]]] = {}
    for frame in frames:
        for face in frame.faces:
            if face.track is not None:
                series.setdefault(face.track, []).append((frame.time, [face.probabilities[c] for c in classes]))
    times = sorted({frame.time for frame in frames})
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    brief = [track for track, rows in series.items() if len(rows) < min_frames]
    tracks = sorted(set(series) - set(brief)) or [0]
    fig, axes = plt.subplots(len(tracks), 1, figsize=(10, 1.4 + 1.6 * len(tracks)), sharex=True, squeeze=False,
                             layout="constrained")
    colors = [EMOTION_COLORS.get(c, f"C{i}") for i, c in enumerate(classes)]
    for ax, track in zip(axes[:, 0], tracks, strict=True):
        rows = series.get(track, [])
        start = 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end][0] - rows[end - 1][0] > 2 * step:
                t = [r[0] for r in rows[start:end]]
                ax.stackplot(t, np.array([r[1] for r in rows[start:end]]).T, colors=colors, labels=classes,
                             linewidth=0)
                start = end
        ax.set(ylim=(0, 1), ylabel=f"track {track}" if rows else "no face", xlim=(times[0], times[-1]) if times
               else None)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    fig.legend(handles, classes, loc="outside lower center", ncol=len(classes), frameon=False)
    note = f" ({len(brief)} track{'s' * (len(brief) != 1)} seen in fewer than {min_frames} frames not drawn)"
    fig.suptitle((title or "Emotions over time") + (note if brief else ""), fontsize=10)
    return _save(fig, path)
