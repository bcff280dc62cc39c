"""SegFormer MiT-B2 building blocks, named as the TruFor checkpoint names them."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import grid_to_tokens, merge_heads, split_heads, split_key_value, tokens_to_grid

EMBED_DIMS = (64, 128, 320, 512)
HEADS = (1, 2, 5, 8)
DEPTHS = (3, 4, 6, 3)
REDUCTION_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
# The official code gives the blocks' and stages' LayerNorms eps 1e-6; the patch embedding's
# and the attention's spatial-reduction LayerNorm keep PyTorch's default 1e-5.
BLOCK_NORM_EPS = 1e-6
DEFAULT_NORM_EPS = 1e-5


class OverlapPatchEmbed(nn.Module):
    """Strided convolution to the next stage's grid, then LayerNorm over channels."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=DEFAULT_NORM_EPS)

    def forward(self, grid: torch.Tensor):
        grid = self.proj(grid)
        height, width = grid.shape[-2:]
        return self.norm(grid_to_tokens(grid)), height, width


class SpatialReductionAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a coarser grid (sr_ratio)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_NORM_EPS)

    def key_value_source(self, tokens: torch.Tensor, height, width) -> torch.Tensor:
        if self.sr_ratio == 1:
            return tokens
        return self.norm(grid_to_tokens(self.sr(tokens_to_grid(tokens, height, width))))

    def forward(self, tokens: torch.Tensor, height, width) -> torch.Tensor:
        query = split_heads(self.q(tokens), self.heads)
        key, value = split_key_value(self.kv(self.key_value_source(tokens, height, width)), self.heads)
        # Exactly softmax(q k^T / sqrt(d)) v, without keeping the score matrix around.
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(merge_heads(attended))


class DepthwiseConv(nn.Module):
    """The 3x3 depthwise convolution inside Mix-FFN, applied on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, height, width) -> torch.Tensor:
        return grid_to_tokens(self.dwconv(tokens_to_grid(tokens, height, width)))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, height, width) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), height, width)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, tokens: torch.Tensor, height, width) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), height, width)
        return tokens + self.mlp(self.norm2(tokens), height, width)
