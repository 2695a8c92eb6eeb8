"""A backbone defined OUTSIDE jei_edge, used to test the plugin mechanism."""

from torch import nn

from jei_edge.model.backbone import BackboneSpec


class _Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class _MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch_relu(self.fc(x))


def torch_relu(x):
    return x.clamp_min(0)


def tiny_mlp(num_classes=3, in_chans=1, img_size=4, width=8, depth=3):
    """An MLP over flattened pixels: stem = flatten + Linear, ``depth`` residual blocks."""
    stem = nn.Sequential(_Flat(), nn.Linear(in_chans * img_size * img_size, width))
    return BackboneSpec(
        stem=stem,
        blocks=[_MLPBlock(width) for _ in range(depth)],
        head=nn.Linear(width, num_classes),
        make_im=lambda i: nn.Linear(width, num_classes),
        input_shape=(in_chans, img_size, img_size),
        num_classes=num_classes,
        family="mlp",
    )


def not_a_spec(**kwargs):
    return {"stem": None}
