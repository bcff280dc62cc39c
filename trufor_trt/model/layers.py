"""Small helpers shared by the encoder, the fusion modules and the decoders."""

import torch
import torch.nn.functional as F


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H*W) x C."""
    return grid.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: torch.Tensor, height, width) -> torch.Tensor:
    """B x (H*W) x C -> B x C x H x W."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def resize_bilinear(grid: torch.Tensor, size) -> torch.Tensor:
    """The official network's only resampling: bilinear, align_corners=False."""
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """B x N x C -> B x heads x N x (C / heads)."""
    batch, count, channels = tokens.shape
    return tokens.reshape(batch, count, heads, channels // heads).transpose(1, 2)


def merge_heads(per_head: torch.Tensor) -> torch.Tensor:
    """B x heads x N x d -> B x N x (heads * d)."""
    batch, heads, count, depth = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, count, heads * depth)


def split_key_value(packed: torch.Tensor, heads: int):
    """A kv Linear's output B x N x 2C -> (k, v), each B x heads x N x (C / heads).

    The checkpoint's kv weights put all keys first, then all values, each head-major.
    """
    batch, count, channels = packed.shape
    kv = packed.reshape(batch, count, 2, heads, channels // (2 * heads)).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]
