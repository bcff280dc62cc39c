"""The network's input contract: RGB uint8 H x W x 3 -> 1 x 3 x H x W, divided by 256 (not 255)."""

import numpy as np

INPUT_SCALE = 256.0


def size_label(prepared: np.ndarray) -> str:
    """"HxW" of a prepared 1 x 3 x H x W input."""
    return f"{prepared.shape[2]}x{prepared.shape[3]}"


def prepare_input(rgb: np.ndarray, dtype=np.float32) -> np.ndarray:
    """One image as the batch-of-one tensor every backend takes."""
    planar = np.transpose(rgb, (2, 0, 1))[None]
    return np.ascontiguousarray(planar, dtype=dtype) / dtype(INPUT_SCALE)
