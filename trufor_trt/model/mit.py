"""SegFormer MiT-B2 building blocks, named as the TruFor checkpoint names them."""

import torch
import torch.nn.functional as F
from torch import nn

from trufor_trt.architecture import MLP_RATIO
from trufor_trt.model.attention import multi_head_attention
from trufor_trt.model.formulation import Formulation
from trufor_trt.model.layers import grid_to_tokens, linear, tokens_to_grid

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

    def forward(self, grid: torch.Tensor, form: Formulation):
        grid = self.proj(grid)
        height, width = grid.shape[-2:]
        return self.norm(grid_to_tokens(grid, form)), height, width


class SpatialReductionAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a coarser grid (sr_ratio)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_NORM_EPS)

    def key_value_source(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        if self.sr_ratio == 1:
            return tokens
        grid = self.sr(tokens_to_grid(tokens, height, width, form))
        return self.norm(grid_to_tokens(grid, form, like=tokens))

    def forward(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        # The kv Linear's output holds all keys, then all values (each head after head).
        key, value = linear(self.kv, self.key_value_source(tokens, height, width, form), form).chunk(2, dim=-1)
        attended = multi_head_attention(linear(self.q, tokens, form), key, value, self.heads, self.scale,
                                        form.attention)
        return linear(self.proj, attended, form)


class DepthwiseConv(nn.Module):
    """The 3x3 depthwise convolution inside Mix-FFN, applied on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        return grid_to_tokens(self.dwconv(tokens_to_grid(tokens, height, width, form)), form, like=tokens)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        if form.onnxruntime_layout:
            return self._on_grid(tokens, height, width, form)
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), height, width, form)))

    def _on_grid(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        """The same block with fc1 and fc2 as 1x1 convolutions: ONNX Runtime then keeps the
        whole block in its convolution layout, converting the C-channel input and output once
        instead of the 4C-channel hidden map twice around the depthwise convolution."""
        grid = F.conv2d(tokens_to_grid(tokens, height, width, form), self.fc1.weight[:, :, None, None],
                        self.fc1.bias)
        grid = self.act(self.dwconv.dwconv(grid))
        return grid_to_tokens(F.conv2d(grid, self.fc2.weight[:, :, None, None], self.fc2.bias), form, like=tokens)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), height, width, form)
        return tokens + self.mlp(self.norm2(tokens), height, width, form)
