"""Model architectures and the registry that builds them by name.

Nothing here knows about training: a model maps a (N, 1, 48, 48) batch normalised to [-1, 1]
to (N, num_classes) logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .deprecations import resolve
from .errors import UsageError
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
    """Build the architecture registered as `name` (an old name: see `ferkit.deprecations`)."""
    if name not in _REGISTRY:
        name = resolve("architecture", name)
    if name not in _REGISTRY:
        raise UsageError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
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


class ReferenceCNN(nn.Module):
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
def refcnn(num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference model: 980,679 parameters, about 33 M multiply-adds per image."""
    return ReferenceCNN(num_classes)


class VGGNet(nn.Module):
    """VGG-style: stages of (Conv 3x3 + BN + ReLU) x depth then MaxPool, a dropout MLP head.

    Sized for 48x48 inputs after Khaireddin & Chen (2021), the strongest published single FER-2013
    model without extra data; `widths` trades accuracy for speed on small machines.
    """

    def __init__(
        self, widths: tuple[int, ...], depth: int = 2, hidden: int = 512, dropout: float = 0.4,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for width in widths:
            for _ in range(depth):
                layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                in_channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = 48 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016), projecting when the shape changes or when
    `project` asks (so a stage's first block has the same parameters whatever its stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if project or stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style for 48x48: a full-resolution 3x3 stem, four stages of basic blocks, each opening with its
    stride (by default 2: 48 -> 24 -> 12 -> 6 -> 3), global average pooling, dropout, linear.

    The strides change the cost and the resolution the stages see, not the parameters: models that differ
    only in strides load each other's weights.
    """

    def __init__(
        self, widths: tuple[int, ...], blocks: tuple[int, ...], dropout: float = 0.2, num_classes: int = NUM_CLASSES,
        strides: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for width, count, stride in zip(widths, blocks, strides, strict=True):
            for i in range(count):
                stages.append(BasicBlock(in_channels, width, stride=stride if i == 0 else 1, project=i == 0))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model
def vgg(num_classes: int = NUM_CLASSES) -> nn.Module:
    """VGG-style, widths 64-128-256-512, two convs a stage: 7.0 M parameters, 471 M multiply-adds."""
    return VGGNet((64, 128, 256, 512), num_classes=num_classes)


@register_model
def vgg_small(num_classes: int = NUM_CLASSES) -> nn.Module:
    """VGG-style at half width, widths 32-64-128-256: 1.8 M parameters, 118 M multiply-adds."""
    return VGGNet((32, 64, 128, 256), hidden=256, num_classes=num_classes)


@register_model
def resnet(num_classes: int = NUM_CLASSES) -> nn.Module:
    """ResNet-18-style, widths 32-64-128-256, two blocks a stage: 2.8 M parameters, 79 M multiply-adds."""
    return ResNet((32, 64, 128, 256), (2, 2, 2, 2), num_classes=num_classes)


@register_model
def resnet_hr(num_classes: int = NUM_CLASSES) -> nn.Module:
    """`resnet` with its first stage at full resolution (48 -> 48 -> 24 -> 12 -> 6), loading `resnet`
    weights: the same 2.8 M parameters, 314 M multiply-adds (4x)."""
    return ResNet((32, 64, 128, 256), (2, 2, 2, 2), num_classes=num_classes, strides=(1, 2, 2, 2))


@register_model
def resnet_wide(num_classes: int = NUM_CLASSES) -> nn.Module:
    """`resnet` at twice the width, 64-128-256-512 (ResNet-18's): 11.2 M parameters, 315 M multiply-adds;
    `--init` widens `resnet` weights into it (`ferkit.widen`)."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes)
