"""The confidence step on PublicTest only: out-of-fold ECE and NLL of an affine map alone and followed by the step,
for each pseudo-count, for several models (`ferkit.calibration`). PrivateTest is not read.

    python benchmarks/calibration_step.py --data ../shared/data/fer2013 ferkit-resnet-robust-v2 \\
        ferkit-resnet-robust ferkit-resnet > docs/results/calibration/step/cross_validation.txt

5 stratified folds, 3 seeded repeats: each fold's temperature, map and step are fitted on the other four.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from ferkit.calibration import calibration_error, fit_confidence_step, fit_map, stratified_folds
from ferkit.evaluate import labelled_data
from ferkit.inference import confidence_step, predict_logits
from ferkit.weights import load_model, resolve_weights

PSEUDO_COUNTS = (0.0, 1.0, 3.0, 10.0)


def out_of_fold(logits: np.ndarray, targets: np.ndarray, family: str, strength: float, seed: int
                ) -> dict[str, np.ndarray]:
    """Out-of-fold calibrated logits: the map alone ("map") and with the step at each pseudo-count."""
    fold = stratified_folds(targets, 5, seed)
    out = {name: np.zeros_like(logits) for name in ("map", *map(str, PSEUDO_COUNTS))}
    for f in range(5):
        held = fold == f
        fitted = fit_map(logits[~held], targets[~held], family, strength)
        out["map"][held] = fitted.apply(logits[held])
        for count in PSEUDO_COUNTS:
            knots, values = fit_confidence_step(fitted.apply(logits[~held]), targets[~held], count)
            out[str(count)][held] = confidence_step(torch.from_numpy(out["map"][held]), torch.from_numpy(knots),
                                                    torch.from_numpy(values)).numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="weights files or shipped names")
    parser.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA)")
    parser.add_argument("--map", default="vector", choices=("temperature", "vector", "matrix"))
    parser.add_argument("--strength", type=float, default=1e-4)
    args = parser.parse_args()
    val = labelled_data(args.data)["val"]
    print(f"PublicTest ({len(val.labels)} faces), {args.map} map (L2 {args.strength:g}), 5 folds x 3 repeats: "
          "out-of-fold ECE (15 bins) / NLL / highest probability")
    for name in args.weights:
        model, meta = load_model(resolve_weights(name), "cpu")
        raw = predict_logits(model, val.images, "cpu", 512, meta.preprocessing).numpy().astype(np.float64)
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for seed in range(3):
            for key, z in out_of_fold(raw, val.labels, args.map, args.strength, seed).items():
                p = torch.softmax(torch.from_numpy(z), 1).numpy()
                nll = float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(val.labels).long()))
                rows.setdefault(key, []).append((calibration_error(p, val.labels), nll, float(p.max())))
        for key, scores in rows.items():
            ece, nll, top = np.mean(scores, 0)
            label = "map alone" if key == "map" else f"map + step, pseudo-count {float(key):g}"
            print(f"{name:<28} {label:<32} ECE {ece:.4f}  NLL {nll:.4f}  max p {top:.4f}")


if __name__ == "__main__":
    main()
