"""Built-in ViT family in the T2T-ViT-7 spirit: patch embedding, CLS token, pre-norm transformer
blocks and a shared final LayerNorm. IM = that LayerNorm on the CLS token + ``Linear``.

Attention is written with explicit matmuls (no fused SDPA) so it exports to plain ONNX ops and
its MACs are counted (``extra_macs``).
"""

from __future__ import annotations

import torch
from torch import nn

from jei_edge.model.backbone import BackboneSpec, register_backbone


class PatchStem(nn.Module):
    """Image ``[B, C, H, W]`` -> tokens ``[B, 1 + P, D]`` (CLS first, position embeddings added)."""

    def __init__(self, in_chans: int, img_size: int, patch: int, dim: int):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        n = (img_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1) + self.pos


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)

    def extra_macs(self, inputs, output) -> int:
        """MACs of the two attention matmuls (the Linear layers are counted by their own hooks)."""
        b, t, d = inputs[0].shape
        return int(b * 2 * t * t * d)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsHead(nn.Module):
    """Shared LayerNorm on the CLS token + Linear. The norm is held, not owned, when ``shared``."""

    def __init__(self, norm: nn.LayerNorm, dim: int, num_classes: int, own_norm: bool):
        super().__init__()
        if own_norm:
            self.norm = norm
        else:
            self._shared = (norm,)  # a tuple hides it from parameters() / state_dict()
        self.fc = nn.Linear(dim, num_classes)

    def _norm(self):
        return self.norm if hasattr(self, "norm") else self._shared[0]

    def forward(self, x):
        return self.fc(self._norm()(x[:, 0]))


@register_backbone("vit")
def vit(num_classes: int = 10, in_chans: int = 1, img_size: int = 16, patch: int = 4,
        embed_dim: int = 64, depth: int = 7, heads: int = 4, mlp_ratio: float = 2.0) -> BackboneSpec:
    """ViT: ``depth`` blocks of width ``embed_dim`` on ``patch``x``patch`` patches."""
    stem = PatchStem(in_chans, img_size, patch, embed_dim)
    blocks = [Block(embed_dim, heads, mlp_ratio) for _ in range(depth)]
    norm = nn.LayerNorm(embed_dim)
    head = ClsHead(norm, embed_dim, num_classes, own_norm=True)
    return BackboneSpec(
        stem=stem, blocks=blocks, head=head,
        make_im=lambda i: ClsHead(norm, embed_dim, num_classes, own_norm=False),
        input_shape=(in_chans, img_size, img_size), num_classes=num_classes, family="vit",
    )
