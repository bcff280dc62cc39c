"""Host memory per image, and the row band heights that keep it within a budget.

With Noiseprint++ and the folded decoders in row bands (bands.py), what one image needs is a
fixed part (runtime, weights), a part proportional to its pixels (input, Noiseprint++ map, the
encoder's activations and maps, the postprocessed outputs) and the bands: Noiseprint++'s 64
full-resolution channels, and the decoders' coarse maps for a group of 1/4-grid rows (1024
channels, upsampled along the columns; bands.decoder_groups), each proportional to its size.
Each runner carries its own coefficients, measured on this project's machines
(docs/large-images.md); an image that does not fit even with the smallest bands is refused
before any work.
"""

import os
import re
from dataclasses import dataclass
from typing import Optional

from trufor_trt.architecture import MIN_SIDE, stage_grids
from trufor_trt.bands import NOISEPRINT_HALO
from trufor_trt.errors import TruforError

GIB = 1024 ** 3
MIB = 1024 ** 2
MIN_BAND_ROWS = 32
# Bands cost little (Noiseprint++'s halo, the decoders' few shared coarse rows), so even with
# memory to spare both run in bands of about this much activation memory: larger buy nothing.
PREFERRED_BAND_BYTES = 512 * MIB
_UNITS = {"": GIB, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}


class MemoryBudgetError(TruforError):
    """A --max-memory value that cannot be read, or an image that cannot fit within it."""


def parse_memory(text: str) -> int:
    """'8G', '8GB', '8GiB', '512M', '1.5' (GiB) -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise MemoryBudgetError(f"memory size {text!r}: expected a number with K, M, G or T, e.g. 8G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class BandPlan:
    noiseprint_rows: int  # output rows per Noiseprint++ band
    decoder_rows: int  # 1/4-grid rows per decoder group (bands.decoder_groups)


@dataclass(frozen=True)
class MemoryModel:
    fixed_bytes: float
    bytes_per_pixel: float  # everything proportional to the image but the bands
    noiseprint_bytes_per_pixel: float  # Noiseprint++'s activations per pixel of its band
    decoder_bytes_per_cell: float  # both decoders' activations per 1/4-grid cell of a group

    def without_bands(self, height: int, width: int) -> float:
        return self.fixed_bytes + self.bytes_per_pixel * height * width

    def _band_room(self, height: int, width: int, budget_bytes: Optional[int]) -> float:
        room = PREFERRED_BAND_BYTES
        if budget_bytes is not None:
            room = min(room, budget_bytes - self.without_bands(height, width))
        return room

    def band_bytes(self, height: int, width: int, plan: "BandPlan") -> float:
        """The larger of the two kinds of band (they run one after the other)."""
        grid_width = stage_grids(height, width)[0][1]
        noiseprint_rows = min(height, plan.noiseprint_rows + 2 * NOISEPRINT_HALO)
        return max(self.noiseprint_bytes_per_pixel * width * noiseprint_rows,
                   self.decoder_bytes_per_cell * grid_width * plan.decoder_rows)

    def needed_bytes(self, height: int, width: int, plan: "BandPlan") -> float:
        return self.without_bands(height, width) + self.band_bytes(height, width, plan)

    def _bands_in(self, height: int, width: int, room: float):
        """The band heights `room` bytes allow, or None when the smallest do not fit."""
        grid_height, grid_width = stage_grids(height, width)[0]
        noiseprint_rows = int(room // (self.noiseprint_bytes_per_pixel * width)) - 2 * NOISEPRINT_HALO
        decoder_rows = int(room // (self.decoder_bytes_per_cell * grid_width))
        if noiseprint_rows < min(MIN_BAND_ROWS, height) or decoder_rows < min(MIN_BAND_ROWS // 4, grid_height):
            return None
        return BandPlan(min(noiseprint_rows, height), min(decoder_rows, grid_height))

    def smallest_bands(self, height: int, width: int) -> "BandPlan":
        grid_height = stage_grids(height, width)[0][0]
        return BandPlan(min(MIN_BAND_ROWS, height), min(MIN_BAND_ROWS // 4, grid_height))

    def largest_fitting(self, height: int, width: int, budget_bytes: float):
        """(H, W) of the largest image of this aspect the budget takes, or None if not even the
        smallest one does."""
        low, high = 0.0, 1.0
        for _ in range(30):
            scale = (low + high) / 2
            size = (max(1, int(height * scale)), max(1, int(width * scale)))
            fits = self._bands_in(*size, budget_bytes - self.without_bands(*size)) is not None
            low, high = (scale, high) if fits else (low, scale)
        size = (int(height * low), int(width * low))
        return size if min(size) >= MIN_SIDE else None

    def plan(self, height: int, width: int, budget_bytes: Optional[int]) -> BandPlan:
        """Band heights for this image within the budget (the two kinds of band run one after
        the other, so each may use the room); MemoryBudgetError, naming what the budget takes,
        when the smallest do not fit."""
        bands = self._bands_in(height, width, self._band_room(height, width, budget_bytes))
        if bands is not None:
            return bands
        smallest = self.smallest_bands(height, width)
        if budget_bytes is None:  # no budget to refuse against: smallest bands
            return smallest
        need = self.needed_bytes(height, width, smallest)
        largest = self.largest_fitting(height, width, budget_bytes)
        fits = (f"; it takes up to about {largest[1]}x{largest[0]} at this aspect" if largest
                else "; it takes no image of this aspect")
        raise MemoryBudgetError(f"{width}x{height} needs about {need / GIB:.1f} GiB of memory (in bands of "
                                f"{smallest.noiseprint_rows} rows), more than the {budget_bytes / GIB:.1f} GiB "
                                f"budget (--max-memory){fits}")

    def refusal(self, height: int, width: int, budget_bytes: Optional[int]) -> Optional[str]:
        try:
            self.plan(height, width, budget_bytes)
        except MemoryBudgetError as exc:
            return str(exc)
        return None
