"""Function-preserving widening (Net2WiderNet, Chen, Goodfellow & Shlens, ICLR 2016).

A trained narrow model starts a wider model of the same layout (`resnet` -> `resnet_wide`): channel c of
every wide feature map copies channel c mod w of the narrow one, and each weight reading a copied channel
is divided by its number of copies, so the wide model computes what the narrow one did. A little noise on
the weights then lets the copies learn apart; without it they would get the same gradients forever.
"""

from __future__ import annotations

import torch
from torch import nn

_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _LAYERS)]


def widen_problem(narrow: nn.Module, wide: nn.Module) -> str | None:
    """Why `narrow`'s weights cannot be widened into `wide` (None: they can)."""
    narrow_layers, wide_layers = _layers(narrow), _layers(wide)
    pairs = list(zip(narrow_layers, wide_layers, strict=False))
    if len(narrow_layers) != len(wide_layers) or any(type(a) is not type(b) for a, b in pairs):
        return "the two have different layers"
    for a, b in pairs:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            if x.dim() != y.dim() or any(n == 0 or m % n for n, m in zip(x.shape, y.shape, strict=True)):
                return f"a {type(a).__name__}'s {name} of shape {tuple(x.shape)} does not divide {tuple(y.shape)}"
            if x.dim() == 4 and x.shape[2:] != y.shape[2:]:
                return f"a convolution's kernel is {tuple(x.shape[2:])} in one and {tuple(y.shape[2:])} in the other"
    return None


def _copies(narrow: int, wide: int) -> torch.Tensor:
    """Which narrow channel each wide channel copies."""
    return torch.arange(wide) % narrow


@torch.no_grad()
def widen_into(narrow: nn.Module, wide: nn.Module, noise: float = 0.01) -> None:
    """Load `narrow`'s weights into the wider `wide` so that both compute the same function, then add
    Gaussian noise of `noise` times each weight tensor's standard deviation (0: exact copies)."""
    problem = widen_problem(narrow, wide)
    if problem is not None:
        raise ValueError(f"cannot widen {type(narrow).__name__} into {type(wide).__name__}: {problem}")
    for a, b in zip(_layers(narrow), _layers(wide), strict=True):
        source, target = a.state_dict(), b.state_dict()  # views of the layers' tensors
        for name, x in source.items():
            y = target[name]
            if x.dim() == 0:  # BatchNorm's num_batches_tracked
                y.copy_(x)
                continue
            copied = x[_copies(x.shape[0], y.shape[0])]
            if name == "weight" and x.dim() > 1:  # a convolution's or linear layer's, reading copied channels
                copied = copied[:, _copies(x.shape[1], y.shape[1])] / (y.shape[1] // x.shape[1])
                copied = copied + noise * x.std() * torch.randn_like(copied)
            y.copy_(copied)
