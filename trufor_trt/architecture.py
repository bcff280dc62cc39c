"""TruFor's shape: the numbers that fix every layer's size, with no torch import.

The PyTorch model builds its layers from these, and the benchmarks count the network's FLOPs
from them (on machines that have no torch).
"""

# SegFormer MiT-B2, once for RGB and once for Noiseprint++.
EMBED_DIMS = (64, 128, 320, 512)
HEADS = (1, 2, 5, 8)
DEPTHS = (3, 4, 6, 3)
REDUCTION_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
# Patch embeddings: 7x7 stride 4 into stage 1, then 3x3 stride 2 (padding kernel // 2).
PATCH_KERNELS = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)
# The smallest image side: stage 1's spatial-reduction convolution (8x8, stride 8) needs an 8x8 grid.
MIN_SIDE = 29

# Noiseprint++: a 17-layer DnCNN of 3x3 convolutions, 64 features.
NOISEPRINT_LAYERS = 17
NOISEPRINT_FEATURES = 64

# The SegFormer decoders (localization: 2 classes, confidence: 1).
DECODER_DIM = 512
LOCALIZATION_CLASSES = 2
CONFIDENCE_CLASSES = 1


def stage_grids(height: int, width: int) -> list:
    """The (h, w) token grid of each encoder stage for an H x W input."""
    grids = []
    for kernel, stride in zip(PATCH_KERNELS, PATCH_STRIDES):
        height = (height + 2 * (kernel // 2) - kernel) // stride + 1
        width = (width + 2 * (kernel // 2) - kernel) // stride + 1
        grids.append((height, width))
    return grids

