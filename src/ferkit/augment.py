"""Training-time augmentation, on whole batches of tensors on the training device.

Normalisation comes from `ferkit.inference`, the one place that turns uint8 crops into model input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .inference import normalize


@dataclass
class AugmentConfig:
    """Training augmentation; the defaults are the reference's (flip, rotation within +-10 degrees).

    The camera augmentations (all off by default) prepare a model for faces that other cameras,
    lighting and detectors deliver: `scale_jitter`/`aspect_jitter` zoom each face by up to that
    fraction (tighter or looser framing) and stretch it; `brightness`, `contrast` and `gamma` are
    +- ranges; `blur`, `noise`, `jpeg` and `downsample` are the probabilities that a face is
    blurred, gets sensor noise, is JPEG-compressed, or is shrunk to 16-40 px and enlarged again.
    `mixup` and `cutmix` mix pairs of faces and their targets (`mix_batch`). Each field is one
    `ferkit train` option of the same name (`TrainConfig.augment` holds this config).
    """

    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    rotate_degrees: float = field(default=10.0, metadata={"help": "random rotation range, +-degrees"})
    shift_pixels: int = field(default=0, metadata={"help": "random crop of the zero-padded image, +-pixels"})
    erasing: float = field(default=0.0, metadata={"help": "random-erasing probability"})
    scale_jitter: float = field(default=0.0, metadata={"help": "camera: random zoom by up to this fraction (framing)"})
    aspect_jitter: float = field(default=0.0, metadata={"help": "camera: random width/height stretch, fraction"})
    brightness: float = field(default=0.0, metadata={"help": "camera: random brightness, +- fraction"})
    contrast: float = field(default=0.0, metadata={"help": "camera: random contrast, +- fraction"})
    gamma: float = field(default=0.0, metadata={"help": "camera: random gamma, +- fraction"})
    blur: float = field(default=0.0, metadata={"help": "camera: Gaussian-blur probability"})
    noise: float = field(default=0.0, metadata={"help": "camera: sensor-noise probability"})
    jpeg: float = field(default=0.0, metadata={"help": "camera: JPEG-compression probability (quality 20-80)"})
    downsample: float = field(default=0.0, metadata={"help": "camera: shrink-to-16-40-px-and-back probability"})
    mixup: float = field(default=0.0, metadata={"help": "mixup Beta alpha (0: off)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix Beta alpha (0: off)"})

    @property
    def geometric(self) -> bool:
        return self.rotate_degrees > 0 or self.shift_pixels > 0 or self.scale_jitter > 0 or self.aspect_jitter > 0


def random_hflip(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)


def random_affine(
    batch: torch.Tensor, degrees: float, shift_pixels: int = 0, generator: torch.Generator | None = None,
    scale_jitter: float = 0.0, aspect_jitter: float = 0.0,
) -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees] about its centre and shift it by up
    to `shift_pixels` (a random crop of the zero-padded image), filling with 0; with `scale_jitter`
    also zoom it by a factor in [1 - s, 1 + s] and with `aspect_jitter` stretch its width against its
    height by up to that fraction.

    Nearest-neighbour sampling and black fill, like torchvision's RandomRotation defaults.
    """
    n, _, height, width = batch.shape
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    shifts = torch.randint(-shift_pixels, shift_pixels + 1, (n, 2), generator=generator).float()
    cos, sin = angles.cos(), angles.sin()
    tx, ty = shifts[:, 0] * 2 / width, shifts[:, 1] * 2 / height
    if scale_jitter > 0 or aspect_jitter > 0:
        # The sampling grid maps output to input: a zoom of z samples a 1/z-sized region.
        zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale_jitter
        stretch = 1 + (torch.rand(n, generator=generator) * 2 - 1) * aspect_jitter
        sx, sy = 1 / (zoom * stretch.sqrt()), 1 / (zoom / stretch.sqrt())
        theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1)
    else:
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(batch.device, batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_erasing(
    batch: torch.Tensor, probability: float, generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 0.25), aspect: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Blank one random rectangle (2-25% of the image) in each image with the given probability."""
    n, _, height, width = batch.shape
    log_aspect = torch.empty(n).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=generator)
    box_area = torch.empty(n).uniform_(*area, generator=generator) * height * width
    box_h = (box_area / log_aspect.exp()).sqrt().clamp(1, height)
    box_w = (box_area * log_aspect.exp()).sqrt().clamp(1, width)
    top = torch.rand(n, generator=generator) * (height - box_h)
    left = torch.rand(n, generator=generator) * (width - box_w)
    apply = torch.rand(n, generator=generator) < probability
    rows = torch.arange(height).view(1, -1)
    cols = torch.arange(width).view(1, -1)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + box_h).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + box_w).view(-1, 1))
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1) & apply.view(-1, 1, 1)).unsqueeze(1)
    return batch.masked_fill(mask.to(batch.device), 0.0)


def camera_effects(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Lighting, focus, sensor noise, compression and resolution as other cameras give them, on [0, 1] batches.

    kornia's batched augmentations do the work (on any device); they draw from torch's global
    generator, which training seeds per epoch, so runs and resumed runs stay reproducible.
    """
    if not (config.brightness or config.contrast or config.gamma or config.blur or config.noise or config.jpeg
            or config.downsample):
        return batch
    import kornia.augmentation as K

    steps: list[torch.nn.Module] = []
    if config.brightness > 0:
        steps.append(K.RandomBrightness((1 - config.brightness, 1 + config.brightness), p=1.0))
    if config.contrast > 0:
        steps.append(K.RandomContrast((1 - config.contrast, 1 + config.contrast), p=1.0))
    if config.gamma > 0:
        steps.append(K.RandomGamma((1 / (1 + config.gamma), 1 + config.gamma), p=1.0))
    if config.blur > 0:
        steps.append(K.RandomGaussianBlur((5, 5), (0.3, 1.5), p=config.blur))
    for step in steps:
        batch = step(batch).clamp(0, 1)
    if config.downsample > 0:
        batch = random_downsample(batch, config.downsample, generator)
    if config.jpeg > 0:
        batch = random_jpeg(batch, config.jpeg, generator)
    if config.noise > 0:
        batch = K.RandomGaussianNoise(std=0.05, p=config.noise)(batch).clamp(0, 1)
    return batch


def random_downsample(batch: torch.Tensor, probability: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """With `probability`, shrink an image to a random 16-40 px (area averaging) and enlarge it back (bilinear)."""
    n, _, height, width = batch.shape
    chosen = torch.rand(n, generator=generator) < probability
    if not chosen.any():
        return batch
    side = int(torch.randint(16, 41, (1,), generator=generator))  # one size a batch keeps this to two resizes
    # The whole batch goes through and `where` keeps the chosen: boolean indexing would stall a GPU.
    small = F.interpolate(batch, size=(side, side), mode="area")
    blurred = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return torch.where(chosen.to(batch.device).view(-1, 1, 1, 1), blurred, batch)


# JPEG's standard luminance quantisation table (ITU T.81, Annex K, table K.1), at quality 50.
JPEG_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def random_jpeg(batch: torch.Tensor, probability: float, generator: torch.Generator | None = None,
                quality: tuple[float, float] = (20.0, 80.0)) -> torch.Tensor:
    """With `probability`, JPEG-compress a grey [0, 1] face at a random quality in `quality`.

    A baseline JPEG of a grey image is lossy in one place only: each 8x8 block's DCT coefficients are
    rounded to multiples of the quality-scaled luminance table (the entropy coding is lossless). That is
    done here for the whole batch in a few matrix products. kornia's RandomJPEG (a differentiable colour
    codec) ran about 1,700 small tensor operations a batch of 128, more than the rest of a training step
    together, so GPU training waited on kernel launches; on this CPU it took 205 ms a batch against 22 ms
    (measured together). A test holds this to Pillow's encoder.
    """
    n = batch.shape[0]
    chosen = (torch.rand(n, generator=generator) < probability).to(batch.device)
    qualities = torch.empty(n).uniform_(*quality, generator=generator).to(batch.device)
    compressed = jpeg_compress(batch, qualities)
    return torch.where(chosen.view(-1, 1, 1, 1), compressed, batch)


def jpeg_compress(batch: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline-JPEG round trip of (N, 1, H, W) [0, 1] faces, each at its own `quality` (1-100, IJG scaling)."""
    n, _, height, width = batch.shape
    # JPEG works on whole 8x8 blocks, replicating the edge pixels to fill the last ones.
    padded = F.pad(batch, (0, -width % 8, 0, -height % 8), mode="replicate") if (height | width) % 8 else batch
    rows, cols = padded.shape[2] // 8, padded.shape[3] // 8
    blocks = (padded * 255).round().sub(128).view(n, rows, 8, cols, 8).transpose(2, 3)  # (N, rows, cols, 8, 8)
    dct = _dct_matrix(8, batch.device)
    table = _quality_tables(quality).view(n, 1, 1, 8, 8)
    coefficients = ((dct @ blocks @ dct.T) / table).round() * table
    pixels = (dct.T @ coefficients @ dct).add(128).round().clamp(0, 255) / 255
    return pixels.transpose(2, 3).reshape(padded.shape)[..., :height, :width]


def _dct_matrix(size: int, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix: its rows are the cosine bases."""
    k = torch.arange(size, device=device, dtype=torch.float32).view(-1, 1)
    i = torch.arange(size, device=device, dtype=torch.float32).view(1, -1)
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix


def _quality_tables(quality: torch.Tensor) -> torch.Tensor:
    """(N,) qualities -> (N, 8, 8) luminance tables, scaled as libjpeg (IJG) scales them."""
    quality = quality.clamp(1, 100)
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality)
    base = torch.tensor(JPEG_LUMA_TABLE, dtype=torch.float32, device=quality.device).view(1, 8, 8)
    return ((base * scale.floor().view(-1, 1, 1) + 50) / 100).floor().clamp(1, 255)


def train_transform(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (N, 1, 48, 48) on the device -> augmented, normalised float32 batch."""
    batch = images.float() / 255.0
    if config.hflip:
        batch = random_hflip(batch, generator)
    if config.geometric:
        batch = random_affine(batch, config.rotate_degrees, config.shift_pixels, generator, config.scale_jitter,
                              config.aspect_jitter)
    batch = camera_effects(batch, config, generator)
    batch = normalize(batch)
    if config.erasing > 0:
        # Erase after normalising, so the blank is the data's mid-grey (0), as in Zhong et al.
        batch = random_erasing(batch, config.erasing, generator)
    return batch


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (picked at random when both are on) on a batch with soft (N, C) targets.

    `mixup` and `cutmix` are the Beta(alpha, alpha) parameters; 0 turns each off.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=generator) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = _beta(alpha, generator)
    partner = torch.randperm(x.shape[0], generator=generator).to(x.device)
    if use_cutmix:
        x, lam = _paste_box(x, x[partner], lam, generator)
    else:
        x = lam * x + (1 - lam) * x[partner]
    return x, lam * targets + (1 - lam) * targets[partner]


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """A Beta(alpha, alpha) draw, reproducible from `generator` (torch's Beta takes no generator)."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _paste_box(
    x: torch.Tensor, other: torch.Tensor, lam: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, float]:
    """Paste a box covering (1 - lam) of the area from `other` into `x`; returns the true lam."""
    _, _, height, width = x.shape
    cut = math.sqrt(1 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)
