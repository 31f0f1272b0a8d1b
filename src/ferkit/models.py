"""Model architectures and the registry that builds them by name.

Nothing here knows about training: a model maps a (N, 1, 48, 48) batch normalised to [-1, 1]
to (N, num_classes) logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .labels import NUM_CLASSES

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(factory: ModelFactory) -> ModelFactory:
    """Decorator: make `factory` buildable as `create_model(factory.__name__)`."""
    if factory.__name__ in _REGISTRY:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    _REGISTRY[factory.__name__] = factory
    return factory


def list_models() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """Build the architecture registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 48) -> int:
    """Multiply-adds of one forward pass on one image, counted over conv and linear layers."""
    macs = 0

    def conv_hook(module: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += out[0].numel() * kernel

    def linear_hook(module: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        macs += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return macs


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv 3x3 (padding 1) + BatchNorm + ReLU + MaxPool 2x2: halves the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SeedCNN(nn.Module):
    """The reference CNN: four conv blocks (48 -> 24 -> 12 -> 6 -> 3), then two linear layers."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, 32), conv_block(32, 64), conv_block(64, 128), conv_block(128, 256)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 3 * 3, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def seed(num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference model: 980,679 parameters, about 33 M multiply-adds per image."""
    return SeedCNN(num_classes)
