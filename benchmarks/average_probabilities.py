"""Validation accuracy of models alone and of the mean of their probabilities: does an average promise more?

    python benchmarks/average_probabilities.py --data ../shared/data/fer2013 ferkit-resnet ferkit-resnet-robust-v2
    python benchmarks/average_probabilities.py --data ../shared/data/ferplus runs/ferplus/best.safetensors \\
        runs/ferplus-40/best.safetensors runs/ferplus-robust/best.safetensors

The validation split only (PublicTest; FER2013Valid under FER+'s majority protocol): each model with its own
views, raw logits (no calibration), then every combination of two or more, averaged with equal weights.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from ferkit.evaluate import labelled_data, split_logits
from ferkit.weights import load_model, resolve_weights


def share(probabilities: np.ndarray, labels: np.ndarray) -> str:
    accuracy = float(np.mean(probabilities.argmax(1) == labels))
    return f"accuracy {accuracy:.6f} ({100 * accuracy:.2f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="weights files or shipped names, of one class list")
    parser.add_argument("--data", help="FER-2013 or FER+ source (default: $FERKIT_DATA)")
    args = parser.parse_args()
    data = labelled_data(args.data)
    labels = data["val"].labels
    probabilities = {}
    for name in args.weights:
        model, meta = load_model(resolve_weights(name), "cpu")
        raw, _ = split_logits(model, data, "val", torch.device("cpu"), 512, meta.preprocessing)
        probabilities[name] = torch.softmax(torch.from_numpy(raw).double(), 1).numpy()
        print(f"{name} ({meta.views} view(s)): {share(probabilities[name], labels)}")
    for size in range(2, len(probabilities) + 1):
        for names in itertools.combinations(probabilities, size):
            mean = np.mean([probabilities[n] for n in names], axis=0)
            print(f"mean of {' + '.join(names)}: {share(mean, labels)}")
    print(f"({len(labels)} validation faces, {data.labels} labels)")


if __name__ == "__main__":
    main()
