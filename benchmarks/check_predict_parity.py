"""Check: `ferkit predict`, `ferkit evaluate` and the exported ONNX model give the same labels on PrivateTest.

For every shipped model (or those named), on the PrivateTest image files of the FER-2013 folder layout:

1. `ferkit predict --no-detect --json` (the CLI, in this process, as a user runs it) labels every file;
2. `inference.predict_logits` on the crops as `ferkit evaluate` loads them gives the labels evaluate
   scores, and `evaluate_weights`' accuracy must equal the CLI's;
3. each file alone through `EmotionRecognizer.predict`, the path a single photo takes;
4. `ferkit export` writes the model as ONNX, which then runs on onnxruntime and numpy alone: the
   files decoded with Pillow, fed as uint8 (N, 1, 48, 48), labels the argmax of the logits, the class
   names read from the graph's own metadata. No ferkit code is in that loop.

    .venv/bin/python benchmarks/check_predict_parity.py --data ../shared/data/fer2013 [--weights NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from ferkit.cli import main as ferkit_main
from ferkit.data import load_fer2013, resolve_data_path
from ferkit.evaluate import evaluate_weights
from ferkit.inference import adjusted_logits, predict_logits
from ferkit.predict import EmotionRecognizer
from ferkit.weights import load_model, resolve_weights, shipped_models


def onnx_labels(onnx_path: Path, files: list[Path], batch_size: int = 256) -> list[str]:
    """Labels from the exported graph on onnxruntime, with nothing but Pillow and numpy around it."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["ferkit"])["classes"]
    labels: list[str] = []
    for start in range(0, len(files), batch_size):
        crops = np.stack([np.asarray(Image.open(f).convert("L")) for f in files[start : start + batch_size]])
        logits = session.run(None, {session.get_inputs()[0].name: crops[:, None]})[0]
        labels += [classes[k] for k in logits.argmax(1)]
    return labels


def check_model(weights: str, root: Path, files: list[Path], workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = ferkit_main(["predict", "--no-detect", "--json", "--no-progress", "--prior", "train", "--weights",
                              weights, *map(str, files)])
    records = json.loads(stdout.getvalue())
    names = [f.relative_to(root).as_posix() for f in files]
    predicted = {Path(r["path"]).relative_to(root).as_posix(): r["faces"][0]["label"] for r in records}

    test = load_fer2013(root)["test"]
    model, meta = load_model(resolve_weights(weights))
    # evaluate's labels: the argmax of the calibrated logits (temperature and map) under the training prior
    logits = adjusted_logits(predict_logits(model, test.images, "cpu", preprocessing=meta.preprocessing).numpy(),
                             meta.preprocessing)
    by_evaluate = {str(name): meta.classes[int(k)] for name, k in zip(test.names, logits.argmax(1), strict=True)}
    truth = {str(name): meta.classes[int(y)] for name, y in zip(test.names, test.labels, strict=True)}
    recognizer = EmotionRecognizer(weights, detect=False, prior="train")
    single = {name: recognizer.predict(f)[0].label for name, f in zip(names, files, strict=True)}

    onnx_path = workdir / f"{Path(weights).stem}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        export_status = ferkit_main(["export", "--weights", weights, "--output", str(onnx_path), "--check-images", "0"])
    exported = dict(zip(names, onnx_labels(onnx_path, files), strict=True))

    accuracy = float(np.mean([predicted[n] == truth[n] for n in names]))
    report: dict[str, Any] = {
        "weights": str(resolve_weights(weights)), "views": meta.views, "files": len(files), "cli_status": status,
        "export_status": export_status,
        "predict_vs_evaluate_mismatches": sum(predicted[n] != by_evaluate[n] for n in names),
        "one_at_a_time_vs_evaluate_mismatches": sum(single[n] != by_evaluate[n] for n in names),
        "onnx_vs_evaluate_mismatches": sum(exported[n] != by_evaluate[n] for n in names),
        "predict_accuracy": accuracy,
        "onnx_accuracy": float(np.mean([exported[n] == truth[n] for n in names])),
    }
    if len(files) == len(test):
        report["evaluate_accuracy"] = evaluate_weights(weights, str(root), "test").accuracy
    report["seconds"] = round(time.perf_counter() - started, 1)
    mismatches = sum(report[k] for k in report if k.endswith("_mismatches"))
    report["ok"] = bool(status == 0 and export_status == 0 and mismatches == 0
                        and report.get("evaluate_accuracy", accuracy) == accuracy == report["onnx_accuracy"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="FER-2013 image folder (default: $FERKIT_DATA)")
    parser.add_argument("--weights", nargs="+", help="names, files or run folders (default: every shipped model)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    args = parser.parse_args()
    root = resolve_data_path(args.data)
    files = sorted(root.glob("test/*/PrivateTest_*.jpg"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"no test/*/PrivateTest_*.jpg under {root}", file=sys.stderr)
        return 2
    reports = []
    with tempfile.TemporaryDirectory(prefix="ferkit-parity-") as tmp:
        for weights in args.weights or sorted(shipped_models()):
            reports.append({"name": weights, **check_model(weights, root, files, Path(tmp))})
            print(json.dumps(reports[-1], indent=2), flush=True)
    ok = all(r["ok"] for r in reports)
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
