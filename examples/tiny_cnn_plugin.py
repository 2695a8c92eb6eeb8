"""A complete jei-edge backbone plugin: a small CNN split into stem, blocks, head and IMs.

Use it from this folder (no PYTHONPATH needed):

    jei-edge train --plugin tiny_cnn_plugin:tiny_cnn --backbone tiny_cnn_plugin:tiny_cnn \\
        --data digits -o model.pt
    jei-edge build model.pt -o model.jei --plugin tiny_cnn_plugin:tiny_cnn
    jei-edge run model.jei images/

The contract (docs/plugins.md): the factory receives ``num_classes``, ``in_chans`` and ``img_size``
(square inputs) plus any ``--backbone-opt KEY=VALUE``; it returns a ``BackboneSpec`` whose stem maps
``[B, in_chans, img_size, img_size]`` to the hidden state, whose blocks each take and return one
tensor (batch first), whose head and IMs map a hidden state to logits ``[B, num_classes]``.
"""

from torch import nn

from jei_edge.model import BackboneSpec


class ConvBlock(nn.Module):
    """One block: one tensor in, one tensor of the same shape out (a residual 3x3 conv)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, h):
        return h + self.act(self.conv(h))


def _classifier(width: int, num_classes: int) -> nn.Module:
    """hidden [B, width, H, W] -> logits [B, num_classes] (used for the head and every IM)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def tiny_cnn(num_classes: int = 10, in_chans: int = 1, img_size: int = 8, width: int = 16,
             depth: int = 4) -> BackboneSpec:
    """The factory: ``--backbone-opt width=32 --backbone-opt depth=6`` change its size."""
    width, depth = int(width), int(depth)
    return BackboneSpec(
        stem=nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU()),
        blocks=[ConvBlock(width) for _ in range(depth)],
        head=_classifier(width, num_classes),
        make_im=lambda i: _classifier(width, num_classes),  # the IM after block i
        input_shape=(in_chans, img_size, img_size),
        num_classes=num_classes,
        family="tiny_cnn",
    )
