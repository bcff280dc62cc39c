"""Noiseprint++: the 17-layer DnCNN that turns the image into a camera-noise residual.

Built as a plain Sequential so its indices are the checkpoint's keys (`dncnn.<index>.*`).
"""

from torch import nn

from ..architecture import NOISEPRINT_FEATURES as FEATURES
from ..architecture import NOISEPRINT_LAYERS as LAYERS

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
