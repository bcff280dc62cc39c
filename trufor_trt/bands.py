"""Exact row bands: how large images run in bounded memory without changing a single output.

Two parts of the network are computed a band of rows at a time, with no torch import here
(the plans are shared by the PyTorch network and the ONNX Runtime runner):
- Noiseprint++ (17 layers of 3x3 convolutions) is local: an output row depends on input rows
  at most NOISEPRINT_HALO away, so a band read with that many extra rows on each side, clipped
  at the image (where the layers' zero padding is then the whole image's), is exact.
- The decoders after folding (model/decoder.py) are per pixel on the 1/4 grid except for the
  bilinear upsampling of the coarser scales, whose taps are known per output row: a band of
  1/4-grid rows needs only the source rows its taps name.
"""

from dataclasses import dataclass

import numpy as np

from .architecture import NOISEPRINT_LAYERS

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


@dataclass(frozen=True)
class ScaleTaps:
    """What one band of the 1/4 grid needs of one coarser scale: its rows [first, last), per
    band row the two source rows (indices into those rows, 2 x R) and the second's weight, per
    1/4-grid column the two source columns (2 x W) and the second's weight."""

    first: int
    last: int
    rows: np.ndarray
    row_weight: np.ndarray
    columns: np.ndarray
    column_weight: np.ndarray


def decoder_band_taps(coarse_sizes, grid, top: int, bottom: int) -> list:
    """ScaleTaps per coarse scale (h, w) for 1/4-grid rows [top, bottom) of a grid (H, W)."""
    taps = []
    for height, width in coarse_sizes:
        low, high, weight = (values[top:bottom] for values in bilinear_taps(height, grid[0]))
        first, last = int(low.min()), int(high.max()) + 1
        left, right, across = bilinear_taps(width, grid[1])
        taps.append(ScaleTaps(first, last, np.stack([low - first, high - first]), weight,
                              np.stack([left, right]), across))
    return taps


def row_bands(height: int, band_rows: int):
    """(top, bottom) of each band of `band_rows` rows."""
    return [(top, min(top + band_rows, height)) for top in range(0, height, band_rows)]
