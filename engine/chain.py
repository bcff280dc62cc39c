"""One image through the network's parts in bounded memory: the chain every banded backend runs.

The parts are those bands.py proves exact: Noiseprint++ in row bands with its halo, the
two-stream encoder on the whole image (its attention sees every token), then both decoders as
groups of 1/4-grid rows (coarse maps widened along the columns once per group) in small bands.
`run_chain` is the order of those steps, and the only copy of it: ONNX Runtime's CPU sessions
(onnxruntime_runner.py) and TensorRT's chained engines (tensorrt_chain.py) implement the steps
on their own memory, host arrays or device buffers, behind `ChainParts`.
"""

from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np

from trufor_trt.architecture import stage_grids
from trufor_trt.bands import DecoderBand, DecoderGroup, decoder_groups, noiseprint_row_bands
from trufor_trt.engine.memory_budget import BandPlan
from trufor_trt.engine.runner import OUTPUT_NAMES, RawOutputs
from trufor_trt.engine.timing import StageClock

NOISEPRINT = OUTPUT_NAMES[2]
COARSE = ("c4", "c3", "c2")  # the order the decoder graphs take the coarse scales in
# The model folder's decoder graphs, the chain's last two parts on every backend and precision.
DECODER_VARIANTS = {"decoder-maps": "fp32-cpu-decoder-maps", "decoder-band": "fp32-cpu-decoders"}


class ChainParts(ABC):
    """The steps of one image on one backend; `run_chain` calls them in order."""

    @abstractmethod
    def start(self, prepared: np.ndarray) -> None:
        """Take the prepared image (1 x 3 x H x W float32)."""

    @abstractmethod
    def noiseprint_band(self, top: int, bottom: int, first: int, last: int) -> None:
        """Noiseprint++'s output rows [top, bottom) from the image's rows [first, last)."""

    @abstractmethod
    def encoder(self) -> None:
        """The four fused maps c1..c4 (channels last) from the image and the whole Noiseprint++."""

    @abstractmethod
    def decoder_group(self, group: DecoderGroup) -> None:
        """Both decoders' coarse maps for the group's rows, widened along the columns."""

    @abstractmethod
    def decoder_band(self, band: DecoderBand) -> None:
        """The band's logits, from c1's rows and the current group's widened maps."""

    @abstractmethod
    def finish(self) -> RawOutputs:
        """The image's raw outputs, on the host."""

    @contextmanager
    def timed(self, clock: StageClock, stage: str):
        """Time one stage; a device backend whose steps are asynchronous times it its own way."""
        with clock.stage(stage):
            yield


def coarse_heights(height: int, width: int) -> list:
    """The row counts of c4, c3, c2 (the decoders' coarse scales, in the order they take them)."""
    return [grid[0] for grid in reversed(stage_grids(height, width)[1:])]


def run_chain(parts: ChainParts, prepared: np.ndarray, plan: BandPlan, parts_ms: dict | None = None) -> RawOutputs:
    """The network on one prepared image, in `plan`'s bands; `parts_ms`, if given, receives
    each part's milliseconds."""
    height, width = prepared.shape[2:]
    clock = StageClock()
    parts.start(prepared)
    with parts.timed(clock, "noiseprint"):
        for band in noiseprint_row_bands(height, plan.noiseprint_rows):
            parts.noiseprint_band(*band)
    with parts.timed(clock, "encoder"):
        parts.encoder()
    with parts.timed(clock, "decoders"):
        grid_height = stage_grids(height, width)[0][0]
        for group in decoder_groups(coarse_heights(height, width), grid_height, plan.decoder_rows):
            parts.decoder_group(group)
            for band in group.bands:
                parts.decoder_band(band)
    outputs = parts.finish()
    if parts_ms is not None:
        parts_ms.update(clock.times_ms)
    return outputs
