"""Check: `ferkit predict --no-detect` on the PrivateTest crops gives exactly the predictions `ferkit evaluate` scores.

Runs the CLI (in this process) as a user would, on the image files of the FER-2013 folder layout, then
compares each file's label with the argmax of `evaluate.predict_logits` on the same image as
`ferkit evaluate` loads it, and the accuracy of the CLI's labels with `evaluate_weights`' accuracy.
Each file also goes alone through `EmotionRecognizer.predict`, the path of a single photo.

    .venv/bin/python benchmarks/check_predict_parity.py --data ../shared/data/fer2013 [--weights seed]
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

import numpy as np

from ferkit.cli import main as ferkit_main
from ferkit.data import load_fer2013, resolve_data_path
from ferkit.evaluate import evaluate_weights, predict_logits
from ferkit.labels import EMOTION_TO_ID
from ferkit.predict import EmotionRecognizer
from ferkit.weights import load_model, resolve_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="FER-2013 image folder (default: $FERKIT_DATA)")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    args = parser.parse_args()
    root = resolve_data_path(args.data)
    files = sorted(root.glob("test/*/PrivateTest_*.jpg"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"no test/*/PrivateTest_*.jpg under {root}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = ferkit_main(["predict", "--no-detect", "--json", "--no-progress", "--weights", args.weights,
                              *map(str, files)])
    cli_seconds = time.perf_counter() - started
    records = json.loads(stdout.getvalue())
    predicted = {Path(r["path"]).relative_to(root).as_posix(): r["faces"][0]["label"] for r in records}

    test = load_fer2013(root)["test"]
    model, meta = load_model(resolve_weights(args.weights))
    logits = predict_logits(model, test.images, "cpu", tta=meta.tta)
    by_name = {str(name): meta.classes[int(k)] for name, k in zip(test.names, logits.argmax(1), strict=True)}
    truth = {str(name): meta.classes[int(y)] for name, y in zip(test.names, test.labels, strict=True)}
    mismatches = [name for name in predicted if predicted[name] != by_name[name]]
    # One file at a time through the API too: the path a single photo takes (batches of one).
    recognizer = EmotionRecognizer(args.weights, detect=False)
    single = {f.relative_to(root).as_posix(): recognizer.predict(f)[0].label for f in files}
    single_mismatches = [name for name in single if single[name] != by_name[name]]
    accuracy = float(np.mean([predicted[n] == truth[n] for n in predicted]))
    report = {
        "weights": str(resolve_weights(args.weights)), "files": len(files), "cli_status": status,
        "cli_seconds": round(cli_seconds, 1), "label_mismatches": len(mismatches), "examples": mismatches[:5],
        "one_at_a_time_mismatches": len(single_mismatches),
        "cli_accuracy": accuracy,
    }
    if len(files) == len(test):
        report["evaluate_accuracy"] = evaluate_weights(args.weights, str(root), "test",
                                                       out=tempfile.mkdtemp(prefix="ferkit-parity-"))["accuracy"]
    assert all(EMOTION_TO_ID.get(label) is not None for label in predicted.values())
    print(json.dumps(report, indent=2))
    ok = status == 0 and not mismatches and not single_mismatches
    ok = ok and report.get("evaluate_accuracy", accuracy) == accuracy
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
