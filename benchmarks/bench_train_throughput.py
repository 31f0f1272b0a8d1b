"""Training throughput of ferkit's pipeline against a per-sample PIL pipeline and the bare model step.

Measures, in one run and on the same real FER-2013 training images:
  ferkit      : the full `train_one_epoch` path (uint8 tensors on the device, batched flip and
                rotation, normalisation, channels-last, bf16 autocast where the CPU has it, Adam step);
  per-sample  : the usual pipeline, PIL flip and rotation per image in a torch DataLoader with
                2 workers, batch 64, then a plain float32 step;
  bare step   : forward, backward and Adam on batches normalised in advance and held in memory,
                with ferkit's step settings, nothing else: the ceiling for any data path.
Also the cold (decode every file) and warm (cache hit) data-load times.

    python benchmarks/bench_train_throughput.py --data ../shared/data/fer2013 [--images 3840] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ferkit.augment import AugmentConfig
from ferkit.data import load_fer2013
from ferkit.inference import normalize, to_tensor
from ferkit.losses import Criterion
from ferkit.models import create_model
from ferkit.train import StepContext, autocast_dtype, train_one_epoch

BATCH = 64


class PerSampleDataset(Dataset):
    """What most FER repositories do: one PIL image at a time, flipped and rotated in a worker."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        if torch.rand(()) < 0.5:
            image = ImageOps.mirror(image)
        image = image.rotate(float(torch.empty(()).uniform_(-10, 10)), resample=Image.Resampling.NEAREST)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        return normalize(pixels), int(self.labels[i])


def measure_ferkit(images: np.ndarray, labels: np.ndarray, epochs: int) -> float:
    device = torch.device("cpu")
    model = create_model("refcnn").to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctx = StepContext(device, AugmentConfig(), autocast_dtype(device, True), channels_last=True)
    x, y = to_tensor(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(0)
    train_one_epoch(model, Criterion(), optimizer, x[: 10 * BATCH], y[: 10 * BATCH], ctx, BATCH, generator)  # warm-up
    start = time.perf_counter()
    for _ in range(epochs):
        train_one_epoch(model, Criterion(), optimizer, x, y, ctx, BATCH, generator)
    return epochs * len(labels) / (time.perf_counter() - start)


def measure_per_sample(images: np.ndarray, labels: np.ndarray, epochs: int) -> float:
    model = create_model("refcnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(PerSampleDataset(images, labels), batch_size=BATCH, shuffle=True, num_workers=2,
                        persistent_workers=True)
    model.train()

    def one_epoch() -> int:
        seen = 0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            seen += len(y)
        return seen

    one_epoch()  # start the workers and warm up
    start = time.perf_counter()
    seen = sum(one_epoch() for _ in range(epochs))
    return seen / (time.perf_counter() - start)


def measure_bare_step(images: np.ndarray, labels: np.ndarray, steps: int) -> float:
    """Steps over batches normalised in advance and held in memory, so no data work is timed.

    The batches cycle rather than one batch repeating: a model fitted to a single batch drives its
    activations towards denormal floats, which slows a CPU down many times over.
    """
    model = create_model("refcnn").to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    dtype = autocast_dtype(torch.device("cpu"), True)
    count = len(labels) // BATCH * BATCH
    x_all = normalize(to_tensor(images[:count]).float() / 255).contiguous(memory_format=torch.channels_last)
    batches = list(zip(x_all.split(BATCH), torch.from_numpy(labels[:count]).split(BATCH), strict=True))
    model.train()

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(10):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * BATCH / (time.perf_counter() - start)


def measure_load(data: str | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_fer2013(data, cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        load_fer2013(data, cache_dir=cache)
        warm = time.perf_counter() - start
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA)")
    parser.add_argument("--images", type=int, default=60 * BATCH, help="training images per pass")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    cold, warm = measure_load(args.data)
    train = load_fer2013(args.data)["train"]
    pick = np.random.default_rng(0).permutation(len(train))[: args.images]
    images, labels = train.images[pick], train.labels[pick]
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "autocast": str(autocast_dtype(torch.device("cpu"), True)),
        "images_per_pass": len(labels),
        "load_cold_s": cold,
        "load_warm_s": warm,
        "per_sample_images_per_s": measure_per_sample(images, labels, args.repeats),
        "bare_step_images_per_s": measure_bare_step(images, labels, args.repeats * len(labels) // BATCH),
        "ferkit_images_per_s": measure_ferkit(images, labels, args.repeats),
    }
    results["ferkit_vs_per_sample"] = results["ferkit_images_per_s"] / results["per_sample_images_per_s"]
    results["ferkit_vs_bare_step"] = results["ferkit_images_per_s"] / results["bare_step_images_per_s"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"data load: cold {cold:.1f} s, warm {warm:.2f} s")
    print(f"{'pipeline':<40}{'images/s':>10}")
    print(f"{'per-sample PIL + DataLoader(2 workers)':<40}{results['per_sample_images_per_s']:>10.0f}")
    print(f"{'bare step (fixed batch)':<40}{results['bare_step_images_per_s']:>10.0f}")
    print(f"{'ferkit full pipeline':<40}{results['ferkit_images_per_s']:>10.0f}")
    print(f"ferkit / per-sample: {results['ferkit_vs_per_sample']:.2f}x (target >= 1.5x); "
          f"ferkit / bare step: {results['ferkit_vs_bare_step']:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
