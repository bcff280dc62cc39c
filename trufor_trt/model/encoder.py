"""The two-stream encoder (`backbone.*`): MiT-B2 on RGB, MiT-B2 on Noiseprint++, CMX fusion.

Stream 1 modules are `patch_embed{s}`, `block{s}`, `norm{s}`; stream 2 carries the `extra_`
prefix; `FRMs[s-1]` and `FFMs[s-1]` join them after stage s.
"""

import torch
from torch import nn

from trufor_trt.model.formulation import Formulation
from trufor_trt.model.fusion import FeatureFusion, FeatureRectify
from trufor_trt.model.layers import tokens_to_grid
from trufor_trt.architecture import (DEPTHS, EMBED_DIMS, HEADS, PATCH_KERNELS, PATCH_STRIDES,
                                     REDUCTION_RATIOS)
from trufor_trt.model.mit import BLOCK_NORM_EPS, OverlapPatchEmbed, TransformerBlock

STREAM_PREFIXES = ("", "extra_")  # RGB, Noiseprint++


def _patch_embed(stage: int) -> OverlapPatchEmbed:
    in_channels = 3 if stage == 0 else EMBED_DIMS[stage - 1]
    return OverlapPatchEmbed(in_channels, EMBED_DIMS[stage], PATCH_KERNELS[stage], PATCH_STRIDES[stage])


class DualMiT(nn.Module):
    def __init__(self):
        super().__init__()
        # Registration order is the checkpoint's key order: all patch embeddings, then per
        # stage each stream's blocks and norm.
        for prefix in STREAM_PREFIXES:
            for stage in range(len(EMBED_DIMS)):
                setattr(self, f"{prefix}patch_embed{stage + 1}", _patch_embed(stage))
        for stage, dim in enumerate(EMBED_DIMS):
            for prefix in STREAM_PREFIXES:
                setattr(self, f"{prefix}block{stage + 1}", nn.ModuleList(
                    TransformerBlock(dim, HEADS[stage], REDUCTION_RATIOS[stage])
                    for _ in range(DEPTHS[stage])))
                setattr(self, f"{prefix}norm{stage + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
        self.FRMs = nn.ModuleList(FeatureRectify(dim) for dim in EMBED_DIMS)
        self.FFMs = nn.ModuleList(FeatureFusion(dim, heads) for dim, heads in zip(EMBED_DIMS, HEADS))

    def stage_tokens(self, prefix: str, stage: int, grid: torch.Tensor, form: Formulation):
        """One stream's stage: (its normalised tokens, height, width)."""
        number = stage + 1
        tokens, height, width = getattr(self, f"{prefix}patch_embed{number}")(grid, form)
        for block in getattr(self, f"{prefix}block{number}"):
            tokens = block(tokens, height, width, form)
        return getattr(self, f"{prefix}norm{number}")(tokens), height, width

    def run_stage(self, prefix: str, stage: int, grid: torch.Tensor, form: Formulation) -> torch.Tensor:
        return tokens_to_grid(*self.stage_tokens(prefix, stage, grid, form), form)

    def forward(self, rgb: torch.Tensor, noise: torch.Tensor, form: Formulation) -> list:
        """Returns the fused maps at 1/4, 1/8, 1/16 and 1/32 of the input grid."""
        if form.onnxruntime_layout:
            return self._forward_on_tokens(rgb, noise, form)
        fused = []
        for stage in range(len(EMBED_DIMS)):
            rgb = self.run_stage(STREAM_PREFIXES[0], stage, rgb, form)
            noise = self.run_stage(STREAM_PREFIXES[1], stage, noise, form)
            rgb, noise = self.FRMs[stage](rgb, noise)
            fused.append(self.FFMs[stage](rgb, noise, form))
        return fused

    def _forward_on_tokens(self, rgb: torch.Tensor, noise: torch.Tensor, form: Formulation) -> list:
        """The same with the rectification and fusion on tokens: the streams become grids only
        where a convolution reads them (ONNX Runtime folds that into its layout conversion)."""
        fused = []
        for stage in range(len(EMBED_DIMS)):
            rgb, height, width = self.stage_tokens(STREAM_PREFIXES[0], stage, rgb, form)
            noise, _, _ = self.stage_tokens(STREAM_PREFIXES[1], stage, noise, form)
            rgb, noise = self.FRMs[stage].on_tokens(rgb, noise)
            fused.append(self.FFMs[stage].on_tokens(rgb, noise, height, width, form))
            rgb, noise = tokens_to_grid(rgb, height, width, form), tokens_to_grid(noise, height, width, form)
        return fused
