"""CIFAR-10 models (3x32x32 input) and a registry to build them by name.

Parameter counts with the default ``num_classes=10``:

=========  ==========  ==============================================
name       parameters  architecture
=========  ==========  ==============================================
tiny           10,234  2 conv (one with BN) + linear, for tests
alexnet     4,813,642  5 conv (64-192-384-256-256) + 3 linear, dropout
resnet20      269,722  He et al. 2016, 3x3 basic blocks, option A
resnet32      464,154  as resnet20, n=5
resnet44      658,586  as resnet20, n=7
resnet56      853,018  as resnet20, n=9
resnet110   1,727,962  as resnet20, n=18
resnet50   23,520,842  bottleneck (3,4,6,3), CIFAR stem
=========  ==========  ==============================================
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from mpiqsgd.errors import ConfigError

__all__ = [
    "TinyCNN",
    "AlexNetCifar",
    "CifarResNet",
    "ResNet50Cifar",
    "tiny",
    "alexnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet50",
    "MODELS",
    "build_model",
    "count_parameters",
]


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convolutions, weight 1 / bias 0 for BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TinyCNN(nn.Module):
    """Tiny CNN for tests: conv(3->16, BN) -> pool -> conv(16->32, bias) -> pool -> linear.

    Args:
        num_classes: Number of output classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNetCifar(nn.Module):
    """AlexNet adapted to 32x32 inputs.

    Architecture (output sizes for a 3x32x32 input)::

        conv 3->64,    3x3, s1, p1 + ReLU, maxpool 2   -> 64x16x16
        conv 64->192,  5x5, s1, p2 + ReLU, maxpool 2   -> 192x8x8
        conv 192->384, 3x3, s1, p1 + ReLU              -> 384x8x8
        conv 384->256, 3x3, s1, p1 + ReLU              -> 256x8x8
        conv 256->256, 3x3, s1, p1 + ReLU, maxpool 2   -> 256x4x4
        dropout 0.5, linear 4096->512 + ReLU
        dropout 0.5, linear 512->512 + ReLU
        linear 512->num_classes

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability before the first two linear layers.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 4 * 4, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _PadShortcut(nn.Module):
    """Option A shortcut: stride-2 subsampling and zero-padding of the extra channels."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _PadShortcut((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. 2016 (Sec. 4.2) with option A shortcuts.

    A 3x3 conv (16 channels), then 3 stages of ``n = (depth - 2) / 6`` basic blocks
    with 16, 32 and 64 channels (stages 2 and 3 start with stride 2), global average
    pooling and a linear layer.

    Args:
        depth: Network depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Number of output classes.

    Raises:
        ConfigError: If ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, n, stride=1)
        self.layer2 = self._make_stage(32, n, stride=2)
        self.layer3 = self._make_stage(64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet50Cifar(nn.Module):
    """Bottleneck ResNet-50 with a CIFAR stem.

    Stem: 3x3 conv (64 channels, stride 1) + BN + ReLU, no maxpool. Then 4 stages of
    (3, 4, 6, 3) bottleneck blocks with widths 64/128/256/512 and expansion 4 (stride 2
    on the 3x3 conv of the first block of stages 2-4, projection shortcuts), global
    average pooling and a linear layer.

    Args:
        num_classes: Number of output classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.in_planes = 64
        self.layer1 = self._make_stage(64, 3, stride=1)
        self.layer2 = self._make_stage(128, 4, stride=2)
        self.layer3 = self._make_stage(256, 6, stride=2)
        self.layer4 = self._make_stage(512, 3, stride=2)
        self.fc = nn.Linear(512 * _Bottleneck.expansion, num_classes)
        _init_weights(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * _Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


def tiny(num_classes: int = 10) -> nn.Module:
    """Tiny CNN for tests (about 10k parameters)."""
    return TinyCNN(num_classes)


def alexnet(num_classes: int = 10) -> nn.Module:
    """CIFAR-10 AlexNet variant (about 4.8M parameters)."""
    return AlexNetCifar(num_classes)


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (about 0.27M parameters)."""
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> nn.Module:
    """ResNet-32 (about 0.46M parameters)."""
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> nn.Module:
    """ResNet-44 (about 0.66M parameters)."""
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> nn.Module:
    """ResNet-56 (about 0.85M parameters)."""
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> nn.Module:
    """ResNet-110 (about 1.7M parameters)."""
    return CifarResNet(110, num_classes)


def resnet50(num_classes: int = 10) -> nn.Module:
    """Bottleneck ResNet-50 with a CIFAR stem (about 23.5M parameters)."""
    return ResNet50Cifar(num_classes)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "tiny": tiny,
    "alexnet": alexnet,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet50": resnet50,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a registered model.

    Args:
        name: A key of :data:`MODELS`.
        num_classes: Number of output classes (positive).

    Returns:
        The freshly initialised model (in training mode).

    Raises:
        ConfigError: If ``name`` is not registered or ``num_classes`` is not positive.
    """
    factory = MODELS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return factory(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
