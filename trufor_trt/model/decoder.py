"""The SegFormer all-MLP decoder heads (`decode_head.*`, `decode_head_conf.*`)."""

import torch
from torch import nn

from .layers import grid_to_tokens, resize_bilinear, tokens_to_grid
from ..architecture import DECODER_DIM, EMBED_DIMS
# Quirk of the official training config: the localization head's BatchNorm uses eps 1e-3,
# the confidence head keeps PyTorch's default.
LOCALIZATION_BN_EPS = 1e-3
CONFIDENCE_BN_EPS = 1e-5


class LinearEmbed(nn.Module):
    """A per-pixel Linear to the decoder width, kept as `proj` to match the checkpoint."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, DECODER_DIM)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        height, width = grid.shape[-2:]
        return tokens_to_grid(self.proj(grid_to_tokens(grid)), height, width)


class DecoderHead(nn.Module):
    def __init__(self, classes: int, bn_eps: float):
        super().__init__()
        for number in range(len(EMBED_DIMS), 0, -1):  # c4 .. c1, the checkpoint's order
            setattr(self, f"linear_c{number}", LinearEmbed(EMBED_DIMS[number - 1]))
        self.linear_fuse = nn.Sequential(
            nn.Conv2d(4 * DECODER_DIM, DECODER_DIM, 1),
            nn.BatchNorm2d(DECODER_DIM, eps=bn_eps),
            nn.ReLU(),
        )
        self.linear_pred = nn.Conv2d(DECODER_DIM, classes, 1)

    def forward(self, features) -> torch.Tensor:
        """Four fused maps (1/4 .. 1/32) -> logits on the 1/4 grid."""
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]
        embedded = [
            resize_bilinear(self.linear_c4(c4), size),
            resize_bilinear(self.linear_c3(c3), size),
            resize_bilinear(self.linear_c2(c2), size),
            self.linear_c1(c1),
        ]
        return self.linear_pred(self.linear_fuse(torch.cat(embedded, dim=1)))
