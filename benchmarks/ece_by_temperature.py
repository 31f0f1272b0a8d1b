"""Can a temperature calibrate a model at all? Its PublicTest (validation) ECE at T = 0.5, 0.55, ..., 2.

`ferkit calibrate` fits the temperature that minimises validation NLL. When even the best temperature
on the grid leaves the validation ECE high, on the very faces it is fitted to, the miscalibration
has a shape that one temperature cannot undo, and only another training recipe will fix it. Uses
validation data only; raw logits (the stored temperature and prior are not applied).

    .venv/bin/python benchmarks/ece_by_temperature.py --data ../shared/data/fer2013 \\
        --models ferkit-resnet ferkit-resnet-robust --output docs/results/calibration/ece_by_temperature.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit.data import load_fer2013
from ferkit.evaluate import expected_calibration_error, fit_temperature
from ferkit.inference import predict_logits
from ferkit.weights import load_model

GRID = tuple(round(float(t), 2) for t in np.arange(0.5, 2.01, 0.05))


def scan(model_name: str, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    model, meta = load_model(model_name, torch.device("cpu"))
    logits = predict_logits(model, images, torch.device("cpu"), 512, meta.preprocessing).float()
    targets = torch.as_tensor(labels, dtype=torch.long)
    by_temperature = {t: expected_calibration_error(logits / t, targets) for t in GRID}
    lowest = min(by_temperature, key=by_temperature.__getitem__)
    fitted = fit_temperature(logits, labels)
    return {"model": model_name, "views": meta.preprocessing.views, "nll_temperature": round(fitted, 3),
            "val_ece_at_1": expected_calibration_error(logits, targets),
            "val_ece_at_nll_temperature": expected_calibration_error(logits / fitted, targets),
            "lowest_val_ece_on_grid": by_temperature[lowest], "its_temperature": lowest,
            "val_ece_by_temperature": {str(t): round(e, 4) for t, e in by_temperature.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="FER-2013 (default: $FERKIT_DATA)")
    parser.add_argument("--models", nargs="+", default=["ferkit-resnet", "ferkit-resnet-robust"])
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    val = load_fer2013(args.data)["val"]
    rows = [scan(name, val.images, val.labels) for name in args.models]
    print("| model | views | T (NLL) | val ECE at T=1 | at T (NLL) | lowest on the grid (T) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['views']} | {row['nll_temperature']} | {row['val_ece_at_1']:.3f} | "
              f"{row['val_ece_at_nll_temperature']:.3f} | {row['lowest_val_ece_on_grid']:.3f} "
              f"({row['its_temperature']}) |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"split": "val", "grid": list(GRID), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
