"""A CIFAR-style ResNet (He et al. 2016, section 4.2) with skips through :class:`EntangledSkip`."""

from __future__ import annotations

from torch import Tensor, nn

from ..modules import EntangledSkip


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual add through ``self.skip``.

    ``y = relu(skip(s, bn2(conv2(relu(bn1(conv1(x)))))))`` with ``s = x`` when the block
    keeps the shape, else ``s = downsample(x)`` (a projection: 1x1 convolution with
    stride, then batch norm; ``downsample`` is ``None`` otherwise, as in torchvision).
    ``skip(s, r)`` is ``alpha * (s @ M^T) + r`` over the channels (``M = I``,
    ``alpha = 1`` until :func:`entskip.entangle` replaces it; it converts only blocks
    without ``downsample``).

    Shapes: ``x (N, in_channels, H, W)`` -> ``(N, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.skip = EntangledSkip(out_channels, feature_dim=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.skip(shortcut, out))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages of ``(depth - 2) / 6`` :class:`BasicBlock`\\ s.

    Stage widths ``(width, 2 width, 4 width)`` with strides ``(1, 2, 2)``; the first
    block of stages 2 and 3 has a projection shortcut (``downsample``), every other
    block an identity one (``3 (depth - 2) / 6 - 2`` convertible skips). Then global average pooling and
    a linear classifier. ``depth=20, width=16`` is He et al.'s ResNet-20.

    Args:
        depth: total number of weighted layers, ``6 n + 2`` with ``n >= 1``.
        width: channels of the stem and the first stage.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Shapes: ``x (N, in_channels, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
            for i in range(blocks):
                layers.append(BasicBlock(channels, out, stride if i == 0 else 1))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.layers(self.stem(x))).flatten(1))
