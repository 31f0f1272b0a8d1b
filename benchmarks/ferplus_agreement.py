"""Where a FER+ model's misses lie: accuracy by how strongly the ten taggers agreed, on FER2013Valid.

    python benchmarks/ferplus_agreement.py --data ../shared/data/ferplus ferkit-resnet-ferplus

The validation split only, FER+'s majority protocol (3,199 faces), raw logits of one view. Each face's
agreement is its majority's share of the votes left after FER+'s outlier removal (single votes dropped).
For scale, the same table gives how often one tagger, drawn at random from a face's remaining votes, names
its majority: a human's accuracy under this protocol (printed first for every split, from the votes alone).
A miss is "the runner-up" when the model named the emotion with the second most votes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ferkit.evaluate import labelled_data, split_logits
from ferkit.votes import NUM_EMOTION_VOTES, majority_labels, outliers_removed
from ferkit.weights import load_model, resolve_weights

BINS = ((0.5, 0.6), (0.6, 0.8), (0.8, 1.0), (1.0, 1.01))  # the majority's share: > 1/2 always


def majority_votes(votes: np.ndarray | None) -> np.ndarray:
    """The votes, outliers removed, of the faces with a majority (the protocol's faces, in their order)."""
    if votes is None:
        raise SystemExit("every split needs its votes: --data must be FER+")
    return outliers_removed(votes[majority_labels(votes) >= 0]).astype(np.float64)


def majority_share(votes: np.ndarray) -> np.ndarray:
    return votes.max(1) / votes.sum(1)


def agreement_table(predictions: np.ndarray, votes: np.ndarray, labels: np.ndarray) -> list[str]:
    """One line per agreement bin and one for all faces: faces, model accuracy, one tagger's, runner-up misses."""
    share = majority_share(votes)
    emotions = votes[:, :NUM_EMOTION_VOTES].copy()
    emotions[np.arange(len(labels)), labels] = -1
    runner_up = np.where(emotions.max(1) > 0, emotions.argmax(1), -1)  # none where the vote was unanimous
    lines = []
    for low, high in (*BINS, (0.5, 1.01)):
        chosen = (share > low if low == 0.5 else share >= low) & (share < high)
        right = predictions[chosen] == labels[chosen]
        misses = int((~right).sum())
        near = int((predictions[chosen][~right] == runner_up[chosen][~right]).sum())
        name = "all" if (low, high) == (0.5, 1.01) else ("1" if low == 1.0 else f"{low:.1f}-{high:.1f}")
        lines.append(f"{name:>8} {int(chosen.sum()):6d} {100 * right.mean():7.2f}% {100 * share[chosen].mean():7.2f}% "
                     f"{misses:6d} {near:6d}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="FER+ weights files or shipped names")
    parser.add_argument("--data", help="FER+ source (default: $FERKIT_DATA)")
    args = parser.parse_args()
    data = labelled_data(args.data)
    if data.all_faces is None:
        parser.error("--data must be FER+ (its votes are what this measures)")
    for split, part in data.all_faces.items():  # the labels alone: no model scores the test split here
        share = majority_share(majority_votes(part.votes))
        print(f"{split}: {len(share)} majority faces, one tagger names the majority {share.mean():.6f} "
              f"({100 * share.mean():.2f}%), unanimous {np.mean(share == 1):.6f} ({100 * np.mean(share == 1):.2f}%)")
    votes, labels = majority_votes(data.all_faces["val"].votes), data["val"].labels  # in `split_logits`' order
    for name in args.weights:
        model, meta = load_model(resolve_weights(name), "cpu")
        raw, _ = split_logits(model, data, "val", torch.device("cpu"), 512, meta.preprocessing)
        print(f"{name}, FER2013Valid majority protocol, one view, raw logits")
        print(f"{'majority':>8} {'faces':>6} {'model':>8} {'tagger':>8} {'misses':>6} {'2nd':>6}")
        print("\n".join(agreement_table(raw.argmax(1), votes, labels)))


if __name__ == "__main__":
    main()
