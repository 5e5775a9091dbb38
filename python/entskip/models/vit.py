"""A small pre-norm Vision Transformer (Dosovitskiy et al. 2021) with skips through :class:`EntangledSkip`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import EntangledSkip


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(softmax(q k^T / sqrt(d_head)) v)``.

    Shapes: ``x (N, T, dim)`` -> ``(N, T, dim)``; ``dim`` must divide by ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``; shapes ``(..., dim)`` -> ``(..., dim)`` through ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with two residuals, each through its own skip::

        x = skip_attn(x, attn(norm1(x)))     # alpha_1 * (x @ M_1^T) + attn(norm1(x))
        x = skip_mlp(x, mlp(norm2(x)))       # alpha_2 * (x @ M_2^T) + mlp(norm2(x))

    Both skips are the identity (``alpha = 1``) until :func:`entskip.entangle` replaces them.

    Shapes: ``x (N, T, dim)`` -> ``(N, T, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.skip_attn = EntangledSkip(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_mlp = EntangledSkip(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.skip_attn(x, self.attn(self.norm1(x)))
        return self.skip_mlp(x, self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Vision Transformer: patch embedding, a class token, ``depth`` :class:`Block`\\ s, a linear head.

    Patches of ``patch_size x patch_size`` are embedded by a strided convolution, a
    learned class token is prepended, learned position embeddings are added; after the
    blocks a final layer norm and the classifier read the class token.

    Args:
        image_size: side of the (square) input images; must divide by ``patch_size``.
        patch_size: side of a patch.
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        dim: token width.
        depth: number of blocks (``2 depth`` convertible skips).
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLPs over ``dim``.

    Shapes: ``x (N, in_channels, image_size, image_size)`` -> logits ``(N, num_classes)``;
    tokens inside are ``(N, 1 + (image_size / patch_size)^2, dim)``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])
