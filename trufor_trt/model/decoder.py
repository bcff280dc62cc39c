"""The SegFormer all-MLP decoder heads (`decode_head.*`, `decode_head_conf.*`).

Officially each scale's features go through a Linear to 512 channels, are upsampled to the
1/4 grid and concatenated (2048 channels), then a 1x1 convolution, BatchNorm and ReLU. The
Linear, the 1x1 convolution's block for that scale and the eval-mode BatchNorm are all linear
maps per pixel, and bilinear upsampling (weights summing to one) commutes with such maps, bias
included. So the folded form applies one 1x1 map per scale at the scale's own resolution,
upsamples and sums: the same result up to float reassociation, without the 2048-channel
tensor, and without the 1/4-grid 2048 -> 512 product (most of the decoders' FLOPs).

The CPU graphs compute both heads as one (DecoderPair) on channels-last rows, so that every
step is a matrix product: the coarse scales' maps are upsampled along the columns on whole
coarse rows, then along the rows by a small interpolation matrix per band, accumulated into
the c1 map (bands.decoder_groups).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trufor_trt.architecture import DECODER_DIM, EMBED_DIMS, LOCALIZATION_CLASSES
from trufor_trt.bands import decoder_groups
from trufor_trt.model.formulation import Formulation
from trufor_trt.model.layers import grid_to_tokens, resize_bilinear, tokens_to_grid

# Quirk of the official training config: the localization head's BatchNorm uses eps 1e-3,
# the confidence head keeps PyTorch's default.
LOCALIZATION_BN_EPS = 1e-3
CONFIDENCE_BN_EPS = 1e-5


class LinearEmbed(nn.Module):
    """A per-pixel Linear to the decoder width, kept as `proj` to match the checkpoint."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, DECODER_DIM)

    def forward(self, grid: torch.Tensor, form: Formulation) -> torch.Tensor:
        height, width = grid.shape[-2:]
        return tokens_to_grid(self.proj(grid_to_tokens(grid, form)), height, width, form)


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

    def forward(self, features, form: Formulation) -> torch.Tensor:
        """Four fused maps (1/4 .. 1/32) -> logits on the 1/4 grid."""
        if form.fold_decoders:
            return self.linear_pred(F.relu(self._folded_fuse(features), inplace=True))
        return self._official(features, form)

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

    def _official(self, features, form: Formulation) -> torch.Tensor:
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]
        embedded = [
            resize_bilinear(self.linear_c4(c4, form), size),
            resize_bilinear(self.linear_c3(c3, form), size),
            resize_bilinear(self.linear_c2(c2, form), size),
            self.linear_c1(c1, form),
        ]
        return self.linear_pred(self.linear_fuse(torch.cat(embedded, dim=1)))


@dataclass(frozen=True)
class DecoderPair:
    """Both folded decoders as one on channels-last rows: per scale (c1 .. c4) a C x 1024 map
    (each head's 512 side by side), the bias (added to the c4 map before its upsampling:
    the interpolation weights sum to one), and the two 1x1 predictions as one 1024 x 3 matrix
    (block diagonal: localization's 2 outputs read its 512, confidence's 1 the other 512)."""

    maps: tuple
    bias: torch.Tensor
    prediction: torch.Tensor
    prediction_bias: torch.Tensor

    @classmethod
    def of(cls, heads) -> "DecoderPair":
        folded = [head._folded_maps() for head in heads]
        # _folded_maps lists c4 .. c1; these read c1 .. c4.
        maps = tuple(torch.cat([weights[index][:, :, 0, 0] for weights, _ in folded]).T
                     for index in reversed(range(len(EMBED_DIMS))))
        bias = torch.cat([bias.flatten() for _, bias in folded])
        localization, confidence = (head.linear_pred.weight[:, :, 0, 0] for head in heads)
        prediction = torch.cat((F.pad(localization, (0, DECODER_DIM)), F.pad(confidence, (DECODER_DIM, 0)))).T
        return cls(maps, bias, prediction, torch.cat([head.linear_pred.bias for head in heads]))

    def widened_rows(self, coarse_rows, width) -> tuple:
        """c4, c3, c2 rows (r x w x C each) -> their 1024-channel maps (c4's with the bias),
        upsampled along the columns to the 1/4 grid's `width`: 1 x r x width x 1024 each."""
        c4_rows, c3_rows, c2_rows = coarse_rows
        return tuple(_widened(mapped, width) for mapped in
                     (c4_rows @ self.maps[3] + self.bias, c3_rows @ self.maps[2], c2_rows @ self.maps[1]))

    def band_logits(self, c1_rows, widened, vertical) -> torch.Tensor:
        """Logits (3 x R x W: localization's 2, then confidence's) of R 1/4-grid rows: `c1_rows`
        R x W x 64; per coarse scale c4, c3, c2 the band's rows of widened_rows (r x W x 1024)
        and its R x r row interpolation (bands.vertical_interpolation)."""
        rows, width = c1_rows.shape[:2]
        fused = (c1_rows @ self.maps[0]).reshape(rows, -1)
        for scale_wide, matrix in zip(widened, vertical):
            fused = torch.addmm(fused, matrix, scale_wide.reshape(matrix.shape[1], -1))
        logits = F.relu(fused).reshape(rows, width, -1) @ self.prediction + self.prediction_bias
        return logits.permute(2, 0, 1)


def _widened(rows: torch.Tensor, width) -> torch.Tensor:
    """r x w x C -> 1 x r x width x C, bilinear along the columns only (the rows keep their
    positions: a 1-to-1 resampling)."""
    return F.interpolate(rows[None], size=(width, rows.shape[-1]), mode="bilinear", align_corners=False)


def split_logits(logits: torch.Tensor) -> tuple:
    """DecoderPair.band_logits' 3 channels -> (localization, confidence)."""
    return logits[:LOCALIZATION_CLASSES], logits[LOCALIZATION_CLASSES:]


def decode_in_bands(heads, features, group_rows: int) -> list:
    """Each head's logits by the CPU graphs' formulation (bands.decoder_groups): coarse maps
    for `group_rows` rows of the 1/4 grid at a time, then bands of DECODER_BAND_ROWS rows;
    the 1024-channel 1/4-grid maps exist one band at a time."""
    pair = DecoderPair.of(heads)
    c1, c2, c3, c4 = (scale.permute(0, 2, 3, 1) for scale in features)  # channels last
    grid_height, grid_width = c1.shape[1:3]
    outputs = [c1.new_empty((c1.shape[0], head.linear_pred.out_channels, grid_height, grid_width))
               for head in heads]
    coarse = (c4, c3, c2)
    plan = decoder_groups([scale.shape[1] for scale in coarse], grid_height, group_rows)
    for image in range(c1.shape[0]):
        for group in plan:
            rows = [scale[image, first:last] for scale, (first, last) in zip(coarse, group.coarse_rows)]
            widened = [scale[0] for scale in pair.widened_rows(rows, grid_width)]
            for band in group.bands:
                logits = pair.band_logits(
                    c1[image, band.top:band.bottom],
                    [scale[start:stop] for scale, (start, stop) in zip(widened, band.reads)],
                    [torch.from_numpy(matrix).to(device=c1.device, dtype=c1.dtype)
                     for matrix in band.vertical])
                for output, part in zip(outputs, split_logits(logits)):
                    output[image, :, band.top:band.bottom] = part
    return outputs
