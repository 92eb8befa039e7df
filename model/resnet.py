"""The MedMNIST v2 baselines of Table 2: ResNet-18 / ResNet-50 in 2.5D, 3D and ACS forms.

As in the MedMNIST reference experiments, the network is written once in 2D (CIFAR-style: a 3 x 3 stride-1
stem without max-pool, stages of w, 2w, 4w, 8w channels with strides 1, 2, 2, 2, global average pooling and a
linear head) and then converted layer by layer to a volumetric network by `model.convert` (2.5D: 1 x k x k
kernels; 3D: k x k x k kernels inflated from the 2D ones; ACS: the output channels split over the three
planes). The 2D initialisation (Kaiming-normal fan-out convolutions, BN weight 1 and bias 0) carries over.

Parameter counts at width 64 with one input channel and two classes: ResNet-18 11.17 M (2.5D, ACS) and
33.14 M (3D); ResNet-50 23.50 M (2.5D, ACS) and 46.14 M (3D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from model.convert import MODES, convert_2d_to_3d
from model.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet2d", "resnet2d", "ResNetConfig", "build_resnet", "ARCHS"]


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions (the first strided) and an identity or 1 x 1 projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (strided), 1 x 1 expand (x4), and an identity or 1 x 1 projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet2d(nn.Module):
    """CIFAR-style ResNet: 3 x 3 stem (stride 1, no max-pool), four stages, global average pool, linear head.

    The layers are written with 2D modules; `model.convert.convert_2d_to_3d` turns the same tree into a
    volumetric network (the forward pass does not depend on the dimensionality).
    """

    def __init__(self, block: type, layers: list[int], in_channels: int = 1, num_classes: int = 2, width: int = 64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(block, width, layers[0], 1)
        self.layer2 = self._make_stage(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_stage(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_stage(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation (the linear head keeps its default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = []
        for s in [stride] + [1] * (blocks - 1):
            stage.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def resnet2d(arch: str, in_channels: int = 1, num_classes: int = 2, width: int = 64) -> ResNet2d:
    """The 2D network `arch` (`resnet18` or `resnet50`)."""
    block, layers = ARCHS[arch]
    return ResNet2d(block, layers, in_channels, num_classes, width)


@dataclass
class ResNetConfig:
    width: int = field(default=64, metadata={
        "min": 1, "help": "channels of the first stage (stages: w, 2w, 4w, 8w); 64 is the MedMNIST baseline"})


def build_resnet(arch: str, mode: str, cfg: ResNetConfig, *, in_channels: int, num_classes: int,
                 input_size: int) -> nn.Module:
    """The 2D `arch` converted to `mode` (`2.5d`, `3d` or `acs`); forward takes (B, C, S, S, S)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    return convert_2d_to_3d(resnet2d(arch, in_channels, num_classes, cfg.width), mode)


def _register(arch: str, mode: str, label: str, counts: str):
    name = f"{arch}_{mode}"

    def build(cfg: ResNetConfig, *, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
        return build_resnet(arch, mode, cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_{arch}_{mode.replace('.', '_')}"
    register_model(name, ResNetConfig, help=f"MedMNIST baseline {label} ({counts} parameters at width 64)")(build)


_MODE_TEXT = {"2.5d": "2.5D (1 x k x k kernels shared across slices)",
              "3d": "3D (k x k x k kernels inflated from 2D)",
              "acs": "ACS (axial/coronal/sagittal channel groups)"}
_COUNTS = {("resnet18", "3d"): "33.14 M", ("resnet18", "2.5d"): "11.17 M", ("resnet18", "acs"): "11.17 M",
           ("resnet50", "3d"): "46.14 M", ("resnet50", "2.5d"): "23.50 M", ("resnet50", "acs"): "23.50 M"}

for _arch, _label in (("resnet18", "ResNet-18"), ("resnet50", "ResNet-50")):
    for _mode in MODES:
        _register(_arch, _mode, f"{_label} {_MODE_TEXT[_mode]}", _COUNTS[_arch, _mode])
