"""Exact row bands: how large images run in bounded memory without changing a single output.

Two parts of the network are computed a band of rows at a time, with no torch import here
(the plans are shared by the PyTorch network and the ONNX Runtime runner):
- Noiseprint++ (17 layers of 3x3 convolutions) is local: an output row depends on input rows
  at most NOISEPRINT_HALO away, so a band read with that many extra rows on each side, clipped
  at the image (where the layers' zero padding is then the whole image's), is exact.
- The decoders after folding (model/decoder.py) are per pixel on the 1/4 grid except for the
  bilinear upsampling of the coarser scales, which is separable: along the columns it is done
  on whole coarse rows (as F.interpolate does it), along the rows it is a small matrix per band
  of 1/4-grid rows over just the coarse rows its taps name.
"""

from dataclasses import dataclass

import numpy as np

from trufor_trt.architecture import NOISEPRINT_LAYERS

# Each 3x3 layer of Noiseprint++ sees one pixel further.
NOISEPRINT_HALO = NOISEPRINT_LAYERS


def noiseprint_row_bands(height: int, band_rows: int):
    """(top, bottom, first, last) per band: output rows [top, bottom) from input rows
    [first, last)."""
    return [(top, bottom, max(top - NOISEPRINT_HALO, 0), min(bottom + NOISEPRINT_HALO, height))
            for top, bottom in row_bands(height, band_rows)]


def bilinear_taps(size_in: int, size_out: int):
    """Per output index of F.interpolate(bilinear, align_corners=False) along one axis: the two
    source indices and the weight of the second (half-pixel rule, negative positions clamped)."""
    positions = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(positions.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, positions - low


# 1/4-grid rows per decoder band. A band's fused maps (both decoders, 1024 channels) stay in
# the CPU's caches and the row interpolation is a matrix this many rows high (docs/large-images.md,
# "Decoders": 8 was the fastest of 4, 8, 16, 32 at 512 and 1024).
DECODER_BAND_ROWS = 8


def vertical_interpolation(coarse_height: int, grid_height: int, top: int, bottom: int):
    """The bilinear upsampling of a coarse map along its rows, for 1/4-grid rows [top, bottom):
    the coarse rows it reads [first, last) and the (bottom - top) x (last - first) matrix of
    F.interpolate's weights on them (two per row, one where the taps meet at the border)."""
    low, high, weight = (values[top:bottom] for values in bilinear_taps(coarse_height, grid_height))
    first, last = int(low.min()), int(high.max()) + 1
    matrix = np.zeros((bottom - top, last - first))
    rows = np.arange(bottom - top)
    np.add.at(matrix, (rows, low - first), 1 - weight)
    np.add.at(matrix, (rows, high - first), weight)
    return first, last, matrix


@dataclass(frozen=True)
class DecoderBand:
    """1/4-grid rows [top, bottom); per coarse scale the rows of its group's maps the band
    reads, (start, stop), and the interpolation matrix over them."""

    top: int
    bottom: int
    reads: tuple
    vertical: tuple


@dataclass(frozen=True)
class DecoderGroup:
    """1/4-grid rows [top, bottom) whose coarse maps are computed at once (the memory budget
    sets its height): per coarse scale the rows [first, last) they need; then its bands."""

    top: int
    bottom: int
    coarse_rows: tuple
    bands: tuple


def decoder_groups(coarse_heights, grid_height: int, group_rows: int,
                   band_rows: int = DECODER_BAND_ROWS) -> list:
    """The plan of the decoders over a 1/4 grid of `grid_height` rows, the coarse scales being
    `coarse_heights` rows high: groups of `group_rows` rows, each in bands of `band_rows`."""
    groups = []
    for group_top, group_bottom in row_bands(grid_height, group_rows):
        coarse_rows = tuple(vertical_interpolation(height, grid_height, group_top, group_bottom)[:2]
                            for height in coarse_heights)
        bands = []
        for top, bottom in row_bands(group_bottom - group_top, band_rows):
            top, bottom = top + group_top, bottom + group_top
            reads, vertical = [], []
            for height, (group_first, _) in zip(coarse_heights, coarse_rows):
                first, last, matrix = vertical_interpolation(height, grid_height, top, bottom)
                reads.append((first - group_first, last - group_first))
                vertical.append(matrix)
            bands.append(DecoderBand(top, bottom, tuple(reads), tuple(vertical)))
        groups.append(DecoderGroup(group_top, group_bottom, coarse_rows, tuple(bands)))
    return groups


def row_bands(height: int, band_rows: int):
    """(top, bottom) of each band of `band_rows` rows."""
    return [(top, min(top + band_rows, height)) for top in range(0, height, band_rows)]
