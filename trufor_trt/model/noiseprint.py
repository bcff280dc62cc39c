"""Noiseprint++: the 17-layer DnCNN that turns the image into a camera-noise residual.

Built as a plain Sequential so its indices are the checkpoint's keys (`dncnn.<index>.*`).
"""

from torch import nn

from trufor_trt.architecture import NOISEPRINT_FEATURES as FEATURES
from trufor_trt.architecture import NOISEPRINT_LAYERS as LAYERS
from trufor_trt.bands import noiseprint_row_bands

BATCHNORM_EPS = 1e-5


def build_noiseprint() -> nn.Sequential:
    """Conv+ReLU, 15 x (Conv without bias, BatchNorm, ReLU), Conv: indices 0..47."""
    layers = [nn.Conv2d(3, FEATURES, 3, padding=1), nn.ReLU()]
    for _ in range(LAYERS - 2):
        layers += [
            nn.Conv2d(FEATURES, FEATURES, 3, padding=1, bias=False),
            nn.BatchNorm2d(FEATURES, eps=BATCHNORM_EPS),
            nn.ReLU(),
        ]
    layers.append(nn.Conv2d(FEATURES, 1, 3, padding=1))
    return nn.Sequential(*layers)


def noiseprint_in_row_bands(dncnn: nn.Module, image, band_rows: int):
    """Noiseprint++ of N x 3 x H x W, `band_rows` output rows at a time: equal to the whole
    image at once (see bands.py), memory following the band."""
    output = image.new_empty((image.shape[0], 1, *image.shape[-2:]))
    for top, bottom, first, last in noiseprint_row_bands(image.shape[-2], band_rows):
        output[:, :, top:bottom] = dncnn(image[:, :, first:last])[:, :, top - first:bottom - first]
    return output
