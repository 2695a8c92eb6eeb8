"""Built-in ResNet-style CNN family: conv stem, BasicBlocks (each one JEI block), pool + Linear
head. IM = global average pool + ``Linear``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from jei_edge.model.backbone import BackboneSpec, register_backbone


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.short is None else self.short(x)))


class PoolHead(nn.Module):
    """Global average pool + Linear (the CNN IM and final head)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


@register_backbone("resnet")
def resnet(num_classes: int = 10, in_chans: int = 1, img_size: int = 16,
           widths: Sequence[int] = (16, 32, 64), blocks_per_stage: Sequence[int] = (2, 2, 2),
           stem: str = "small") -> BackboneSpec:
    """ResNet: one stage per width (stride 2 from the second on), ``blocks_per_stage`` BasicBlocks each.

    ``stem``: ``small`` (3x3 conv, stride 1: for 16-32 px inputs) or ``imagenet`` (7x7 conv, stride 2,
    then 3x3 max-pool, stride 2: ResNet-18/34's stem, for 112-224 px inputs; with widths
    (64, 128, 256, 512) and blocks (2, 2, 2, 2) this is ResNet-18's layout).
    """
    widths, blocks_per_stage = list(widths), list(blocks_per_stage)
    if len(widths) != len(blocks_per_stage):
        raise ValueError("widths and blocks_per_stage must have the same length")
    if stem == "small":
        stem_layers = [nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    elif stem == "imagenet":
        stem_layers = [nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                       nn.MaxPool2d(3, 2, 1)]
    else:
        raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
    stem = nn.Sequential(*stem_layers)
    blocks, channels, cin = [], [], widths[0]
    for s, (w, n) in enumerate(zip(widths, blocks_per_stage)):
        for j in range(n):
            blocks.append(BasicBlock(cin, w, 2 if (s > 0 and j == 0) else 1))
            channels.append(w)
            cin = w
    return BackboneSpec(
        stem=stem, blocks=blocks, head=PoolHead(cin, num_classes),
        make_im=lambda i: PoolHead(channels[i], num_classes),
        input_shape=(in_chans, img_size, img_size), num_classes=num_classes, family="resnet",
    )
