"""Deterministic synthetic photographs for checks that must not depend on any data files.

Smooth shading, texture, sensor-like noise, and a pasted patch with different noise and a
JPEG-like blockiness: enough structure that every part of the network sees realistic ranges.
"""

import numpy as np


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8 RGB."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, 3)
    image = np.stack([96 + 80 * np.sin(4 * rows + 3 * cols + phase[c]) for c in range(3)], axis=2)
    image += 20 * np.sin(40 * rows)[:, :, None] * np.cos(33 * cols)[:, :, None]
    image += rng.normal(0, 4, (height, width, 3))
    top, left = height // 3, width // 3
    patch = image[top:top + height // 3, left:left + width // 3]
    blocks = np.kron(rng.normal(0, 6, (patch.shape[0] // 8 + 1, patch.shape[1] // 8 + 1)),
                     np.ones((8, 8)))[:patch.shape[0], :patch.shape[1]]
    patch += blocks[:, :, None] + rng.normal(0, 10, patch.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
