"""ResNet-34 feature extractor, written out so that inference does not import torchvision.

The modules, their names and their initialisation are those of ``torchvision.models.resnet34``
(He et al., 2016: basic blocks, [3, 4, 6, 3] per stage), so a state dict saved from either loads
into the other unchanged (``Testing/test_model_and_similarity.py`` checks names, shapes and
outputs against torchvision). Importing torchvision costs about 1.2 s of a command line's start;
this file costs nothing beyond torch.

Input ``(B, C, H, W)``; output ``(B, 512)`` features (global average pool; no classifier).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetFeatures", "resnet34_features"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norms and a residual connection (torchvision's names)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetFeatures(nn.Module):
    """Stem (7x7 convolution, batch norm, ReLU, max pool), four stages of basic blocks, global
    average pool, and ``fc = Identity`` (kept so the module tree matches torchvision's)."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), in_channels: int = 3, initialise: bool = True) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        # torchvision's initialisation; ``initialise=False`` skips it for a network whose weights are
        # loaded next (model.load_model builds it on the meta device: initialising there would
        # import torch._dynamo, 1.4 s)
        for m in (self.modules() if initialise else ()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        modules = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        modules += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 512)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34_features(in_channels: int = 2, initialise: bool = True) -> ResNetFeatures:
    """A ResNet-34 feature extractor taking ``in_channels`` input channels (the network's pairs: 2);
    ``initialise``: torchvision's random initialisation (False: left as allocated, to load weights into)."""
    return ResNetFeatures((3, 4, 6, 3), in_channels, initialise)
