"""The network's arithmetic at a given input size, counted the way PyTorch's FLOP counter
counts the official code: convolutions, Linear layers and matrix products, a multiply-add
being 2 FLOPs; normalisations, activations, softmax and resizing are not counted.

Pure arithmetic on `trufor_trt.architecture`, so it works where torch is not installed.
"""

from trufor_trt.architecture import (CONFIDENCE_CLASSES, DECODER_DIM, DEPTHS, EMBED_DIMS, HEADS,
                                     LOCALIZATION_CLASSES, MLP_RATIO, NOISEPRINT_FEATURES,
                                     NOISEPRINT_LAYERS, PATCH_KERNELS, REDUCTION_RATIOS,
                                     stage_grids)

STREAMS = 2  # the RGB and the Noiseprint++ encoders are two copies of MiT-B2


def conv(in_channels: int, out_channels: int, kernel: int, outputs: int, groups: int = 1) -> int:
    return 2 * out_channels * (in_channels // groups) * kernel * kernel * outputs


def linear(in_features: int, out_features: int, tokens: int) -> int:
    return 2 * in_features * out_features * tokens


def noiseprint_flops(pixels: int) -> int:
    features = NOISEPRINT_FEATURES
    middle = (NOISEPRINT_LAYERS - 2) * conv(features, features, 3, pixels)
    return conv(3, features, 3, pixels) + middle + conv(features, 1, 3, pixels)


def transformer_block_flops(dim: int, ratio: int, grid: tuple) -> int:
    tokens = grid[0] * grid[1]
    reduced = (grid[0] // ratio) * (grid[1] // ratio) if ratio > 1 else tokens
    reduction = conv(dim, dim, ratio, reduced) if ratio > 1 else 0
    attention = linear(dim, dim, tokens) + reduction + linear(dim, 2 * dim, reduced)
    attention += 2 * (2 * tokens * reduced * dim)  # q k^T and scores . v, all heads
    attention += linear(dim, dim, tokens)  # output projection
    hidden = MLP_RATIO * dim
    mix_ffn = linear(dim, hidden, tokens) + conv(hidden, hidden, 3, tokens, groups=hidden)
    return attention + mix_ffn + linear(hidden, dim, tokens)


def fusion_flops(dim: int, heads: int, tokens: int) -> int:
    """One stage's FeatureRectify + FeatureFusion (CMX) on `tokens` pixels."""
    rectify = linear(4 * dim, 4 * dim, 1) + linear(4 * dim, 2 * dim, 1)  # channel weights
    rectify += conv(2 * dim, dim, 1, tokens) + conv(dim, 2, 1, tokens)  # spatial weights
    head_dim = dim // heads
    cross = 2 * linear(dim, 2 * dim, tokens)  # channel_proj1/2
    cross += 2 * linear(dim, 2 * dim, tokens)  # kv1/2
    cross += 2 * 2 * (2 * tokens * head_dim * dim)  # two contexts k^T v, applied to two streams
    cross += 2 * linear(2 * dim, dim, tokens)  # end_proj1/2
    embed = 2 * conv(2 * dim, dim, 1, tokens) + conv(dim, dim, 3, tokens, groups=dim)
    embed += conv(dim, dim, 1, tokens)
    return rectify + cross + embed


def encoder_flops(height: int, width: int) -> int:
    total = 0
    in_channels = 3
    for stage, grid in enumerate(stage_grids(height, width)):
        dim, tokens = EMBED_DIMS[stage], grid[0] * grid[1]
        stream = conv(in_channels, dim, PATCH_KERNELS[stage], tokens)
        stream += DEPTHS[stage] * transformer_block_flops(dim, REDUCTION_RATIOS[stage], grid)
        total += STREAMS * stream + fusion_flops(dim, HEADS[stage], tokens)
        in_channels = dim
    return total


def decoder_flops(height: int, width: int, classes: int, folded: bool = False) -> int:
    """The official decoder: a Linear per scale, concatenated at 1/4, then 1x1 convolutions.
    Folded (model/decoder.py): one 1x1 map per scale at its own resolution, no 2048 -> 512."""
    grids = stage_grids(height, width)
    finest = grids[0][0] * grids[0][1]
    per_scale = sum(linear(dim, DECODER_DIM, h * w) for dim, (h, w) in zip(EMBED_DIMS, grids))
    fuse = 0 if folded else conv(len(EMBED_DIMS) * DECODER_DIM, DECODER_DIM, 1, finest)
    return per_scale + fuse + conv(DECODER_DIM, classes, 1, finest)


def network_flops(height: int, width: int, folded_decoders: bool = False) -> dict:
    """FLOPs per part of the network, and their total: the official network's by default
    (the work FLOP/s are quoted against), or what the folded decoders execute."""
    parts = {
        "noiseprint": noiseprint_flops(height * width),
        "encoder": encoder_flops(height, width),
        "decoders": (decoder_flops(height, width, LOCALIZATION_CLASSES, folded_decoders)
                     + decoder_flops(height, width, CONFIDENCE_CLASSES, folded_decoders)),
    }
    parts["total"] = sum(parts.values())
    return parts
