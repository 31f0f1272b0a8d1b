"""Time to the reference's accuracy: a whole `--preset fast` run, timed, then scored on PrivateTest.

The run selects its checkpoint on the validation split, as every ferkit run does; the test split is
scored once, at the end, with the preset's test-time augmentation. The clock covers everything a
user waits for after the data is cached: model set-up, every epoch with its validation pass,
checkpoints, and the final test evaluation and figures.

    python benchmarks/bench_time_to_accuracy.py --data ../shared/data/fer2013 [--preset fast] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ferkit.data import load_fer2013
from ferkit.runs import read_metrics_csv
from ferkit.train import TrainConfig, fit

REFERENCE_ACCURACY = 0.6333


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    data = load_fer2013(args.data)
    load_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.run_dir or Path(tmp) / "run")
        config = TrainConfig.from_preset(args.preset, run_dir=str(out), data=args.data, progress=False)
        start = time.perf_counter()
        fit(config, data)
        wall = time.perf_counter() - start
        test = json.loads((out / "test_metrics.json").read_text())
        epochs = read_metrics_csv(out / "metrics.csv")
    result = {
        "preset": args.preset,
        "epochs": len(epochs),
        "data_load_s": load_seconds,
        "wall_s": wall,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "views": test["views"],
        "best_epoch": test["best_epoch"],
        "reached_reference": test["accuracy"] >= REFERENCE_ACCURACY,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    verdict = "reached" if result["reached_reference"] else "did NOT reach"
    print(f"--preset {args.preset}: {len(epochs)} epochs in {wall / 60:.1f} min (data load {load_seconds:.1f} s); "
          f"PrivateTest accuracy {100 * test['accuracy']:.2f}% ({test['views']} view(s)): {verdict} the reference's "
          f"{100 * REFERENCE_ACCURACY:.2f}% in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
