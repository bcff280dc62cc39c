"""CMX fusion between the RGB stream and the Noiseprint++ stream.

FeatureRectify (FRMs) exchanges channel- and pixel-wise weighted features between the two
streams; FeatureFusion (FFMs) merges them into the one map per stage that the decoders read.
"""

import torch
import torch.nn.functional as F
from torch import nn

from trufor_trt.model.formulation import Formulation
from trufor_trt.model.layers import (grid_to_tokens, linear, merge_heads, pointwise, split_heads, split_key_value,
                                     tokens_to_grid)

RECTIFY_WEIGHT = 0.5  # the official lambda_c and lambda_s
FUSION_NORM_EPS = 1e-5


class ChannelWeights(nn.Module):
    """Global average and max pooling of both streams -> MLP -> one weight per channel."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(4 * dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, 2 * dim), nn.Sigmoid()
        )

    def forward(self, both: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            (F.adaptive_avg_pool2d(both, 1), F.adaptive_max_pool2d(both, 1)), dim=1
        ).flatten(1)
        return self.mlp(pooled)[:, :, None, None]

    def of_tokens(self, both: torch.Tensor) -> torch.Tensor:
        """The same from B x N x 2C tokens: B x 1 x 2C."""
        pooled = torch.cat((both.mean(dim=1), both.amax(dim=1)), dim=-1)
        return self.mlp(pooled)[:, None, :]


class SpatialWeights(nn.Module):
    """Two 1x1 convolutions -> one weight per pixel for each stream."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, 2, 1), nn.Sigmoid()
        )

    def forward(self, both: torch.Tensor) -> torch.Tensor:
        return self.mlp(both)

    def of_tokens(self, both: torch.Tensor) -> torch.Tensor:
        """The same from B x N x 2C tokens (the 1x1 convolutions as Linears): B x N x 2."""
        first, _, second, _ = self.mlp
        hidden = F.relu(pointwise(first, both))
        return torch.sigmoid(pointwise(second, hidden))


def _exchange(rgb, noise, channel_weights, spatial_weights, channel_axis: int):
    """Each stream plus the other weighted per channel and per pixel (halves: noise's, rgb's)."""
    channel_for_noise, channel_for_rgb = channel_weights.chunk(2, dim=channel_axis)
    spatial_for_noise, spatial_for_rgb = spatial_weights.chunk(2, dim=channel_axis)
    rgb_out = (rgb + RECTIFY_WEIGHT * channel_for_rgb * noise
               + RECTIFY_WEIGHT * spatial_for_rgb * noise)
    noise_out = (noise + RECTIFY_WEIGHT * channel_for_noise * rgb
                 + RECTIFY_WEIGHT * spatial_for_noise * rgb)
    return rgb_out, noise_out


class FeatureRectify(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.channel_weights = ChannelWeights(dim)
        self.spatial_weights = SpatialWeights(dim)

    def forward(self, rgb: torch.Tensor, noise: torch.Tensor):
        both = torch.cat((rgb, noise), dim=1)
        return _exchange(rgb, noise, self.channel_weights(both), self.spatial_weights(both), 1)

    def on_tokens(self, rgb: torch.Tensor, noise: torch.Tensor):
        """The same on B x N x C tokens (the ONNX Runtime layout: no grid in between)."""
        both = torch.cat((rgb, noise), dim=-1)
        return _exchange(rgb, noise, self.channel_weights.of_tokens(both),
                         self.spatial_weights.of_tokens(both), -1)


class CrossAttention(nn.Module):
    """Efficient cross attention: each stream's queries read the other stream's global context.

    The context is a per-head d x d matrix softmax(k^T v * d^-0.5) normalised over its rows
    (dim -2), so the cost is linear in the number of pixels. The queries are the input itself.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.kv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.kv2 = nn.Linear(dim, 2 * dim, bias=False)

    def context(self, kv: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
        key, value = split_key_value(kv(tokens), self.heads)
        return ((key.transpose(-2, -1) @ value) * self.scale).softmax(dim=-2)

    def forward(self, first: torch.Tensor, second: torch.Tensor):
        first_context = self.context(self.kv1, first)
        second_context = self.context(self.kv2, second)
        first_out = merge_heads(split_heads(first, self.heads) @ second_context)
        second_out = merge_heads(split_heads(second, self.heads) @ first_context)
        return first_out, second_out


class CrossPath(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.channel_proj1 = nn.Linear(dim, 2 * dim)
        self.channel_proj2 = nn.Linear(dim, 2 * dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.end_proj1 = nn.Linear(2 * dim, dim)
        self.end_proj2 = nn.Linear(2 * dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=FUSION_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=FUSION_NORM_EPS)

    def forward(self, first: torch.Tensor, second: torch.Tensor, form: Formulation):
        kept1, shared1 = F.relu(linear(self.channel_proj1, first, form)).chunk(2, dim=-1)
        kept2, shared2 = F.relu(linear(self.channel_proj2, second, form)).chunk(2, dim=-1)
        crossed1, crossed2 = self.cross_attn(shared1, shared2)
        first = self.norm1(first + linear(self.end_proj1, torch.cat((kept1, crossed1), dim=-1), form))
        second = self.norm2(second + linear(self.end_proj2, torch.cat((kept2, crossed2), dim=-1), form))
        return first, second


class ChannelEmbed(nn.Module):
    """2C -> C on the grid: a 1x1 residual plus a 1x1 / depthwise 3x3 / 1x1 branch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels, eps=FUSION_NORM_EPS),
        )
        self.norm = nn.BatchNorm2d(out_channels, eps=FUSION_NORM_EPS)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.norm(self.residual(grid) + self.channel_embed(grid))


class FeatureFusion(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross = CrossPath(dim, heads)
        self.channel_emb = ChannelEmbed(2 * dim, dim)

    def forward(self, rgb: torch.Tensor, noise: torch.Tensor, form: Formulation) -> torch.Tensor:
        height, width = rgb.shape[-2:]
        return self.on_tokens(grid_to_tokens(rgb, form), grid_to_tokens(noise, form), height, width, form)

    def on_tokens(self, rgb: torch.Tensor, noise: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
        first, second = self.cross(rgb, noise, form)
        merged = tokens_to_grid(torch.cat((first, second), dim=-1), height, width, form)
        return self.channel_emb(merged)
