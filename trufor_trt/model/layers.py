"""Small helpers shared by the encoder, the fusion modules and the decoders."""

import torch
import torch.nn.functional as F

from trufor_trt.model.formulation import Formulation


def grid_to_tokens(grid: torch.Tensor, form: Formulation, like: torch.Tensor | None = None) -> torch.Tensor:
    """B x C x H x W -> B x (H*W) x C. `like`: tokens with the result's batch and channels.

    For ONNX Runtime the grid is made channels-last first (one pass, which its convolutions'
    layout conversion absorbs, where the default order costs a separate transpose), and the
    token shape is read from `like` rather than from the grid: a convolution's output lives
    in ONNX Runtime's blocked layout, and reading its shape would convert it back in full."""
    if not form.onnxruntime_layout:
        return grid.flatten(2).transpose(1, 2)
    source = grid.shape[:2] if like is None else (like.shape[0], like.shape[2])
    return grid.permute(0, 2, 3, 1).reshape(source[0], -1, source[1])


def tokens_to_grid(tokens: torch.Tensor, height, width, form: Formulation) -> torch.Tensor:
    """B x (H*W) x C -> B x C x H x W."""
    if not form.onnxruntime_layout:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)


def linear(layer, tokens: torch.Tensor, form: Formulation) -> torch.Tensor:
    """`layer(tokens)` for B x N x C tokens. For ONNX Runtime on the tokens as one matrix:
    its optimiser then joins the bias to the product (Gemm) instead of adding it after."""
    if not form.onnxruntime_layout:
        return layer(tokens)
    return _as_one_matrix(tokens, layer.weight, layer.bias)


def pointwise(conv, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to B x N x C tokens (as a Linear over the channels)."""
    return _as_one_matrix(tokens, conv.weight[:, :, 0, 0], conv.bias)


def _as_one_matrix(tokens: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    flat = F.linear(tokens.reshape(-1, tokens.shape[2]), weight, bias)
    return flat.reshape(tokens.shape[0], tokens.shape[1], -1)


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
