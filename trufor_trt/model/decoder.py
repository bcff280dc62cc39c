"""The SegFormer all-MLP decoder heads (`decode_head.*`, `decode_head_conf.*`).

Officially each scale's features go through a Linear to 512 channels, are upsampled to the
1/4 grid and concatenated (2048 channels), then a 1x1 convolution, BatchNorm and ReLU. The
Linear, the 1x1 convolution's block for that scale and the eval-mode BatchNorm are all linear
maps per pixel, and bilinear upsampling (weights summing to one) commutes with such maps, bias
included. So the folded form applies one 1x1 map per scale at the scale's own resolution,
upsamples and sums: the same result up to float reassociation, without the 2048-channel
tensor, and without the 1/4-grid 2048 -> 512 product (most of the decoders' FLOPs).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import DECODER_DIM, EMBED_DIMS
from ..bands import decoder_band_taps, row_bands
from .formulation import decoders_folded
from .layers import grid_to_tokens, resize_bilinear, tokens_to_grid

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
        if decoders_folded():
            return self.linear_pred(F.relu(self._folded_fuse(features), inplace=True))
        return self._official(features)

    def _folded_maps(self):
        """Per scale (c4 .. c1) its Linear, linear_fuse's block for it and the eval BatchNorm
        as one 1x1 convolution weight (512 x C x 1 x 1); and the bias of them all."""
        conv, norm = self.linear_fuse[0], self.linear_fuse[1]
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        blocks = (gain[:, None] * conv.weight[:, :, 0, 0]).split(DECODER_DIM, dim=1)
        linears = (self.linear_c4.proj, self.linear_c3.proj, self.linear_c2.proj, self.linear_c1.proj)
        bias = gain * (conv.bias - norm.running_mean) + norm.bias
        weights = []
        for linear, block in zip(linears, blocks):
            weights.append((block @ linear.weight)[:, :, None, None])
            bias = bias + block @ linear.bias
        return weights, bias[None, :, None, None]

    def _folded_fuse(self, features) -> torch.Tensor:
        """The fused 512-channel map on the 1/4 grid, before the ReLU."""
        weights, bias = self._folded_maps()
        c1, c2, c3, c4 = features
        fused = F.conv2d(c1, weights[3])
        for grid, weight in zip((c4, c3, c2), weights):
            fused = fused.add_(resize_bilinear(F.conv2d(grid, weight), c1.shape[-2:]))  # in place
        return fused.add_(bias)

    def band(self, c1_rows: torch.Tensor, coarse) -> torch.Tensor:
        """Logits for a band of 1/4-grid rows (folded form, bands.py): `c1_rows` those rows of
        c1; `coarse` per scale c4, c3, c2: (the rows of it the band reads, row taps 2 x R, row
        weights, column taps 2 x W, column weights), as bands.decoder_band_taps gives them."""
        weights, bias = self._folded_maps()
        fused = F.conv2d(c1_rows, weights[3])
        for (rows, row_taps, row_weight, column_taps, column_weight), weight in zip(coarse, weights):
            mapped = F.conv2d(rows, weight)
            row_weight = row_weight[:, None]
            vertical = (mapped[:, :, row_taps[0]] * (1 - row_weight)
                        + mapped[:, :, row_taps[1]] * row_weight)
            fused = fused.add_(vertical[..., column_taps[0]] * (1 - column_weight)
                               + vertical[..., column_taps[1]] * column_weight)
        return self.linear_pred(F.relu(fused.add_(bias), inplace=True))

    def _official(self, features) -> torch.Tensor:
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]
        embedded = [
            resize_bilinear(self.linear_c4(c4), size),
            resize_bilinear(self.linear_c3(c3), size),
            resize_bilinear(self.linear_c2(c2), size),
            self.linear_c1(c1),
        ]
        return self.linear_pred(self.linear_fuse(torch.cat(embedded, dim=1)))


def _band_inputs(coarse: torch.Tensor, taps) -> tuple:
    """One coarse scale's part of a band, as DecoderHead.band takes it."""
    def weight(values):
        return torch.from_numpy(values).to(coarse.dtype)

    return (coarse[:, :, taps.first:taps.last], torch.from_numpy(taps.rows), weight(taps.row_weight),
            torch.from_numpy(taps.columns), weight(taps.column_weight))


def decode_in_bands(heads, features, band_rows: int) -> list:
    """Each head's logits, `band_rows` rows of the 1/4 grid at a time (exact: bands.py): the
    512-channel 1/4-grid maps exist one band at a time."""
    c1, c2, c3, c4 = features
    grid = tuple(c1.shape[-2:])
    coarse = (c4, c3, c2)
    outputs = [c1.new_empty((c1.shape[0], head.linear_pred.out_channels, *grid)) for head in heads]
    for top, bottom in row_bands(grid[0], band_rows):
        taps = decoder_band_taps([tuple(scale.shape[-2:]) for scale in coarse], grid, top, bottom)
        inputs = [_band_inputs(scale, scale_taps) for scale, scale_taps in zip(coarse, taps)]
        for head, output in zip(heads, outputs):
            output[:, :, top:bottom] = head.band(c1[:, :, top:bottom], inputs)
    return outputs
