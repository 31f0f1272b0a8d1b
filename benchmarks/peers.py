"""ferkit's default beside the peer `fer` (pip `fer`: Haar + its TFLite model), everything in one run.

`fer` runs in its own virtual environment (never a ferkit dependency), driven as a subprocess through
benchmarks/peers_fer.py; make it once with

    python -m venv /work/venv-fer && /work/venv-fer/bin/pip install fer tensorflow-cpu "setuptools<81"

(fer 25.10.3 imports pkg_resources, which setuptools 81 removed)

Columns, for ferkit's default (`EmotionRecognizer()`: the default model, YuNet, the uniform prior;
also under `--prior train`) and for `fer`:
- PrivateTest accuracy and balanced accuracy on the FER-2013 crops (no detection: both read the crop);
- mean corruption accuracy: ferkit's seeded corruption benchmark (`ferkit.corruptions`, 9 corruptions x
  5 severities) applied to the PrivateTest crops, the same corrupted crops for both;
- one 640x480 photo with one face (a PrivateTest face pasted at 160 px), detection included, through
  `EmotionRecognizer()` as users get it (on the CPU: the default model's ONNX twin on onnxruntime):
  median and p95 seconds per call after warm-up;
- crops/s of the classifier on batches of 256 (ferkit: PyTorch, as `ferkit models` measures), and
  ferkit-resnet's (the ten-view model) beside it.

Timing figures need the machine to itself. The accuracy columns do not (`--only accuracy`).

    .venv/bin/python benchmarks/peers.py --data ../shared/data/fer2013 --fer-python /work/venv-fer/bin/python \\
        --output docs/results/peers/peers.json > docs/results/peers/peers.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fer_photos import fer_faces, photo, read_gray
from ferkit.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from ferkit.inference import PRIORS, adjusted_logits

FER_WORKER = Path(__file__).resolve().parent / "peers_fer.py"
PHOTO_BOX = (240, 160, 160, 160)


def balanced(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([(predicted[truth == c] == c).mean() for c in np.unique(truth)]))


def crop_sets(images: np.ndarray, limit: int | None) -> list[tuple[str, int, np.ndarray]]:
    """The clean crops, then each corruption at each severity: (name, severity, crops)."""
    sets = [("clean", 0, images)]
    sets += [(name, s, corrupt(images, name, s)) for name in CORRUPTIONS for s in SEVERITIES]
    return sets if limit is None else sets[:limit]


def scores(predicted: list[np.ndarray], sets: list[tuple[str, int, np.ndarray]], truth: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (clean) and the mean corruption accuracy over the corrupted sets."""
    corrupted = [float((p == truth).mean()) for p, (name, _, _) in zip(predicted, sets, strict=True) if name != "clean"]
    return {"accuracy": float((predicted[0] == truth).mean()), "balanced_accuracy": balanced(predicted[0], truth),
            "mean_corruption_accuracy": float(np.mean(corrupted)) if corrupted else None,
            "corrupted_sets": len(corrupted)}


def run_fer(python: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([python, str(FER_WORKER), *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise SystemExit(f"fer worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def accuracy(data: Path, fer_python: str, limit: int | None) -> dict[str, Any]:
    from ferkit.data import load_fer2013
    from ferkit.predict import EmotionRecognizer

    test = load_fer2013(str(data))["test"]
    sets = crop_sets(test.images, limit)
    recognizer = EmotionRecognizer(device="cpu")
    logits = [recognizer.logits(crops) for _, _, crops in sets]
    pre = recognizer.meta.preprocessing
    result: dict[str, Any] = {
        f"ferkit prior {p}": scores([adjusted_logits(z, pre, p).argmax(1) for z in logits], sets, test.labels)
        for p in PRIORS}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "crops.npy", np.concatenate([crops for _, _, crops in sets]))
        run_fer(fer_python, "classify", str(Path(tmp) / "crops.npy"), str(Path(tmp) / "out.npy"))
        probabilities = np.load(Path(tmp) / "out.npy")
    predicted = np.split(probabilities.argmax(1), len(sets))
    result["fer"] = scores(predicted, sets, test.labels)
    result["ferkit_weights"] = recognizer.backend.path.name
    result["ferkit_runtime"] = recognizer.backend.name
    return result


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": 1000 * float(np.median(seconds)), "p95_ms": 1000 * float(np.percentile(seconds, 95)),
            "calls": len(seconds)}


def timing(data: Path, fer_python: str, repeats: int) -> dict[str, Any]:
    import torch

    from ferkit.catalog import crops_per_second
    from ferkit.predict import EmotionRecognizer
    from ferkit.weights import load_model

    face = read_gray(fer_faces(data, "happy")[0])
    image = photo([face], [PHOTO_BOX], 640, 480, seed=0)
    recognizer = EmotionRecognizer(device="cpu")
    for _ in range(5):
        found = recognizer.predict(image)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        recognizer.predict(image)
        seconds.append(time.perf_counter() - start)
    result: dict[str, Any] = {"ferkit photo": {**summary(seconds), "faces": [list(f.box) for f in found]}}
    with tempfile.TemporaryDirectory() as tmp:
        cv2.imwrite(str(Path(tmp) / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        fer_photo = run_fer(fer_python, "photo", str(Path(tmp) / "photo.png"), str(repeats))
    result["fer photo"] = {**summary(fer_photo["seconds"]), "faces": fer_photo["faces"]}
    for name in (recognizer.backend.path.stem, "ferkit-resnet"):
        model, meta = load_model(name, "cpu")
        result[f"{name} crops/s"] = crops_per_second(model, meta.preprocessing, seconds=5.0)
    result["fer crops/s"] = run_fer(fer_python, "crops", "20")["crops_per_s"]
    result["torch_threads"] = torch.get_num_threads()
    result["ferkit_weights"] = recognizer.backend.path.name
    result["ferkit_runtime"] = recognizer.backend.name
    return result


def table(result: dict[str, Any]) -> str:
    acc, tim = result.get("accuracy", {}), result.get("timing", {})

    def pct(row: dict[str, Any] | None, key: str) -> str:
        return "-" if not row or row.get(key) is None else f"{100 * row[key]:.2f}%"

    def ms(row: dict[str, Any] | None) -> str:
        return "-" if not row else f"{row['median_ms']:.1f} / {row['p95_ms']:.1f}"

    name = Path(acc.get("ferkit_weights") or tim.get("ferkit_weights") or "ferkit default").stem
    crops = tim.get(f"{name} crops/s")
    runtime = f" on {tim['ferkit_runtime']}" if tim.get("ferkit_runtime") else ""
    rows = [(f"ferkit default ({name}{runtime}, YuNet, uniform prior)", acc.get("ferkit prior uniform"),
             tim.get("ferkit photo"), crops),
            ("ferkit default, `--prior train`", acc.get("ferkit prior train"), tim.get("ferkit photo"), crops),
            ("fer 25.10.3 (Haar + TFLite)", acc.get("fer"), tim.get("fer photo"), tim.get("fer crops/s"))]
    lines = ["| | PrivateTest accuracy | balanced accuracy | mean corruption accuracy | 640x480 photo, ms "
             "(median / p95) | crops/s |", "|---|---|---|---|---|---|"]
    for label, a, t, c in rows:
        lines.append(f"| {label} | {pct(a, 'accuracy')} | {pct(a, 'balanced_accuracy')} | "
                     f"{pct(a, 'mean_corruption_accuracy')} | {ms(t)} | {'-' if c is None else f'{c:.0f}'} |")
    if tim.get("ferkit-resnet crops/s"):
        lines.append(f"\nferkit-resnet (ten views) crops/s: {tim['ferkit-resnet crops/s']:.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="FER-2013 folder layout")
    parser.add_argument("--fer-python", default="/work/venv-fer/bin/python", help="python of fer's own venv")
    parser.add_argument("--only", choices=("all", "accuracy", "timing"), default="all")
    parser.add_argument("--repeats", type=int, default=200, help="timed photo calls (default: 200)")
    parser.add_argument("--limit-sets", type=int, help="only the first N crop sets (a quick check; 1: clean only)")
    parser.add_argument("--output", type=Path, help="write the JSON here")
    args = parser.parse_args()
    result: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "command": " ".join(sys.argv)}
    if args.only in ("all", "accuracy"):
        result["accuracy"] = accuracy(args.data, args.fer_python, args.limit_sets)
    if args.only in ("all", "timing"):
        result["timing"] = timing(args.data, args.fer_python, args.repeats)
    print(table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
